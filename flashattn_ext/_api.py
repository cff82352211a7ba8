"""The public attention functions: argument normalisation only. Checks and math live in C++
(csrc/ops.cpp validates every input once, with messages that name the argument)."""

import operator
from typing import Optional, Tuple

import torch

from ._errors import AttentionTypeError, AttentionValueError, translated

_ops = torch.ops.flashattn_ext
_fwd = _ops.fwd.default
_deterministic_enabled = torch.are_deterministic_algorithms_enabled
_Tensor = torch.Tensor
# Windows at least this wide are unbounded (the op clamps any window >= L + S to -1 as well); a
# Python int beyond int64 would not reach the op.
_WINDOW_CAP = 1 << 62


def _window_side(x, fn: str) -> int:
    if isinstance(x, bool) or isinstance(x, float):
        raise AttentionTypeError(f"flashattn_ext.{fn}: window_size must hold two ints (left, right), got "
                                 f"{type(x).__name__} {x!r}")
    try:
        x = operator.index(x)
    except TypeError:
        raise AttentionTypeError(f"flashattn_ext.{fn}: window_size must hold two ints (left, right), got "
                                 f"{type(x).__name__}") from None
    return min(x, _WINDOW_CAP)


def _band(causal: bool, window_size, fn: str = "scaled_dot_product_attention") -> Tuple[int, int]:
    """(window_left, window_right) from causal and a (left, right) window; -1 = unbounded."""
    if window_size is None:
        left, right = -1, -1
    else:
        if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__"):
            raise AttentionTypeError(f"flashattn_ext.{fn}: window_size must be a (left, right) pair of ints, got "
                                     f"{type(window_size).__name__}")
        if len(window_size) != 2:
            raise AttentionValueError(f"flashattn_ext.{fn}: window_size must be a (left, right) pair of ints, got "
                                      f"{len(window_size)} values {tuple(window_size)!r}")
        left, right = _window_side(window_size[0], fn), _window_side(window_size[1], fn)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _check_tensor(name: str, x, fn: str):
    if not isinstance(x, _Tensor):
        raise AttentionTypeError(f"flashattn_ext.{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise AttentionTypeError(f"flashattn_ext.{fn}: {name} is a nested (jagged) tensor, which flashattn_ext does "
                                 f"not take; pass padded tensors with an attn_mask, or the packed varlen API")


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
        raise AttentionValueError(
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
    if (window_size is None and not dropout_p and scale is None and not softcap and alibi_slopes is None
            and not (attn_mask is not None and is_causal)
            and type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
            and not (query.is_nested or key.is_nested or value.is_nested)
            and _batch_agrees(query.shape, key.shape, value.shape, enable_gqa)
            and not (_deterministic_enabled() if deterministic is None else deterministic)):
        # Fast path: plain tensors whose batch dims already agree, every option at its default.
        return _fwd_defaults(query, key, value, attn_mask, is_causal)
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
                      alibi_slopes, deterministic)


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
               alibi_slopes, deterministic, *, bottom_right=False, block_mask=None, block_elem_masks=None,
               block_size=(128, 128), fn="scaled_dot_product_attention"):
    """The one SDPA-convention core (scaled_dot_product_attention, block_sparse_attention): checks
    and broadcasts query/key/value, maps is_causal / window_size to the top-left band, calls the op
    and translates its errors."""
    if attn_mask is not None and is_causal:
        raise AttentionValueError(f"flashattn_ext: {fn}: Explicit attn_mask should not be "
                                  "set when is_causal=True (pass either attn_mask or is_causal)")
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
            and not (query.is_nested or key.is_nested or value.is_nested)
            and _batch_agrees(query.shape, key.shape, value.shape, enable_gqa)):
        for name, x in (("query", query), ("key", key), ("value", value)):
            _check_tensor(name, x, fn)
        query, key, value = _broadcast_batch(query, key, value, enable_gqa)
    if deterministic is None:
        deterministic = _deterministic_enabled()
    left, right = _band(is_causal, window_size, fn)
    try:
        out, _, _ = _fwd(query, key, value, attn_mask, alibi_slopes=alibi_slopes, block_mask=block_mask,
                         block_elem_masks=block_elem_masks, dropout_p=float(dropout_p), scale=scale,
                         window_left=left, window_right=right, bottom_right=bottom_right, softcap=float(softcap),
                         sparse_block_m=int(block_size[0]), sparse_block_n=int(block_size[1]),
                         deterministic=bool(deterministic))
    except (ValueError, TypeError) as e:
        raise translated(e) from None
    return out


def _sdpa_plain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """patch_sdpa's fast path: query/key/value already known to be plain, non-nested tensors;
    anything beyond the commonest case goes through scaled_dot_product_attention."""
    if (dropout_p or scale is not None or (is_causal and attn_mask is not None) or _deterministic_enabled()
            or not _batch_agrees(query.shape, key.shape, value.shape, enable_gqa)):
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _fwd_defaults(query, key, value, attn_mask, is_causal)


def _fwd_defaults(query, key, value, attn_mask, is_causal):
    """The op with every option at its default (attn_mask is None when is_causal): the fewest
    arguments for the dispatcher to parse; the op checks everything else."""
    try:
        if is_causal:
            return _fwd(query, key, value, None, window_right=0)[0]
        return _fwd(query, key, value, attn_mask)[0]
    except (ValueError, TypeError) as e:
        raise translated(e) from None


def _bottom_right_causal(query, key, value, dropout_p, scale, enable_gqa):
    """SDPA with a bottom-right aligned causal mask (query i sees key j <= i + S - L): what
    torch.nn.attention.bias.causal_lower_right asks for."""
    return _attention(query, key, value, None, dropout_p, True, scale, enable_gqa, None, 0.0, None, None,
                      bottom_right=True)


def _batch_agrees(qs, ks, vs, enable_gqa: bool) -> bool:
    """True when query/key/value need no broadcasting: same rank, same batch dims (and heads
    unless enable_gqa)."""
    n = len(qs)
    if n != len(ks) or n != len(vs) or n < 2:
        return False
    if n == 4:  # the commonest rank, without slicing torch.Size (0.5 µs a slice)
        return qs[0] == ks[0] == vs[0] and (enable_gqa or qs[1] == ks[1] == vs[1])
    lead = -3 if (enable_gqa and n >= 3) else -2
    return qs[:lead] == ks[:lead] == vs[:lead]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_lse=False):
    """flash-attn style attention on (batch, seqlen, heads, headdim) tensors.

    causal and window_size are aligned bottom-right as in flash-attn (query i sees key j when
    j <= i + S - L). GQA/MQA: pass fewer key/value heads (a divisor of the query heads).
    Returns out (B, L, H, Dv); with return_lse=True (out, lse) with the float32 lse (B, H, L);
    with return_attn_probs=True flash-attn's (out, softmax_lse, S_dmask), where S_dmask is always
    None (the probabilities are never materialized).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, "flash_attn_func")
        if t.dim() != 4:
            raise AttentionValueError(f"flashattn_ext.flash_attn_func: {name} must be a 4-D (batch, seqlen, heads, "
                                      f"headdim) tensor, got {tuple(t.shape)}")
    left, right = _band(causal, window_size, "flash_attn_func")
    try:
        out, lse, _ = _ops.fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alibi_slopes=alibi_slopes,
                               dropout_p=float(dropout_p), scale=softmax_scale, window_left=left, window_right=right,
                               bottom_right=True, softcap=float(softcap), deterministic=bool(deterministic))
    except (ValueError, TypeError) as e:
        raise translated(e) from None
    out = out.transpose(1, 2)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out
