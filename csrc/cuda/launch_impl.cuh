// Definitions of launch_fwd / launch_bwd for one (dtype, head-dim bucket); included only by the
// instantiation files, one translation unit each (compile time scales with the buckets built).
#pragma once

#include "bwd_kernel.cuh"
#include "dq_convert.cuh"
#include "fwd_kernel.cuh"
#include "grid.h"
#include "kernel_configs.h"
#include "launch_templates.h"
#include "split_combine.cuh"

namespace flashattn::cuda {

template <class Traits, bool kVarlen = false>
cudaError_t launch_fwd_kernel(const AttentionParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  const int64_t m_blocks = ceil_div(p.seqlen_q, Traits::kBlockM);
  if (m_blocks == 0 || p.batch * p.num_heads == 0) return cudaSuccess;
  auto kernel = fwd_kernel<Traits, kVarlen>;
  constexpr int smem_bytes = Traits::kSmemBytes;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t splits = kVarlen && p.num_splits > 1 ? p.num_splits : 1;  // split-KV: blocks per query block
  FLASHATTN_LAUNCH(tile_grid(m_blocks * splits, p.batch * p.num_heads), Traits::kThreads, smem_bytes, stream,
                   fwd_kernel<Traits, kVarlen>)(p, opt.vectorized);
  return cudaGetLastError();
}

// Varlen (p.cu_seqlens_q set) has kernels of its own (kernel_configs.h: TraitsVarlen*), and
// with p.num_splits > 1 the combine after them.
template <typename Element, int kHeadDim>
cudaError_t launch_fwd(const AttentionParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  using Config = FwdConfig<Element, kHeadDim>;
  if (p.cu_seqlens_q != nullptr) {
    const cudaError_t err = opt.extras ? launch_fwd_kernel<typename Config::TraitsVarlenExtras, true>(p, opt, stream)
                                       : launch_fwd_kernel<typename Config::TraitsVarlen, true>(p, opt, stream);
    if (err != cudaSuccess || p.num_splits <= 1 || row_array_rows(p) == 0) return err;
    FLASHATTN_LAUNCH(static_cast<unsigned>(ceil_div(row_array_rows(p), kCombineWarps)), 32 * kCombineWarps, 0,
                     stream, split_combine_kernel<Element>)(p);
    return cudaGetLastError();
  }
  if (opt.extras) return launch_fwd_kernel<typename Config::TraitsExtras>(p, opt, stream);
  if (opt.kv_stages == 2 && Config::TraitsPipelined::kStages == 2)
    return launch_fwd_kernel<typename Config::TraitsPipelined>(p, opt, stream);
  return launch_fwd_kernel<typename Config::Traits>(p, opt, stream);
}

template <class Traits, bool kVarlen = false>
cudaError_t launch_bwd_kernel(const AttentionGradParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  const int64_t n_blocks = ceil_div(p.seqlen_k, Traits::kBlockN);
  if (n_blocks == 0 || p.batch * p.num_heads_k == 0) return cudaSuccess;
  auto kernel = bwd_kernel<Traits, kVarlen>;
  constexpr int smem_bytes = Traits::kSmemBytes;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  FLASHATTN_LAUNCH(tile_grid(n_blocks, p.batch * p.num_heads_k), Traits::kThreads, smem_bytes, stream,
                   bwd_kernel<Traits, kVarlen>)(p, opt.vectorized);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim>
cudaError_t launch_bwd(const AttentionGradParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  using Config = BwdConfig<Element, kHeadDim>;
  const bool varlen = p.cu_seqlens_q != nullptr;  // kernels of its own, as in launch_fwd
  const cudaError_t err =
      varlen ? (opt.extras ? launch_bwd_kernel<typename Config::TraitsVarlenExtras, true>(p, opt, stream)
                           : launch_bwd_kernel<typename Config::TraitsVarlen, true>(p, opt, stream))
             : (opt.extras ? launch_bwd_kernel<typename Config::TraitsExtras>(p, opt, stream)
                           : launch_bwd_kernel<typename Config::Traits>(p, opt, stream));
  if (err != cudaSuccess) return err;
  return launch_dq_convert<Element>(p, kHeadDim, stream);
}

}  // namespace flashattn::cuda
