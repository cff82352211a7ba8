// The op layer: the dispatcher ops' implementations shared by every device key, and the hooks a
// device backend provides. Validation happens here once, before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "attention_params.h"

namespace flashattn {

// Arguments every op takes besides the main tensors, in schema order.
struct AttentionOptions {
  std::optional<at::Tensor> attn_mask;
  std::optional<at::Tensor> alibi_slopes;
  std::optional<at::Tensor> block_mask;        // bool/uint8 (kept blocks) or int32 (see ops.cpp)
  std::optional<at::Tensor> block_elem_masks;  // (P, block_m, block_n) bool: partial blocks' element masks
  double dropout_p = 0.0;
  std::optional<double> scale;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  double softcap = 0.0;
  int64_t sparse_block_m = 128, sparse_block_n = 128;
};

// flashattn_ext::fwd — returns (out, lse, rng_state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const AttentionOptions& o);

// flashattn_ext::bwd — returns (dq, dk, dv, dmask); dmask is empty unless mask_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const AttentionOptions& o, bool deterministic, bool mask_grad);

// Debug switch for tests: fill every output buffer with NaN before the kernels run.
void set_poison_outputs(bool on);
bool poison_outputs();

// csrc/ops_emulated.cpp: the CUDA kernels on the host emulator, for CPU tensors while a test has
// switched it on (flashattn_ext.testing.emulated_cuda). emulator_load returns "" or why it failed.
std::string emulator_load(const std::string& path);
void emulator_configure(bool enabled, int schedule, int64_t seed, bool copies_land_at_issue, int64_t sm_major,
                        int64_t sm_minor);
bool emulating_cuda();
std::string emulator_compiled(bool headdims);
std::string emulator_selftest(const std::string& name, int schedule);  // the report, "" if none  // the emulated build's head-dim buckets or dtypes
void emulated_forward(AttentionParams& p, at::Tensor& rng_state);
void emulated_backward(AttentionGradParams& p, const at::Tensor& rng_state);
at::Tensor emulated_dropout_mask(AttentionParams& p, const at::Tensor& rng_state);

#ifdef FLASHATTN_WITH_CUDA
// csrc/ops_cuda.cpp: run the CUDA kernels on the current stream of q's device.
void cuda_forward(AttentionParams& p, const at::Tensor& q, at::Tensor& rng_state);
void cuda_backward(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& rng_state);
at::Tensor cuda_dropout_mask(AttentionParams& p, const at::Tensor& rng_state);
// (seed, offset) for a dropout call, drawn from torch's CUDA generator (graph-capture aware).
void cuda_draw_philox(AttentionParams& p, const at::Tensor& rng_state);
const char* cuda_build_archs();
const char* cuda_build_headdims();
const char* cuda_build_dtypes();
#endif

}  // namespace flashattn
