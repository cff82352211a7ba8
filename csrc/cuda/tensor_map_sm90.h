// The rank-4 tensor maps of the Hopper kernels (fwd_sm90.cuh, bwd_sm90.cuh): Q, K, V, dO as
// (head dim, rows, heads, batch) of 16-bit elements, host side.
#pragma once

#include <cstdint>

#include "ptx_sm90.h"

namespace flashattn::cuda {

namespace sm90_detail {
// A rank-4 map (head dim, rows, heads, batch) of 16-bit elements with boxes of 64 columns x
// box_rows rows, 128-byte swizzle. A dimension of extent 1 gets a nominal stride (its coordinate
// is always 0), so broadcast or arbitrary strides there do not refuse the map.
inline cudaError_t make_map(sm90::TensorMap* map, const void* base, int64_t cols, int64_t rows, int64_t heads,
                            int64_t batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride,
                            int box_rows) {
  const uint64_t dims[4] = {static_cast<uint64_t>(cols), static_cast<uint64_t>(rows), static_cast<uint64_t>(heads),
                            static_cast<uint64_t>(batch)};
  int64_t strides[3] = {row_stride, head_stride, batch_stride};
  int64_t span = cols;
  for (int i = 0; i < 3; ++i) {
    if (dims[i + 1] == 1) strides[i] = (span + 7) / 8 * 8;
    span = strides[i] * static_cast<int64_t>(dims[i + 1]);
  }
  uint64_t bytes[3];
  for (int i = 0; i < 3; ++i) {
    if (strides[i] <= 0) return cudaErrorNotSupported;
    bytes[i] = static_cast<uint64_t>(strides[i]) * 2;
  }
  const uint32_t box[4] = {64, static_cast<uint32_t>(box_rows), 1, 1};
  return sm90::encode_tensor_map(map, base, 4, 2, dims, bytes, box, 128) == cudaSuccess ? cudaSuccess
                                                                                       : cudaErrorNotSupported;
}
// A rank-1 map of `rows` fp32 values (the per-row lse / delta arrays), boxes of box_rows, no swizzle.
inline cudaError_t make_rows_map(sm90::TensorMap* map, const float* base, int64_t rows, int box_rows) {
  if (rows <= 0 || rows >= (int64_t{1} << 31)) return cudaErrorNotSupported;  // int32 coordinates
  const uint64_t dims[1] = {static_cast<uint64_t>(rows)};
  const uint32_t box[1] = {static_cast<uint32_t>(box_rows)};
  return sm90::encode_tensor_map(map, base, 1, 4, dims, nullptr, box, 0) == cudaSuccess ? cudaSuccess
                                                                                       : cudaErrorNotSupported;
}
}  // namespace sm90_detail

}  // namespace flashattn::cuda
