"""flash-attn 2's packed and variable-length entry points: argument normalisation only. Checks and
math live in C++ (csrc/ops_varlen.cpp validates every input once, naming the argument).

Layouts as flash-attn: varlen tensors are (total_tokens, heads, headdim) with int32 cu_seqlens of
batch + 1 cumulative lengths; causal and window_size are aligned bottom-right per sequence; lse is
float32 (heads, total_q) (float64 for float64 inputs). return_attn_probs=True returns
(out, lse, None): the probabilities themselves are not materialised (flash-attn returns them only
for testing, with dropout)."""

import torch

from ._api import _band, flash_attn_func

_ops = torch.ops.flashattn_ext


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over sequences packed without padding.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); Hq a multiple of Hk (GQA/MQA).
    cu_seqlens_q / cu_seqlens_k: int32 (batch + 1,), sequence b owns rows [cu[b], cu[b + 1]).
    max_seqlen_q / max_seqlen_k: at least the longest sequence. Zero-length sequences are allowed
    (a query with no key gets out = 0, lse = -inf). alibi_slopes: float32 (Hq,) or (batch, Hq).
    block_table: int32 (batch, max_blocks_per_seq) with k, v paged caches (num_blocks,
    page_block_size, Hk, D): sequence b's keys are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b]
    positions read through block_table[b] (gathered into packed rows first, so gradients reach the
    pages; flash_attn_with_kvcache reads a paged cache in place).
    Returns out (total_q, Hq, Dv), with return_attn_probs also (lse, None).
    """
    if block_table is not None:
        k = _ops.varlen_paged_rows(k, block_table, cu_seqlens_k, "k")
        v = _ops.varlen_paged_rows(v, block_table, cu_seqlens_k, "v")
    left, right = _band(causal, window_size, "flash_attn_varlen_func")
    out, lse, _ = _ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                  alibi_slopes=alibi_slopes, dropout_p=float(dropout_p), scale=softmax_scale,
                                  window_left=left, window_right=right, bottom_right=True, softcap=float(softcap),
                                  deterministic=bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def _unpack(x, n, dim, name, func):
    if not isinstance(x, torch.Tensor) or x.dim() <= dim or x.shape[dim] != n:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"flashattn_ext.{func}: {name} must have size {n} at dim {dim}, got {got}")
    return x.unbind(dim)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D): q, k, v as views (no copy)."""
    q, k, v = _unpack(qkv, 3, 1, "qkv", "flash_attn_varlen_qkvpacked_func")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, Hq, D), kv (total_k, 2, Hk, D)."""
    k, v = _unpack(kv, 2, 1, "kv", "flash_attn_varlen_kvpacked_func")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs):
    out = flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_lse=return_attn_probs)
    return (*out, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D): flash_attn_func on its q, k, v views. With return_attn_probs:
    (out, lse (B, H, S), None)."""
    q, k, v = _unpack(qkv, 3, 2, "qkv", "flash_attn_qkvpacked_func")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, L, Hq, D), kv (B, S, 2, Hk, D)."""
    k, v = _unpack(kv, 2, 2, "kv", "flash_attn_kvpacked_func")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)
