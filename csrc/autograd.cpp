// The C++ autograd function for flashattn_ext::fwd, registered at the Autograd dispatch key:
// forward saves (q, k, v, out, lse, rng_state), the tensor options and, as one unit, the other
// options; backward calls flashattn_ext::bwd, which recomputes the probabilities tile by tile from
// lse. Signatures come from the option rows of op_options.h.

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace flashattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The inputs of the autograd functions: the leading tensors, then the tensor options in row order
// (so autograd sees them and attn_mask can take a gradient), then the whole options unit.
constexpr size_t kFwdTensors = 3;                      // q, k, v
constexpr size_t kAttnMaskInput = kFwdTensors;         // attn_mask is the first row of FLASHATTN_OPTIONS
constexpr size_t kFwdInputs = kFwdTensors + AttentionOptions::kTensorCount + 1;
constexpr size_t kSavedTensors = 6;                    // q, k, v, out, lse, rng_state

struct SavedValues : torch::CustomClassHolder {
  explicit SavedValues(const AttentionValues& v) : values(v) {}
  AttentionValues values;
};

class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v FLASHATTN_TENSOR_OPTIONS_PARAMS, const AttentionOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, rng_state] = call_fwd_op(q, k, v, options);
    std::vector<at::Tensor> saved = {q, k, v, out, lse, rng_state};
    for (const at::Tensor& t : options.tensors()) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->saved_data["values"] =
        c10::IValue::make_capsule(c10::make_intrusive<SavedValues>(static_cast<const AttentionValues&>(options)));
    ctx->mark_non_differentiable({lse, rng_state});
    return {out, lse, rng_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4],
                     &rng_state = saved[5];
    AttentionOptions o;
    static_cast<AttentionValues&>(o) =
        static_cast<const SavedValues*>(ctx->saved_data["values"].toCapsule().get())->values;
    o.set_tensors(saved, kSavedTensors);
    o.deterministic = o.deterministic || at::globalContext().deterministicAlgorithms();
    const bool mask_grad = o.attn_mask && o.attn_mask->is_floating_point() && ctx->needs_input_grad(kAttnMaskInput);
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    auto [dq, dk, dv, dmask] = call_bwd_op(grad_out, q, k, v, out, lse, rng_state, o, mask_grad);
    variable_list grad_inputs(kFwdInputs);
    grad_inputs[0] = dq, grad_inputs[1] = dk, grad_inputs[2] = dv;
    if (mask_grad) grad_inputs[kAttnMaskInput] = dmask;
    return grad_inputs;
  }
};

// flashattn_ext::bwd under autograd (create_graph=True): its results can be used, but
// differentiating them again is refused with a clear error instead of silently giving zeros.
class FlashAttentionBackwardFunction : public torch::autograd::Function<FlashAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& rng_state FLASHATTN_TENSOR_OPTIONS_PARAMS,
                               const AttentionOptions& options, bool mask_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dmask] = call_bwd_op(grad_out, q, k, v, out, lse, rng_state, options, mask_grad);
    return {dq, dk, dv, dmask};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "flashattn_ext: double backward (a gradient of the attention gradients) is not supported; "
                "use torch.nn.functional.scaled_dot_product_attention's math backend for higher-order gradients");
  }
};

// Whether a call must build an autograd node: grad mode on and some input requiring grad, or a
// forward-mode (dual) input, which Function::apply reports as unsupported.
bool needs_graph(std::initializer_list<const at::Tensor*> inputs) {
  const bool grad = at::GradMode::is_enabled();
  for (const at::Tensor* t : inputs) {
    if (t == nullptr || !t->defined()) continue;
    if ((grad && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v FLASHATTN_OPTIONS_PARAMS) {
  TORCH_CHECK_VALUE(!(alibi_slopes && alibi_slopes->defined() && alibi_slopes->requires_grad() &&
                      at::GradMode::is_enabled()),
                    "flashattn_ext: alibi_slopes requires grad, but the ALiBi slopes get no gradient here; pass "
                    "alibi_slopes.detach() (or learn the slopes with a float attn_mask, which gets its gradient)");
  if (!needs_graph({&q, &k, &v FLASHATTN_TENSOR_OPTIONS_ADDRS})) {
    // Nothing to differentiate (no_grad, inference, or no input requiring grad): no autograd node,
    // context or saved tensors, the commonest case at decode, where they are most of a call's cost.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd_op(q, k, v, FLASHATTN_OPTIONS_FROM_PARAMS());
  }
  auto outs = FlashAttentionFunction::apply(q, k, v FLASHATTN_TENSOR_OPTIONS_ARGS, FLASHATTN_OPTIONS_FROM_PARAMS());
  return {outs[0], outs[1], outs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state FLASHATTN_OPTIONS_PARAMS, bool mask_grad) {
  auto outs = FlashAttentionBackwardFunction::apply(grad_out, q, k, v, out, lse, rng_state FLASHATTN_TENSOR_OPTIONS_ARGS,
                                                    FLASHATTN_OPTIONS_FROM_PARAMS(), mask_grad);
  return {outs[0], outs[1], outs[2], outs[3]};
}

static_assert(std::is_same_v<decltype(fwd_autograd), FwdSignature>);
static_assert(std::is_same_v<decltype(bwd_autograd), BwdSignature>);

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_IMPL(flashattn_ext, Autograd, m) {
  m.impl("fwd", &flashattn::fwd_autograd);
  m.impl("bwd", &flashattn::bwd_autograd);
  m.impl("dropout_mask", torch::CppFunction::makeFallthrough());
}
