// The backward's last step, shared by the FA2 (bwd_kernel.cuh) and Hopper (bwd_sm90.cuh)
// kernels: dQ = scale * dq_accum, the fp32 accumulator both add into.
#pragma once

#include <cstdint>

#include "../attention_params.h"
#include "grid.h"
#include "runtime.h"

namespace flashattn::cuda {

// dQ = scale * dq_accum, converted to the element type, through dQ's strides.
template <typename Element>
__global__ void dq_convert_kernel(const AttentionGradParams p, int dq_accum_row_stride) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;  // over batch * heads * seqlen_q
  if (row >= p.batch * p.num_heads * p.seqlen_q) return;
  const int64_t bh = row / p.seqlen_q, i = row % p.seqlen_q;
  const int64_t b = bh / p.num_heads, h = bh % p.num_heads;
  const float* src = p.dq_accum + row * dq_accum_row_stride;
  const float scale = static_cast<float>(p.softmax_scale);
  Element* dst = static_cast<Element*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + i * p.dq_row_stride;
  for (int d = threadIdx.x; d < p.headdim; d += blockDim.x) dst[d] = static_cast<Element>(src[d] * scale);
}

// The conversion over every row of dq_accum (row stride kHeadDim, the bucket); varlen as one
// dense sequence of its packed rows.
template <typename Element>
cudaError_t launch_dq_convert(const AttentionGradParams& p, int dq_accum_row_stride, cudaStream_t stream) {
  const AttentionGradParams rows_p = packed_rows(p);
  const int64_t rows = row_array_rows(rows_p);
  if (rows == 0) return cudaSuccess;
  FLASHATTN_LAUNCH(static_cast<unsigned>(ceil_div(rows, 8)), dim3(32, 8), 0, stream, dq_convert_kernel<Element>)(
      rows_p, dq_accum_row_stride);
  return cudaGetLastError();
}

}  // namespace flashattn::cuda
