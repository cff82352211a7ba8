// Autocast kernels for the attention ops that take floating q/k/v (fwd, varlen_fwd): what torch
// does for scaled_dot_product_attention, a lower_precision_fp op under autocast. The arguments named
// q, k, v and a floating attn_mask are cast to the autocast dtype of their device (float64 and bool
// stay, as at::autocast::cached_cast leaves them), then the op is called again below the Autocast
// key. alibi_slopes stays float32 (the ops' contract); cu_seqlens and block masks are integer. One
// boxed kernel serves every such op. No kernel for the backwards: they run on the forwards' (cast)
// saved tensors. fwd_kvcache has none: it appends into the caches in place, so its inputs must
// already have the caches' dtype.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace flashattn {
namespace {

bool cast_under_autocast(const std::string& name) {
  return name == "q" || name == "k" || name == "v" || name == "attn_mask";
}

template <c10::DeviceType device_type>
void attention_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType to = at::autocast::get_lower_precision_fp_from_device_type(device_type);
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    c10::IValue& value = (*stack)[first + i];
    if (!cast_under_autocast(args[i].name()) || !value.isTensor()) continue;
    const at::Tensor& t = value.toTensor();
    if (t.defined() && t.is_floating_point()) value = at::autocast::cached_cast(to, t, device_type);
  }
  op.callBoxed(stack);
}

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_IMPL(flashattn_ext, AutocastCPU, m) {
  m.impl("fwd", torch::CppFunction::makeFromBoxedFunction<&flashattn::attention_autocast<c10::DeviceType::CPU>>());
  m.impl("varlen_fwd",
         torch::CppFunction::makeFromBoxedFunction<&flashattn::attention_autocast<c10::DeviceType::CPU>>());
}

TORCH_LIBRARY_IMPL(flashattn_ext, AutocastCUDA, m) {
  m.impl("fwd", torch::CppFunction::makeFromBoxedFunction<&flashattn::attention_autocast<c10::DeviceType::CUDA>>());
  m.impl("varlen_fwd",
         torch::CppFunction::makeFromBoxedFunction<&flashattn::attention_autocast<c10::DeviceType::CUDA>>());
}
