// Launch-grid helpers shared by the launchers (host side).
#pragma once

#include "../attention_params.h"
#include "runtime.h"

#include <cstdint>

namespace flashattn::cuda {

// blockIdx.x = tile index; the (batch, head) index is blockIdx.y + gridDim.y * blockIdx.z, so any
// batch * heads fits (gridDim.y and gridDim.z stop at 65535). Kernels return for the excess.
inline dim3 tile_grid(int64_t tiles, int64_t batch_heads) {
  const int64_t y = batch_heads < 65535 ? batch_heads : 65535;
  const int64_t z = (batch_heads + y - 1) / y;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// Row-wise kernels (delta, the dQ conversion) see a varlen call as one dense sequence of all its
// total_q packed rows: the per-row arrays ((heads, total_q)) then have the dense layout.
inline AttentionGradParams packed_rows(const AttentionGradParams& p) {
  if (p.cu_seqlens_q == nullptr) return p;
  AttentionGradParams flat = p;
  flat.batch = 1;
  flat.seqlen_q = p.total_q;
  flat.cu_seqlens_q = flat.cu_seqlens_k = nullptr;
  return flat;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace flashattn::cuda
