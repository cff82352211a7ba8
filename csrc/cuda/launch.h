// The interface between the op layer (csrc/ops_cuda.cpp) and the CUDA kernels. Torch-free.
#pragma once

#include "runtime.h"

#include <cstddef>

#include "../attention_params.h"

namespace flashattn::cuda {

// Why the tensor-core path cannot take these params, or nullptr if it can. The op layer routes
// what the tensor-core path refuses to the SIMT path (fp32, fp64, head dims > 256, pre-sm80).
const char* fwd_unsupported_reason(const AttentionParams& p, int sm_major, int sm_minor);

// Scratch the backward needs (fp32 dQ accumulator, deterministic-mode semaphores, GQA dK/dV
// accumulators, ...), in bytes. The op layer allocates it (256-byte aligned, contents undefined)
// and passes it to run_bwd, which partitions it, zeroes what must start at zero on the stream,
// and fills AttentionGradParams::dq_accum / dq_semaphore itself. delta (batch * num_heads *
// seqlen_q floats) is allocated by the op layer and passed in AttentionGradParams::delta.
size_t bwd_workspace_bytes(const AttentionGradParams& p, int sm_major, int sm_minor);

// Split-KV and paging for a varlen forward (p.cu_seqlens_q set; the KV cache): where the
// tensor-core kernels take the call, num_splits is the split count (the requested one (>= 1)
// capped at kMaxSplits and the key blocks of the longest sequence, or for 0 the count that fills
// the GPU's SMs), and page_multiple, where the kernel can read a paged cache in place
// (p.block_table), its key block: a page size that is a multiple of it is read in place, others
// are gathered (0: always gathered). Elsewhere (SIMT, dense calls) {1, 0}: no split, no paging.
// With num_splits > 1 the op layer allocates p.partial_out / partial_lse (attention_params.h).
constexpr int kMaxSplits = 128;
struct FwdSplitPlan {
  int num_splits = 1;
  int page_multiple = 0;
};
FwdSplitPlan fwd_split_plan(const AttentionParams& p, int requested_splits, int sm_major, int sm_minor);

// Forward: writes out and lse. Backward: writes dq, dk, dv (and dmask when set). Each returns
// the first CUDA error it met (a launch or an attribute call), cudaSuccess otherwise; the op
// layer turns an error into a Python exception.
cudaError_t run_fwd(const AttentionParams& p, cudaStream_t stream, int sm_major, int sm_minor);
cudaError_t run_bwd(const AttentionGradParams& p, void* workspace, cudaStream_t stream, int sm_major, int sm_minor);

// Test-only: writes the dropout keep mask (batch, num_heads, seqlen_q, seqlen_k) as uint8 using
// the exact Philox stream of the kernels.
cudaError_t run_dropout_mask(const AttentionParams& p, uint8_t* keep, cudaStream_t stream);

// Build information for flashattn_ext.build_info().
const char* compiled_archs();
const char* compiled_headdims();
const char* compiled_dtypes();

}  // namespace flashattn::cuda
