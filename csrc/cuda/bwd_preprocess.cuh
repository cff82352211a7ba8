// Backward preprocessing: D = rowsum(dO o O) per query row (fp32), the term that lets the main
// backward kernel form dS = P o (dP - D) without the full softmax Jacobian. Any element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../attention_params.h"
#include "runtime.h"

namespace flashattn::cuda {

__device__ __forceinline__ float to_float_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float_acc(float x) { return x; }
__device__ __forceinline__ double to_float_acc(double x) { return x; }

// One warp per row; four rows per CTA.
template <typename T, typename Acc>
__global__ void __launch_bounds__(128) bwd_preprocess_kernel(const AttentionGradParams p) {
  const int64_t row = blockIdx.x * 4 + threadIdx.x / 32;  // over batch * heads * seqlen_q
  if (row >= p.batch * p.num_heads * p.seqlen_q) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / p.seqlen_q, i = row % p.seqlen_q;
  const int64_t b = bh / p.num_heads, h = bh % p.num_heads;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + i * p.do_row_stride;
  Acc sum = 0;
  for (int64_t d = lane; d < p.headdim_v; d += 32) sum += to_float_acc(o[d]) * to_float_acc(dout[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = static_cast<float>(sum);
}

}  // namespace flashattn::cuda
