"""The public attention functions: argument normalisation only. Checks and math live in C++
(csrc/ops.cpp validates every input once, with messages that name the argument)."""

from typing import Optional, Tuple

import torch

_ops = torch.ops.flashattn_ext


def _band(causal: bool, window_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(window_left, window_right) from causal and a (left, right) window; -1 = unbounded."""
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _broadcast_batch(query, key, value, enable_gqa: bool):
    """Broadcast the batch dims of query/key/value like SDPA (matmul broadcasting), through expand:
    views with zero strides, never copies. Heads broadcast too unless enable_gqa, where the query
    may have a multiple of the key/value heads."""
    rank = max(query.dim(), key.dim(), value.dim())
    if rank < 2 or min(query.dim(), key.dim(), value.dim()) < 2:
        return query, key, value  # the op reports the rank error
    q, k, v = (x[(None,) * (rank - x.dim())] for x in (query, key, value))
    lead = 3 if (enable_gqa and rank >= 3) else 2  # dims that do not broadcast
    try:
        batch = torch.broadcast_shapes(q.shape[:-lead], k.shape[:-lead], v.shape[:-lead])
    except RuntimeError as e:
        hint = ""
        if rank >= 3 and not enable_gqa and q.shape[-3] != k.shape[-3]:
            hint = " (for grouped-query attention pass enable_gqa=True)"
        raise RuntimeError(
            f"flashattn_ext: the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast{hint}: {e}") from None
    if enable_gqa and rank >= 3:
        q = q.expand(*batch, *q.shape[-3:])
        k = k.expand(*batch, *k.shape[-3:])
        v = v.expand(*batch, *v.shape[-3:])
    else:
        q = q.expand(*batch, *q.shape[-2:])
        k = k.expand(*batch, *k.shape[-2:])
        v = v.expand(*batch, *v.shape[-2:])
    return q, k, v


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=0.0, alibi_slopes=None,
                                 deterministic=None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same arguments, shapes,
    semantics and gradients), computed the FlashAttention way.

    query (N, ..., Hq, L, E), key (N, ..., H, S, E), value (N, ..., H, S, Ev) -> (N, ..., Hq, L, Ev).

    attn_mask: bool (True = take part) or float (added to the scores), broadcastable to
        (N, ..., Hq, L, S); read through its strides, never expanded in memory. A float mask that
        requires grad gets its gradient.
    is_causal: top-left aligned causal mask, as SDPA (flash_attn_func aligns bottom-right).
    enable_gqa: Hq a multiple of H; K/V are never copied per query head.

    Extensions (keyword-only, SDPA's signature unchanged):
    window_size: (left, right) sliding window, top-left aligned like is_causal; -1 = unbounded.
    softcap: > 0 caps the scores as softcap * tanh(score / softcap).
    alibi_slopes: float32 (Hq,) or (N, Hq): adds -slope * |i + S - L - j| to the scores.
    deterministic: bitwise reproducible backward (default: torch.are_deterministic_algorithms_enabled()).
    """
    if attn_mask is not None and is_causal:
        raise RuntimeError("flashattn_ext: _scaled_dot_product_attention: Explicit attn_mask should not be set "
                           "when is_causal=True (pass either attn_mask or is_causal)")
    q, k, v = _broadcast_batch(query, key, value, enable_gqa)
    left, right = _band(is_causal, window_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    out, _, _ = _ops.fwd(q, k, v, attn_mask, alibi_slopes=alibi_slopes, dropout_p=float(dropout_p), scale=scale,
                         window_left=left, window_right=right, softcap=float(softcap),
                         deterministic=bool(deterministic))
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_lse=False):
    """flash-attn style attention on (batch, seqlen, heads, headdim) tensors.

    causal and window_size are aligned bottom-right as in flash-attn (query i sees key j when
    j <= i + S - L). GQA/MQA: pass fewer key/value heads (a divisor of the query heads).
    Returns out (B, L, H, Dv), and with return_lse=True also the float32 lse (B, H, L).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flashattn_ext.flash_attn_func: {name} must be a 4-D (batch, seqlen, heads, headdim) "
                             f"tensor, got {got}")
    left, right = _band(causal, window_size)
    out, lse, _ = _ops.fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alibi_slopes=alibi_slopes,
                           dropout_p=float(dropout_p), scale=softmax_scale, window_left=left, window_right=right,
                           bottom_right=True, softcap=float(softcap), deterministic=bool(deterministic))
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
