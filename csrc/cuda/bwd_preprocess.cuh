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

// The per-row statistics in the accumulator's precision: float64 (the SIMT path's fp64) has its own
// arrays, lse64 and delta64, so its gradients keep float64 accuracy.
__device__ __forceinline__ float* row_lse(const AttentionParams& p, float) { return p.lse; }
__device__ __forceinline__ double* row_lse(const AttentionParams& p, double) { return p.lse64; }
__device__ __forceinline__ float* row_delta(const AttentionGradParams& p, float) { return p.delta; }
__device__ __forceinline__ double* row_delta(const AttentionGradParams& p, double) { return p.delta64; }

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
  if (lane == 0) row_delta(p, Acc{})[row] = sum;
}

}  // namespace flashattn::cuda
