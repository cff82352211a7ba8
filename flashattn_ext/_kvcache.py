"""flash_attn_with_kvcache: flash-attn 2's decode entry point (forward only). Argument
normalisation only; csrc/ops_kvcache.cpp validates every input once and appends in place."""

import torch

from ._api import _band

_ops = torch.ops.flashattn_ext


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q (batch, seqlen_q, heads, headdim) against a KV cache, appending k, v first.

    k_cache, v_cache: (batch_cache, seqlen_cache, heads_k, headdim), or with block_table (batch,
        max_blocks) int32 a paged cache (num_blocks, page_block_size, heads_k, headdim).
    k, v: (batch, seqlen_new, heads_k, headdim) written into the cache in place at positions
        cache_seqlens[b] ... (rotated first when rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2)
        are given; q is rotated too, at cache_seqlens[b] + i when causal or local, else at
        cache_seqlens[b]). rotary_interleaved: pairs (0, 1), (2, 3), ... (True) or GPT-NeoX halves.
    cache_seqlens: int or int32 (batch,): each batch's cache length before the append.
    cache_batch_idx: (batch,) cache rows to use; cache_leftpad: (batch,) first valid position.
    causal / window_size aligned bottom-right. num_splits: split-KV count, 0 = chosen.
    Returns out (batch, seqlen_q, heads, headdim_v), and with return_softmax_lse the lse (batch, heads, seqlen_q).
    """
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    left, right = _band(False, window_size, "flash_attn_with_kvcache")  # validated as everywhere; causal is the op's
    out, lse = _ops.fwd_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                cache_leftpad, block_table, softmax_scale, bool(causal), left, right, float(softcap),
                                bool(rotary_interleaved), alibi_slopes, int(num_splits))
    return (out, lse) if return_softmax_lse else out
