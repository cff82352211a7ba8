// The op layer: the dispatcher ops' implementations shared by every device key, and the hooks a
// device backend provides. Validation happens here once, before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <initializer_list>
#include <tuple>

#include "attention_params.h"
#include "op_options.h"

namespace flashattn {

// The ops' C++ signatures, derived from the option rows of op_options.h: every kernel registered
// for the ops (ops.cpp, autograd.cpp) has exactly these, and redispatches go through them.
using FwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v FLASHATTN_OPTIONS_TYPES);
using BwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state FLASHATTN_OPTIONS_TYPES, bool mask_grad);

// flashattn_ext::fwd — returns (out, lse, rng_state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const AttentionOptions& o);

// flashattn_ext::bwd — returns (dq, dk, dv, dmask); dmask is empty unless mask_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const AttentionOptions& o, bool mask_grad);

// Calls of the ops through the dispatcher (from below the Autograd key, e.g. the autograd
// functions), the options spread into the schema's arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const AttentionOptions& options);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const AttentionOptions& options, bool mask_grad);

// CUDA tensors, and CPU tensors while the host emulator is on (tests), take the CUDA kernels'
// launch path (csrc/cuda/launch.h); other CPU tensors the CPU kernels.
bool runs_cuda_kernels(const at::Tensor& q);

// The params' lse pointer: lse64 for a float64 lse, else lse.
void set_lse(AttentionParams& p, const at::Tensor& lse);

// A paged cache's block_table checked (int32, on q's device, (batch, >= 1 pages), entries index the
// cache's num_blocks pages; `cache` names it in errors) and read into host memory (ops_kvcache.cpp).
at::Tensor checked_block_table(const at::Tensor& block_table, int64_t batch, int64_t num_blocks, const char* cache,
                               const at::Tensor& q);

// The CUDA kernels' forward (a GPU, or the emulator) on packed (rows, heads, dim) q/k/v/out in one
// launch (ops_varlen.cpp): sequence b has query rows [cu_q[b], cu_q[b + 1]) and key rows
// [cu_k[b], cu_k[b + 1]), or [cu_k[b], cu_k[b] + used_k[b]) when used_k is given (cu_k then holds
// start rows: a KV cache). int32 tensors, checked by the caller; longest_*: the largest lengths.
// lse: (heads, total_q).
struct PackedSequences {
  at::Tensor cu_q, cu_k, used_k;
  int64_t longest_q = 0, longest_k = 0;
};
// A KV cache for cuda_packed_forward (ops_kvcache.cpp): a paged cache read in place (block_table,
// int32 (batch, pages); k / v are then the pages seen as rows, (num_blocks * page, heads_k, dim),
// with s.cu_k all 0) and the split-KV count asked for (0: the kernels' plan chooses).
struct PackedCache {
  at::Tensor block_table;
  int64_t page_block_size = 0, k_page_stride = 0, v_page_stride = 0;
  int64_t num_splits = 1;
};
void cuda_packed_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedSequences& s,
                         const AttentionOptions& o, at::Tensor& out, at::Tensor& lse, at::Tensor& rng_state,
                         const PackedCache* cache = nullptr);
// The kernels' split-KV / paging plan for that call (cuda/launch.h fwd_split_plan): a paged cache
// whose page size is a multiple of page_multiple (> 0) is read in place, otherwise gathered first.
struct SplitPlan {
  int num_splits = 1, page_multiple = 0;
};
SplitPlan cuda_packed_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedSequences& s,
                           const AttentionOptions& o, int64_t requested_splits);

// The op layer's checks of (..., heads, seq, dim) query/key/value and the options, and the kernels'
// dtype tag: for other ops' layers (ops_varlen.cpp, ops_kvcache.cpp).
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o);
DType kernel_dtype(at::ScalarType t);

// The CPU backward on checked params, with its dQ accumulation buffer (q_options: device/dtype of q).
void run_cpu_backward(AttentionGradParams& p, const at::TensorOptions& q_options);

// (min, max) of an int32 block_mask, read once per tensor version (a device sync on CUDA).
std::pair<int64_t, int64_t> block_mask_range(const at::Tensor& bm);

// float32, or float64 for float64 inputs: the lse's dtype and the kernels' accumulation type.
at::ScalarType lse_dtype(const at::Tensor& q);
// Fills the floating tensors with NaN when set_poison_outputs(true) (outputs, before the kernels run).
void poison(std::initializer_list<at::Tensor> ts);

// Debug switch for tests: fill every output buffer with NaN before the kernels run.
void set_poison_outputs(bool on);
bool poison_outputs();

// csrc/ops_cuda_kernels.cpp: the CUDA kernels' launch path for CUDA tensors, and for CPU tensors
// while the host emulator is on. The backward zeroes p.dmask itself (through its strides).
void cuda_kernels_forward(AttentionParams& p, const at::Tensor& q, const at::Tensor& lse, at::Tensor& rng_state);
void cuda_kernels_backward(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& lse,
                           const at::Tensor& rng_state);
at::Tensor cuda_kernels_dropout_mask(AttentionParams& p, const at::Tensor& q, const at::Tensor& rng_state);
SplitPlan cuda_kernels_split_plan(const AttentionParams& p, const at::Tensor& q, int64_t requested_splits);

// csrc/ops_emulated.cpp: the CUDA kernels on the host emulator, for CPU tensors while a test has
// switched it on (flashattn_ext.testing.emulated_cuda). emulator_load returns "" or why it failed.
std::string emulator_load(const std::string& path);
void emulator_configure(bool enabled, int schedule, int64_t seed, bool copies_land_at_issue, int64_t sm_major,
                        int64_t sm_minor, bool hopper);
bool emulating_cuda();
std::vector<int64_t> emulator_stats();  // launches, blocks, threads run by the emulator so far
std::string emulator_compiled(bool headdims);  // the emulated build's head-dim buckets or dtypes
std::string emulator_selftest(const std::string& name, int schedule);  // the report, "" if none
void emulated_forward(AttentionParams& p, at::Tensor& rng_state);
void emulated_backward(AttentionGradParams& p, const at::Tensor& rng_state);
at::Tensor emulated_dropout_mask(AttentionParams& p, const at::Tensor& rng_state);
SplitPlan emulated_split_plan(const AttentionParams& p, int64_t requested_splits);

#ifdef FLASHATTN_WITH_CUDA
// csrc/ops_cuda.cpp: run the CUDA kernels on the current stream of q's device.
void cuda_forward(AttentionParams& p, const at::Tensor& q, at::Tensor& rng_state);
void cuda_backward(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& rng_state);
at::Tensor cuda_dropout_mask(AttentionParams& p, const at::Tensor& rng_state);
SplitPlan cuda_split_plan(const AttentionParams& p, const at::Tensor& q, int64_t requested_splits);
// (seed, offset) for a dropout call, drawn from torch's CUDA generator (graph-capture aware).
void cuda_draw_philox(AttentionParams& p, const at::Tensor& rng_state);
// Whether the current stream of t's device is capturing a CUDA graph (host reads of device
// tensors are illegal then).
bool cuda_stream_capturing(const at::Tensor& t);
const char* cuda_build_archs();
const char* cuda_build_headdims();
const char* cuda_build_dtypes();
#endif

}  // namespace flashattn
