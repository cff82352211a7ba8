// Definition of launch_fwd_sm90 for one (dtype, head-dim bucket): the tensor maps of Q, K and V
// and the launch of fwd_sm90_kernel. Included only by the instantiations/fwd_sm90_*.cu files.
#pragma once

#include <cstdlib>

#include "fwd_sm90.cuh"
#include "grid.h"
#include "launch_templates.h"
#include "tensor_map_sm90.h"

namespace flashattn::cuda {

// cudaErrorNotSupported: the maps cannot describe these tensors (the caller takes the FA2 kernel).
template <typename Element, int kHeadDim>
cudaError_t launch_fwd_sm90(const AttentionParams& p, cudaStream_t stream) {
  using Traits = Sm90FwdTraits<Element, kHeadDim>;
  const int64_t m_blocks = ceil_div(p.seqlen_q, Traits::kBlockM);
  if (m_blocks == 0 || p.batch * p.num_heads == 0) return cudaSuccess;
  sm90::TensorMap tm_q, tm_k, tm_v;
  if (sm90_detail::make_qkv_maps(p, Traits::kBlockM, Traits::kBlockN, &tm_q, &tm_k, &tm_v) != cudaSuccess)
    return cudaErrorNotSupported;
  auto kernel = fwd_sm90_kernel<Traits>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Persistent: one CTA per SM (shared memory allows one), fewer if there are fewer work tiles.
  // FLASHATTN_CUDA_SM90_GRID caps the CTAs (tests make CTAs loop over several tiles with it).
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    sms = 132;
  if (const char* cap = std::getenv("FLASHATTN_CUDA_SM90_GRID"); cap && std::atoi(cap) > 0 && std::atoi(cap) < sms)
    sms = std::atoi(cap);
  const int64_t tiles = m_blocks * p.batch * p.num_heads;
  const unsigned grid = static_cast<unsigned>(tiles < sms ? tiles : sms);
  FLASHATTN_LAUNCH(grid, Traits::kThreads, Traits::kSmemBytes, stream, fwd_sm90_kernel<Traits>)(p, tm_q, tm_k, tm_v);
  return cudaGetLastError();
}

}  // namespace flashattn::cuda
