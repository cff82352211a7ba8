// Per-(dtype, head-dim bucket) launchers, each defined in one instantiations/*.cu translation unit.
#pragma once

#include "runtime.h"

#include "../attention_params.h"

namespace flashattn::cuda {

// Extra launch state that is CUDA-only (not part of AttentionParams).
struct LaunchOptions {
  bool vectorized = true;  // 16-byte aligned pointers and row/head/batch strides: cp.async path
  bool extras = false;     // attn_mask, dropout, ALiBi, softcap, block mask or scale <= 0 present
  int kv_stages = 1;       // forward K/V pipeline: 1 (interleaved buffers) or 2 (two-stage ring)
};

template <typename Element, int kHeadDim>
cudaError_t launch_fwd(const AttentionParams& p, const LaunchOptions& opt, cudaStream_t stream);

// The Hopper forward (sm_90a, fwd_sm90.cuh) of a bucket in FLASHATTN_CUDA_SM90_HEADDIMS; plain
// attention only (no extras). cudaErrorNotSupported if the tensors cannot be mapped for TMA.
template <typename Element, int kHeadDim>
cudaError_t launch_fwd_sm90(const AttentionParams& p, cudaStream_t stream);

// The Hopper backward (sm_90a, bwd_sm90.cuh) of a bucket in FLASHATTN_CUDA_SM90_BWD_HEADDIMS,
// plain attention (dense or varlen); dq_accum and dq_semaphore as for launch_bwd (its dq_convert included).
// cudaErrorNotSupported, before anything ran, if the tensors cannot be mapped for TMA.
template <typename Element, int kHeadDim>
cudaError_t launch_bwd_sm90(const AttentionGradParams& p, cudaStream_t stream);

// dq_accum: fp32 (batch, num_heads, seqlen_q, kHeadDim), zeroed; dq_semaphore: int32
// (batch, num_heads, query blocks), zeroed (deterministic mode only). Both set in p.
template <typename Element, int kHeadDim>
cudaError_t launch_bwd(const AttentionGradParams& p, const LaunchOptions& opt, cudaStream_t stream);

}  // namespace flashattn::cuda
