// What the decode kernels know about a flash_attn_with_kvcache call (torch-free, like
// AttentionParams): the attention over each batch row's cache, after the op layer has appended
// the new keys/values and applied the rotary embedding.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace flashattn {

struct KvCacheParams {
  // q, out: (batch, seqlen_q, heads, dim) through the *_batch/head/row strides; lse (batch, heads,
  // seqlen_q) contiguous. k, v: the cache. Contiguous cache: (cache_batch, seqlen_cache, heads_k,
  // dim) with k_batch_stride between cache rows of batch; paged: (num_blocks, page_block_size,
  // heads_k, dim) with k_batch_stride between pages. bottom_right is set (flash-attn's alignment);
  // seqlen_k is unused (per batch below).
  AttentionParams attn;

  const int32_t* seqlens_k = nullptr;        // (batch,) keys batch b attends to, counted from its first key
  const int64_t* cache_batch_idx = nullptr;  // (batch,) cache row of batch b, or null (= b)
  const int32_t* leftpad = nullptr;          // (batch,) first cache position of batch b, or null (= 0)
  const int32_t* block_table = nullptr;      // (batch, max_blocks) pages of batch b, or null (contiguous)
  int64_t block_table_batch_stride = 0;
  int64_t page_block_size = 0;

  // Split-KV (flash-decoding): each (batch, kv head) key range is cut into num_splits parts whose
  // partial outputs (normalised) and lse are merged with the lse weights. Workspaces (acc type,
  // float or double) of num_splits * batch * heads * seqlen_q * (headdim_v | 1) when num_splits > 1.
  int64_t num_splits = 1;
  void* partial_out = nullptr;
  void* partial_lse = nullptr;
};
// The decode kernels' entry points are declared with the others in cpu/kernels.h.

}  // namespace flashattn
