// Split-KV combine (flash-decoding): the num_splits partial results of a varlen forward
// (AttentionParams::partial_out / partial_lse, fp32) merged into out and lse:
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) * O_s
// A split whose keys a row does not see has lse_s = -inf and weight 0; a row no split saw gets
// out = 0, lse = -inf, as the unsplit kernel writes. One warp per (head, packed row).
#pragma once

#include <cmath>
#include <cstdint>

#include "../attention_params.h"
#include "runtime.h"

namespace flashattn::cuda {

constexpr int kCombineWarps = 8;

template <typename Element>
__global__ void __launch_bounds__(32 * kCombineWarps) split_combine_kernel(const AttentionParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;  // (heads, total_q)
  if (r >= row_array_rows(p)) return;
  const int lane = threadIdx.x % 32;
  const int splits = p.num_splits;
  float row_max = -INFINITY;
  for (int s = lane; s < splits; s += 32) row_max = fmaxf(row_max, p.partial_lse[split_row(p, s, r)]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
  float sum = 0.f;
  if (row_max > -INFINITY)
    for (int s = lane; s < splits; s += 32) sum += expf(p.partial_lse[split_row(p, s, r)] - row_max);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const bool empty = !(row_max > -INFINITY);
  const float lse = empty ? -INFINITY : row_max + logf(sum);

  const int64_t h = r / p.total_q, i = r % p.total_q;
  Element* out = static_cast<Element*>(p.out) + h * p.o_head_stride + i * p.o_row_stride;
  for (int64_t d = lane; d < p.headdim_v; d += 32) {
    float acc = 0.f;
    if (!empty)
      for (int s = 0; s < splits; ++s) {
        const float w = expf(p.partial_lse[split_row(p, s, r)] - lse);  // 0 for an empty split
        if (w > 0.f) acc += w * p.partial_out[split_row(p, s, r) * p.headdim_v + d];
      }
    out[d] = static_cast<Element>(acc);
  }
  if (lane == 0) p.lse[r] = lse;
}

}  // namespace flashattn::cuda
