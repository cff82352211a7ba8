"""Ring attention: each rank keeps its query shard while the K/V shards travel around the ring.

Forward, step s (of W): rank r holds the K/V shard of rank (r - s) mod W, starts sending it on to
r + 1 (and receiving the next one from r - 1), and meanwhile computes its queries against it with
torch.ops.flashattn_ext.fwd. The partial (out_i, lse_i) are merged exactly in fp32 through the
log-sum-exp: lse = logaddexp(lse, lse_i), out = exp(lse_old - lse) out + exp(lse_i - lse) out_i.

Backward, the FlashAttention identity per block: dS = P o (dP - D) with D = rowsum(dO o O) and P
recomputed from the FINAL lse, so each step calls torch.ops.flashattn_ext.bwd with the final out and
lse and its result is exact for that block. dQ accumulates locally; the dK/dV partial sums of a
block travel with it (a second ring, one step behind the K/V ring). The backward turns the ring
the other way and starts from the block the forward ended with, so each rank computes its own
block last and the sums arrive just in time: W - 2 K/V shifts and W - 1 dK/dV shifts, each hidden
behind a step's compute. Nothing of size L x S is ever stored (one extra K/V shard is kept from
the forward for the backward).
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _comm, _plan
from ._args import check_args, check_zigzag_length, seq_dim

_ops = torch.ops.flashattn_ext
_KV_TAG, _DKV_TAG = 0, 2  # tags of the two rings (each carries two tensors)


class _Config(NamedTuple):
    ring: _comm.Ring
    band: Tuple[int, int]
    scale: Optional[float]
    sharding: str
    layout: str
    deterministic: bool


def _op_view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, S, D) view of a tensor in the user's layout (a transpose is its own inverse)."""
    return x.transpose(1, 2) if layout == "bshd" else x


def _user_buffer(b: int, h: int, s: int, d: int, layout: str, like: torch.Tensor, dtype) -> torch.Tensor:
    """A zero (B, H, S, D) op view whose storage is contiguous in the user's layout (what travels)."""
    if layout == "bshd":
        return torch.zeros(b, s, h, d, dtype=dtype, device=like.device).transpose(1, 2)
    return torch.zeros(b, h, s, d, dtype=dtype, device=like.device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan_for(cfg: _Config, seqlen_q: int, seqlen_k: int, src: int):
    """The op calls for this rank's queries against the keys of rank src."""
    r, w = cfg.ring.rank, cfg.ring.world
    return _plan.plan_step(_plan.segments(r, w, seqlen_q, cfg.sharding),
                           _plan.segments(src, w, seqlen_k, cfg.sharding), cfg.band)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, out_i: torch.Tensor, lse_i: torch.Tensor) -> None:
    """out, lse <- the exact merge of (out, lse) with (out_i, lse_i), in place (out fp32/fp64).
    A row empty in both (lse = -inf) stays out = 0, lse = -inf, never NaN."""
    new = torch.logaddexp(lse, lse_i)
    base = new.masked_fill(torch.isneginf(new), 0.0)
    # addcmul_ rather than out_i * w: the product of the strided bf16 view is several times slower
    out.mul_(torch.exp(lse - base).unsqueeze(-1)).addcmul_(out_i.to(out.dtype), torch.exp(lse_i - base).unsqueeze(-1))
    lse.copy_(new)


def _accumulate(acc, index: slice, value: torch.Tensor, length: int, make_zeros):
    """acc[..., index, :] += value along dim 2; a first value covering all rows becomes acc itself
    (no zero fill, no extra pass). Returns acc."""
    if acc is None:
        if index.start == 0 and index.stop == length:
            return value.to(_acc_dtype(value.dtype))
        acc = make_zeros()
    acc[:, :, index] += value
    return acc


def _forward(q: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor, cfg: _Config):
    """q: (B, Hq, L, D) op view; k_cur, v_cur: this rank's K/V shards, contiguous in the user's
    layout. Step s holds the K/V of rank (rank - s) mod W. Returns out (B, Hq, L, Dv) op view
    (fp32/fp64), lse (B, Hq, L), and the last K/V block held (that of rank + 1, which the backward
    starts from)."""
    ring, layout = cfg.ring, cfg.layout
    b, hq, lq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    seqlen_k, headdim_v = _op_view(k_cur, layout).size(2), _op_view(v_cur, layout).size(3)
    out = lse = None
    bufs = [None, None]
    for step in range(ring.world):
        works = []
        if step < ring.world - 1:  # the next block is in flight while this one is computed
            if bufs[step % 2] is None:
                bufs[step % 2] = (torch.empty_like(k_cur), torch.empty_like(v_cur))
            works = _comm.ring_shift(ring, [k_cur, v_cur], list(bufs[step % 2]), _KV_TAG)
        kb, vb = _op_view(k_cur, layout), _op_view(v_cur, layout)
        for c in _plan_for(cfg, lq, seqlen_k, (ring.rank - step) % ring.world):
            o, l, _ = _ops.fwd(q[:, :, c.q_lo:c.q_hi], kb[:, :, c.k_lo:c.k_hi], vb[:, :, c.k_lo:c.k_hi],
                               scale=cfg.scale, window_left=c.left, window_right=c.right,
                               deterministic=cfg.deterministic)
            if out is None and c.q_lo == 0 and c.q_hi == lq:
                out, lse = o.to(acc), l
                continue
            if out is None:
                out = _user_buffer(b, hq, lq, headdim_v, layout, q, acc)
                lse = torch.full((b, hq, lq), -math.inf, dtype=acc, device=q.device)
            merge_partial(out[:, :, c.q_lo:c.q_hi], lse[:, :, c.q_lo:c.q_hi], o, l)
        _comm.wait_all(works)
        if works:
            k_cur, v_cur = bufs[step % 2]
    if out is None:  # the band leaves this rank's queries nothing to see
        out = _user_buffer(b, hq, lq, headdim_v, layout, q, acc)
        lse = torch.full((b, hq, lq), -math.inf, dtype=acc, device=q.device)
    return out, lse, (k_cur, v_cur)


def _backward(dout, q, k_own, v_own, kv_last, out, lse, cfg: _Config):
    """dout, q, out: op views; k_own, v_own: this rank's K/V shards (user layout, contiguous);
    kv_last: the forward's last K/V block (of rank + 1); lse: the final lse. Returns dq, dk, dv as
    op views in fp32/fp64 (dk, dv of this rank's own shard).

    Order: step s computes the keys of rank (rank + 1 + s) mod W, so this rank's own block comes
    last: the forward left block rank + 1 here (no transfer before step 0), later blocks come from
    rank + 1 (the ring turns the other way), and the dK/dV sums of a block travel the same way and
    reach their owner just as it computes its own part, so no final hop is left exposed."""
    ring, layout = cfg.ring, cfg.layout
    w, r = ring.world, ring.rank
    back = -1  # send to rank - 1, receive from rank + 1
    acc = _acc_dtype(q.dtype)
    lq, seqlen_k = q.size(2), _op_view(k_own, layout).size(2)
    rng_state = torch.zeros(2, dtype=torch.long, device=q.device)  # no dropout
    dq = None
    k_cur, v_cur = kv_last
    kv_bufs, dkv_bufs = [None, None], [None, None]
    dkv_works, dkv_in_flight = [], None

    def zeros_like_op(x):
        return lambda: _user_buffer(*x.shape, layout, q, acc)

    for step in range(w):
        kv_works = []
        if step < w - 2:  # step w-1 uses the local shard, so the last block to receive is step w-2's
            if kv_bufs[step % 2] is None:
                kv_bufs[step % 2] = (torch.empty_like(k_cur), torch.empty_like(v_cur))
            kv_works = _comm.ring_shift(ring, [k_cur, v_cur], list(kv_bufs[step % 2]), _KV_TAG, direction=back)
        if step == w - 1:
            k_cur, v_cur = k_own, v_own
        kb, vb = _op_view(k_cur, layout), _op_view(v_cur, layout)
        dk = dv = None
        for c in _plan_for(cfg, lq, seqlen_k, (r + 1 + step) % w):
            rows, keys = slice(c.q_lo, c.q_hi), slice(c.k_lo, c.k_hi)
            dq_c, dk_c, dv_c, _ = _ops.bwd(dout[:, :, rows], q[:, :, rows], kb[:, :, keys], vb[:, :, keys],
                                           out[:, :, rows], lse[:, :, rows], rng_state, scale=cfg.scale,
                                           window_left=c.left, window_right=c.right,
                                           deterministic=cfg.deterministic)
            dq = _accumulate(dq, rows, dq_c, lq, zeros_like_op(q))
            dk = _accumulate(dk, keys, dk_c, seqlen_k, zeros_like_op(kb))
            dv = _accumulate(dv, keys, dv_c, seqlen_k, zeros_like_op(vb))
        if dk is None:  # the band skips this block pair
            dk, dv = _user_buffer(*kb.shape, layout, q, acc), _user_buffer(*vb.shape, layout, q, acc)
        if step > 0:  # the partial sums of this block from the ranks it visited before
            _comm.wait_all(dkv_works)
            dk += _op_view(dkv_bufs[(step - 1) % 2][0], layout)
            dv += _op_view(dkv_bufs[(step - 1) % 2][1], layout)
        if step < w - 1:
            dkv_in_flight = (_op_view(dk, layout).contiguous(), _op_view(dv, layout).contiguous())  # alive until sent
            if dkv_bufs[step % 2] is None:
                dkv_bufs[step % 2] = tuple(torch.empty_like(t) for t in dkv_in_flight)
            dkv_works = _comm.ring_shift(ring, list(dkv_in_flight), list(dkv_bufs[step % 2]), _DKV_TAG,
                                         direction=back)
        _comm.wait_all(kv_works)
        if kv_works:
            k_cur, v_cur = kv_bufs[step % 2]
    del dkv_in_flight
    if dq is None:
        dq = _user_buffer(*q.shape, layout, q, acc)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        k_cur, v_cur = k.contiguous(), v.contiguous()
        out, lse, (k_last, v_last) = _forward(_op_view(q, cfg.layout), k_cur, v_cur, cfg)
        out = _op_view(out, cfg.layout).to(q.dtype)
        ctx.save_for_backward(q, k_cur, v_cur, k_last, v_last, out, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k_cur, v_cur, k_last, v_last, out, lse = ctx.saved_tensors
        lay = ctx.cfg.layout
        dq, dk, dv = _backward(_op_view(dout, lay), _op_view(q, lay), k_cur, v_cur, (k_last, v_last),
                               _op_view(out, lay), lse, ctx.cfg)
        return (_op_view(dq, lay).to(q.dtype), _op_view(dk, lay).to(k_cur.dtype), _op_view(dv, lay).to(v_cur.dtype),
                None)


def ring_attention(q, k, v, group=None, *, causal=False, softmax_scale=None, window_size=(-1, -1), layout="bshd",
                   sharding="zigzag", deterministic=False, dropout_p=0.0, return_lse=False):
    """Context-parallel exact attention over a ring of ranks; differentiable.

    q (B, L, Hq, D), k (B, L, Hk, D), v (B, L, Hk, Dv): this rank's shard of the sequence
    (layout="bhsd" for SDPA's (B, H, L, D)); Hq a multiple of Hk (GQA/MQA: K/V travel with their
    own heads, never repeated). Returns this rank's output shard (and with return_lse=True the
    float32 lse (B, Hq, L), not differentiable), equal to flashattn_ext.flash_attn_func on the
    gathered sequence.

    sharding: which global positions a rank holds. "zigzag" (default): rank r holds chunks r and
        2W-1-r of 2W equal chunks (see zigzag_shard); with causal=True every rank then does the same
        work, and fully masked block pairs are skipped. "contiguous": rank r holds chunk r.
        Non-causal attention without a window does not depend on it.
    causal / window_size: flash-attn semantics on the global sequence (query i sees key j iff
        i - left <= j <= i + right; causal: right = 0). Block pairs outside the band are skipped.
    group: a ProcessGroup, a 1-D DeviceMesh (mesh["cp"]) or (mesh, dim); None = the default group,
        or plain attention when torch.distributed is not initialised. World size 1 = plain attention.
    deterministic: passed to the kernels; the ring's reduction order is fixed anyway.
    dropout_p: must be 0 (dropout is not supported here; a ValueError otherwise).

    All ranks must pass shards of the same shape and dtype (checked with one small all-gather;
    every rank raises the same ValueError otherwise). Communication per rank, forward: W - 1 K/V
    shards; backward: W - 2 K/V shards and W - 1 fp32 dK/dV partial sums, each overlapped with a
    step's compute (batch_isend_irecv). Errors in one rank surface in the others through the process
    group's timeout (init_process_group(timeout=...)).
    """
    band = check_args("ring_attention", q, k, v, layout, sharding, dropout_p, causal, window_size)
    ring = _comm.resolve_group(group)
    sd = seq_dim(layout)
    if ring.world == 1:
        out, lse, _ = _ops.fwd(_op_view(q, layout), _op_view(k, layout), _op_view(v, layout), scale=softmax_scale,
                               window_left=band[0], window_right=band[1], deterministic=bool(deterministic))
        out = _op_view(out, layout)
        return (out, lse) if return_lse else out
    _comm.check_same_shapes(ring, "ring_attention", q=q, k=k, v=v)
    if band != (-1, -1) and k.size(sd) != q.size(sd):
        raise ValueError(f"flashattn_ext.distributed.ring_attention: with causal or a window, k must have the same "
                         f"local sequence length as q, got q {q.size(sd)} and k {k.size(sd)}")
    check_zigzag_length("ring_attention", q.size(sd), sharding)
    check_zigzag_length("ring_attention", k.size(sd), sharding)
    cfg = _Config(ring, band, None if softmax_scale is None else float(softmax_scale), sharding, layout,
                  bool(deterministic))
    out, lse = _RingAttention.apply(q, k, v, cfg)
    return (out, lse) if return_lse else out
