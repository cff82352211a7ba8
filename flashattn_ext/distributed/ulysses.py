"""All-to-all head parallelism (DeepSpeed-Ulysses): an all-to-all turns the sequence-sharded
q, k, v into head-sharded tensors over the whole sequence, each rank runs plain flashattn_ext on
its heads, and an all-to-all turns the output back into sequence shards."""

import torch

from .. import _api
from . import _comm
from ._args import check_args, check_zigzag_length
from .ring import ring_attention


def _seq_to_heads(x: torch.Tensor, ring: _comm.Ring) -> torch.Tensor:
    """(B, S, H, D) sequence shard -> (B, W*S, H/W, D): rank g gets heads [g H/W, (g+1) H/W)."""
    b, s, h, d = x.shape
    w = ring.world
    send = x.reshape(b, s, w, h // w, d).permute(2, 0, 1, 3, 4).contiguous()  # part g goes to rank g
    recv = _comm.all_to_all(ring, send)  # part g: rank g's sequence shard of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, w * s, h // w, d)


def _heads_to_seq(y: torch.Tensor, ring: _comm.Ring) -> torch.Tensor:
    """(B, W*S, H/W, D) head shard -> (B, S, H, D) sequence shard (the inverse of _seq_to_heads)."""
    b, ws, hl, d = y.shape
    w = ring.world
    send = y.reshape(b, w, ws // w, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # part g: rank g's positions
    recv = _comm.all_to_all(ring, send)  # part g: my positions of rank g's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ws // w, w * hl, d)


class _Relayout(torch.autograd.Function):
    """Sequence shards <-> head shards; each direction's gradient is the other direction."""

    @staticmethod
    def forward(ctx, x, ring, to_heads: bool):
        ctx.ring, ctx.to_heads = ring, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, ring)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.ring), None, None


def _zigzag_order(world: int):
    """Gathered zigzag shards hold chunks 0, 2W-1, 1, 2W-2, ...: where each chunk of the sequence
    order sits (to_seq), and the inverse (to_gathered)."""
    gathered = [c for r in range(world) for c in (r, 2 * world - 1 - r)]
    to_seq = sorted(range(2 * world), key=lambda i: gathered[i])
    return to_seq, gathered


def _permute_chunks(x: torch.Tensor, order, dim: int = 1) -> torch.Tensor:
    return torch.cat([x.chunk(len(order), dim)[i] for i in order], dim)


def ulysses_attention(q, k, v, group=None, *, causal=False, softmax_scale=None, window_size=(-1, -1), layout="bshd",
                      sharding="zigzag", deterministic=False, dropout_p=0.0, return_lse=False):
    """Context-parallel exact attention by all-to-all head parallelism (DeepSpeed-Ulysses).

    Same arguments, shapes and result as ring_attention: q (B, L, Hq, D), k/v (B, L, Hk, D) are
    this rank's sequence shard (layout="bhsd" for (B, H, L, D)); returns this rank's output shard.
    Hq must be divisible by the world size W; Hk too, or W a multiple of Hk (then each rank needs
    one K/V head, and K/V heads are repeated W/Hk times before the all-to-all). sharding says how
    the sequence was sharded ("zigzag" default, as zigzag_shard, or "contiguous"); with a causal
    mask or a window the gathered sequence is put back in order around the local attention.
    Communication per rank: q, k, v and out, each (W-1)/W of the local shard, in four all-to-alls.
    dropout_p must be 0 (not supported).
    """
    band = check_args("ulysses_attention", q, k, v, layout, sharding, dropout_p, causal, window_size)
    ring = _comm.resolve_group(group)
    if ring.world == 1:
        return ring_attention(q, k, v, None, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                              layout=layout, deterministic=deterministic, return_lse=return_lse)
    w = ring.world
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    hq, hk = q.size(2), k.size(2)
    if hq % w:
        raise ValueError(f"flashattn_ext.distributed.ulysses_attention: the number of query heads ({hq}) must be "
                         f"divisible by the world size ({w}); use ring_attention otherwise")
    if hk % w and w % hk:
        raise ValueError(f"flashattn_ext.distributed.ulysses_attention: the number of key/value heads ({hk}) must be "
                         f"divisible by the world size ({w}), or the world size by it; use ring_attention otherwise")
    _comm.check_same_shapes(ring, "ulysses_attention", q=q, k=k, v=v)
    if k.size(1) != q.size(1) and band != (-1, -1):
        raise ValueError(f"flashattn_ext.distributed.ulysses_attention: with causal or a window, k must have the same "
                         f"local sequence length as q, got q {q.size(1)} and k {k.size(1)}")
    reorder = sharding == "zigzag" and band != (-1, -1)  # without a band, position order does not matter
    if reorder:
        check_zigzag_length("ulysses_attention", q.size(1), sharding)
        check_zigzag_length("ulysses_attention", k.size(1), sharding)
    if hk % w:
        k, v = (x.repeat_interleave(w // hk, dim=2) for x in (k, v))
    qh, kh, vh = (_Relayout.apply(x, ring, True) for x in (q, k, v))
    to_seq, to_gathered = _zigzag_order(w)
    if reorder:
        qh, kh, vh = (_permute_chunks(x, to_seq) for x in (qh, kh, vh))
    out, lse = _api.flash_attn_func(qh, kh, vh, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                    deterministic=deterministic, return_lse=True)
    if reorder:
        out = _permute_chunks(out, to_gathered)
    out = _Relayout.apply(out, ring, False)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    if not return_lse:
        return out
    lse = lse.transpose(1, 2).unsqueeze(-1)  # (B, W*S, H/W, 1)
    if reorder:
        lse = _permute_chunks(lse, to_gathered)
    lse = _heads_to_seq(lse.contiguous(), ring).squeeze(-1).transpose(1, 2).contiguous()  # (B, H, S)
    return out, lse
