// What removes scores of a tile, shared by the forward and backward kernels: the band (causal /
// sliding window, top-left or bottom-right) and the key bound reduce to one visible key interval
// per query row; a tile the attn_mask removes entirely is found by a block-wide vote.
#pragma once

#include <cstdint>

#include "../attention_params.h"
#include "runtime.h"
#include "score_mod.h"

namespace flashattn::cuda {

// Keys [lo, hi) of the tile columns [n0, n0 + kWidth) that query row i sees (tile-relative; empty
// for a row past the sequence end).
struct KeyInterval {
  int lo, hi;
};
template <int kWidth, class P>
__device__ __forceinline__ KeyInterval band_interval(const P& p, int64_t i, int64_t n0) {
  const int64_t begin = band_key_begin(p, i) - n0, end = band_key_end(p, i) - n0;
  const int lo = static_cast<int>(begin < 0 ? 0 : (begin > kWidth ? kWidth : begin));
  const int hi = i >= p.seqlen_q ? 0 : static_cast<int>(end < 0 ? 0 : (end > kWidth ? kWidth : end));
  return {lo, hi};
}

// Whether the attn_mask removes every element of the tile (all false / -inf): each thread passes
// the (query, key) of its elements to `visit` through for_each_element(visit); one
// __syncthreads_or decides for the whole block, so every thread takes the same branch after it.
template <class ForEachElement>
__device__ __forceinline__ bool tile_masked_out(const AttentionParams& p, const ScoreMods& mods,
                                                ForEachElement&& for_each_element) {
  bool any = false;
  for_each_element([&](int64_t i, int64_t j) {
    if (i < p.seqlen_q && j < p.seqlen_k) any = any || mods.mask_allows(p, i, j);
  });
  return !__syncthreads_or(any);
}

}  // namespace flashattn::cuda
