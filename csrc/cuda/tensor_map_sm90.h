// The rank-4 tensor maps of the Hopper kernels (fwd_sm90.cuh, bwd_sm90.cuh): Q, K, V, dO as
// (head dim, rows, heads, batch) of 16-bit elements, host side.
#pragma once

#include <cstdint>

#include "../attention_params.h"
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
// Q, K, V of a call as rank-4 maps with boxes of box_q / box_kv rows: per sequence (dense), or,
// for varlen, over the packed rows as one batch (the kernels add a sequence's first row).
struct MapRows {
  int64_t q, k, batch;
};
inline MapRows map_rows(const AttentionParams& p) {
  return p.cu_seqlens_q != nullptr ? MapRows{p.total_q, p.total_k, 1} : MapRows{p.seqlen_q, p.seqlen_k, p.batch};
}
inline cudaError_t make_qkv_maps(const AttentionParams& p, int box_q, int box_kv, sm90::TensorMap* tm_q,
                                 sm90::TensorMap* tm_k, sm90::TensorMap* tm_v) {
  const MapRows r = map_rows(p);
  return make_map(tm_q, p.q, p.headdim, r.q, p.num_heads, r.batch, p.q_row_stride, p.q_head_stride,
                  p.q_batch_stride, box_q) == cudaSuccess &&
                 make_map(tm_k, p.k, p.headdim, r.k, p.num_heads_k, r.batch, p.k_row_stride, p.k_head_stride,
                          p.k_batch_stride, box_kv) == cudaSuccess &&
                 make_map(tm_v, p.v, p.headdim_v, r.k, p.num_heads_k, r.batch, p.v_row_stride, p.v_head_stride,
                          p.v_batch_stride, box_kv) == cudaSuccess
             ? cudaSuccess
             : cudaErrorNotSupported;
}
}  // namespace sm90_detail

}  // namespace flashattn::cuda
