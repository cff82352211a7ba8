// The op layer's side of the CUDA kernels, shared by a GPU (ops_cuda.cpp) and the host emulator
// (ops_emulated.cpp): what the kernels need beyond what ops.cpp prepares for every backend — the
// backward's delta workspace — and the choice between the two.

#include "ops.h"

namespace flashattn {

namespace {

void forward_on_device(AttentionParams& p, const at::Tensor& q, at::Tensor& rng_state) {
  if (q.is_cpu()) return emulated_forward(p, rng_state);
#ifdef FLASHATTN_WITH_CUDA
  cuda_forward(p, q, rng_state);
#else
  TORCH_CHECK(false, "flashattn_ext was built without CUDA support; rebuild with a CUDA torch and nvcc");
#endif
}

void backward_on_device(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& rng_state) {
  if (q.is_cpu()) return emulated_backward(p, rng_state);
#ifdef FLASHATTN_WITH_CUDA
  cuda_backward(p, q, rng_state);
#else
  TORCH_CHECK(false, "flashattn_ext was built without CUDA support; rebuild with a CUDA torch and nvcc");
#endif
}

}  // namespace

void cuda_kernels_forward(AttentionParams& p, const at::Tensor& q, const at::Tensor& lse, at::Tensor& rng_state) {
  // A float64 lse only comes with float64 q, which runs on the SIMT path: it writes lse64 itself.
  TORCH_INTERNAL_ASSERT((p.lse64 != nullptr) == (lse.scalar_type() == at::kDouble) &&
                        (p.lse64 == nullptr || p.dtype == DType::kFloat64));
  forward_on_device(p, q, rng_state);
}

void cuda_kernels_backward(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& lse,
                           const at::Tensor& rng_state) {
  // delta = rowsum(dO * O) in the lse's precision: float64 for float64 q (the SIMT path).
  TORCH_INTERNAL_ASSERT((p.lse64 != nullptr) == (lse.scalar_type() == at::kDouble) &&
                        (p.lse64 == nullptr || p.dtype == DType::kFloat64));
  at::Tensor delta = at::empty({row_array_rows(p)}, q.options().dtype(lse.scalar_type()));
  if (p.lse64 != nullptr)
    p.delta64 = delta.data_ptr<double>();
  else
    p.delta = delta.data_ptr<float>();
  backward_on_device(p, q, rng_state);
}

SplitPlan cuda_kernels_split_plan(const AttentionParams& p, const at::Tensor& q, int64_t requested_splits) {
  if (q.is_cpu()) return emulated_split_plan(p, requested_splits);
#ifdef FLASHATTN_WITH_CUDA
  return cuda_split_plan(p, q, requested_splits);
#else
  TORCH_CHECK(false, "flashattn_ext was built without CUDA support");
#endif
}

at::Tensor cuda_kernels_dropout_mask(AttentionParams& p, const at::Tensor& q, const at::Tensor& rng_state) {
  if (q.is_cpu()) return emulated_dropout_mask(p, rng_state);
#ifdef FLASHATTN_WITH_CUDA
  return cuda_dropout_mask(p, rng_state);
#else
  TORCH_CHECK(false, "flashattn_ext was built without CUDA support");
#endif
}

}  // namespace flashattn
