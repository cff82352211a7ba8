// The C++ autograd function for flashattn_ext::fwd, registered at the Autograd dispatch key:
// forward saves (q, k, v, out, lse, rng_state) and the options; backward calls flashattn_ext::bwd,
// which recomputes the probabilities tile by tile from lse.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace flashattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const OptTensor& attn_mask, const OptTensor& alibi_slopes,
                                                        const OptTensor& block_mask, const OptTensor& block_elem_masks, double dropout_p,
                                                        std::optional<double> scale, int64_t window_left,
                                                        int64_t window_right, bool bottom_right, double softcap,
                                                        int64_t sparse_block_m, int64_t sparse_block_n,
                                                        bool deterministic) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flashattn_ext::fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, double, std::optional<double>, int64_t, int64_t, bool, double, int64_t,
                           int64_t, bool)>();
  return op.call(q, k, v, attn_mask, alibi_slopes, block_mask, block_elem_masks, dropout_p, scale, window_left, window_right,
                 bottom_right, softcap, sparse_block_m, sparse_block_n, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const OptTensor& attn_mask, const OptTensor& alibi_slopes,
    const OptTensor& block_mask, const OptTensor& block_elem_masks, double dropout_p, std::optional<double> scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, int64_t sparse_block_m, int64_t sparse_block_n,
    bool deterministic, bool mask_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flashattn_ext::bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, double, std::optional<double>, int64_t, int64_t, bool, double, int64_t,
                           int64_t, bool, bool)>();
  return op.call(grad_out, q, k, v, out, lse, rng_state, attn_mask, alibi_slopes, block_mask, block_elem_masks, dropout_p, scale,
                 window_left, window_right, bottom_right, softcap, sparse_block_m, sparse_block_n, deterministic,
                 mask_grad);
}

OptTensor saved_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& attn_mask, const OptTensor& alibi_slopes, const OptTensor& block_mask, const OptTensor& block_elem_masks,
                               double dropout_p, std::optional<double> scale, int64_t window_left,
                               int64_t window_right, bool bottom_right, double softcap, int64_t sparse_block_m,
                               int64_t sparse_block_n, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse, rng_state] = call_fwd(q, k, v, attn_mask, alibi_slopes, block_mask, block_elem_masks, dropout_p, scale, window_left,
                                          window_right, bottom_right, softcap, sparse_block_m, sparse_block_n,
                                          deterministic);
    ctx->save_for_backward({q, k, v, out, lse, rng_state, attn_mask.value_or(at::Tensor()),
                            alibi_slopes.value_or(at::Tensor()), block_mask.value_or(at::Tensor()),
                            block_elem_masks.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["sparse_block_m"] = sparse_block_m;
    ctx->saved_data["sparse_block_n"] = sparse_block_n;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->mark_non_differentiable({lse, rng_state});
    return {out, lse, rng_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4],
                     &rng_state = saved[5];
    const OptTensor attn_mask = saved_optional(saved[6]);
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const c10::IValue& scale_iv = ctx->saved_data["scale"];
    const bool mask_grad = attn_mask && attn_mask->is_floating_point() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dmask] =
        call_bwd(grad_out, q, k, v, out, lse, rng_state, attn_mask, saved_optional(saved[7]), saved_optional(saved[8]),
                 saved_optional(saved[9]),
                 ctx->saved_data["dropout_p"].toDouble(),
                 scale_iv.isNone() ? std::nullopt : std::optional<double>(scale_iv.toDouble()),
                 ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                 ctx->saved_data["bottom_right"].toBool(), ctx->saved_data["softcap"].toDouble(),
                 ctx->saved_data["sparse_block_m"].toInt(), ctx->saved_data["sparse_block_n"].toInt(),
                 ctx->saved_data["deterministic"].toBool() || at::globalContext().deterministicAlgorithms(), mask_grad);
    variable_list grad_inputs(16);  // one per forward argument
    grad_inputs[0] = dq, grad_inputs[1] = dk, grad_inputs[2] = dv;
    if (mask_grad) grad_inputs[3] = dmask;
    return grad_inputs;
  }
};

// flashattn_ext::bwd under autograd (create_graph=True): its results can be used, but
// differentiating them again is refused with a clear error instead of silently giving zeros.
class FlashAttentionBackwardFunction : public torch::autograd::Function<FlashAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& rng_state, const OptTensor& attn_mask, const OptTensor& alibi_slopes,
                               const OptTensor& block_mask, const OptTensor& block_elem_masks, double dropout_p, std::optional<double> scale,
                               int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                               int64_t sparse_block_m, int64_t sparse_block_n, bool deterministic, bool mask_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dmask] =
        call_bwd(grad_out, q, k, v, out, lse, rng_state, attn_mask, alibi_slopes, block_mask, block_elem_masks, dropout_p, scale,
                 window_left, window_right, bottom_right, softcap, sparse_block_m, sparse_block_n, deterministic,
                 mask_grad);
    return {dq, dk, dv, dmask};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "flashattn_ext: double backward (a gradient of the attention gradients) is not supported; "
                "use torch.nn.functional.scaled_dot_product_attention's math backend for higher-order gradients");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const OptTensor& attn_mask, const OptTensor& alibi_slopes,
    const OptTensor& block_mask, const OptTensor& block_elem_masks, double dropout_p, std::optional<double> scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, int64_t sparse_block_m, int64_t sparse_block_n,
    bool deterministic, bool mask_grad) {
  auto outs = FlashAttentionBackwardFunction::apply(grad_out, q, k, v, out, lse, rng_state, attn_mask, alibi_slopes,
                                                    block_mask, block_elem_masks, dropout_p, scale, window_left, window_right,
                                                    bottom_right, softcap, sparse_block_m, sparse_block_n,
                                                    deterministic, mask_grad);
  return {outs[0], outs[1], outs[2], outs[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const OptTensor& attn_mask,
                                                            const OptTensor& alibi_slopes, const OptTensor& block_mask, const OptTensor& block_elem_masks,
                                                            double dropout_p, std::optional<double> scale,
                                                            int64_t window_left, int64_t window_right,
                                                            bool bottom_right, double softcap, int64_t sparse_block_m,
                                                            int64_t sparse_block_n, bool deterministic) {
  auto outs = FlashAttentionFunction::apply(q, k, v, attn_mask, alibi_slopes, block_mask, block_elem_masks, dropout_p, scale,
                                            window_left, window_right, bottom_right, softcap, sparse_block_m,
                                            sparse_block_n, deterministic);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_IMPL(flashattn_ext, Autograd, m) {
  m.impl("fwd", &flashattn::fwd_autograd);
  m.impl("bwd", &flashattn::bwd_autograd);
  m.impl("dropout_mask", torch::CppFunction::makeFallthrough());
}
