// Autocast kernels for flashattn_ext::fwd: what torch does for scaled_dot_product_attention, a
// lower_precision_fp op under autocast. Floating q, k, v and a floating attn_mask are cast to the
// autocast dtype of their device (float64 and bool stay, as at::autocast::cached_cast leaves them),
// then the op is called again below the Autocast key. alibi_slopes stays float32 (the op's
// contract) and the block masks are integer. The backward needs no kernel: it runs on the
// forward's (already cast) saved tensors.

#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "ops.h"

namespace flashattn {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_autocast(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v FLASHATTN_OPTIONS_PARAMS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType to = at::autocast::get_lower_precision_fp_from_device_type(device_type);
  AttentionOptions options = FLASHATTN_OPTIONS_FROM_PARAMS();
  if (options.attn_mask && options.attn_mask->defined() && options.attn_mask->is_floating_point())
    options.attn_mask = at::autocast::cached_cast(to, *options.attn_mask, device_type);
  return call_fwd_op(at::autocast::cached_cast(to, q, device_type), at::autocast::cached_cast(to, k, device_type),
                     at::autocast::cached_cast(to, v, device_type), options);
}

static_assert(std::is_same_v<decltype(fwd_autocast<c10::DeviceType::CPU>), FwdSignature>);

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_IMPL(flashattn_ext, AutocastCPU, m) { m.impl("fwd", &flashattn::fwd_autocast<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(flashattn_ext, AutocastCUDA, m) {
  m.impl("fwd", &flashattn::fwd_autocast<c10::DeviceType::CUDA>);
}
