// Autograd for mola::moe_lora: a C++ torch::autograd::Function whose forward
// calls _moe_lora_forward below the autograd key and whose backward calls the
// registered _moe_lora_backward, so torch.compile, FSDP and C++ callers all see
// two dispatcher ops rather than opaque code (docs/contributing.md, A new op).
#include "ops/moe_lora_impl.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace mola::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class MoeLoraFunction : public torch::autograd::Function<MoeLoraFunction> {
 public:
  // bias and dropout_seed are optional: an absent one is no autograd input, so
  // the inputs needs_input_grad indexes shift by one after a missing bias.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& router,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
                               double scaling, double dropout_p, bool training, int64_t compute,
                               const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("mola::_moe_lora_forward", "")
                          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, int64_t, double, double, bool,
                              int64_t, const std::optional<at::Tensor>&, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, logits, hidden] = fwd.call(x, weight, bias, router, lora_a, lora_b, top_k, scaling,
                                        dropout_p, training, compute, dropout_seed, shared_dropout_mask);
    // x and the adapter for the products; logits to recompute the routing; the
    // small expert activations h (E*r/in of x) so backward skips the shrink GEMM.
    ctx->save_for_backward({x, weight, router, lora_a, lora_b, logits, hidden,
                            dropout_seed.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["top_k"] = top_k;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["training"] = training;
    ctx->saved_data["compute"] = compute;
    ctx->saved_data["shared_dropout_mask"] = shared_dropout_mask;
    return {y, logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto bwd =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mola::_moe_lora_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>(
                const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, int64_t, double, double, bool, int64_t,
                const std::optional<at::Tensor>&, bool, std::array<bool, 6>)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after_bias = has_bias ? 3 : 2;  // index of router among the autograd inputs
    std::array<bool, 6> mask = {ctx->needs_input_grad(0),
                                ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2),
                                ctx->needs_input_grad(after_bias),
                                ctx->needs_input_grad(after_bias + 1),
                                ctx->needs_input_grad(after_bias + 2)};
    at::Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) {
      // Symbolic sizes, so that a traced backward does not specialise x's shape.
      std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
      shape.back() = saved[4].sym_size(1);  // lora_b [E, out, r]
      grad_y = at::zeros_symint(shape, x.options());
    }
    auto [gx, gw, gb, gr, ga, gbb] =
        bwd.call(grad_y, opt(grad_outputs[1]), x, weight, saved[2], saved[3], saved[4], saved[5],
                 saved[6], ctx->saved_data["top_k"].toInt(), ctx->saved_data["scaling"].toDouble(),
                 ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["training"].toBool(),
                 ctx->saved_data["compute"].toInt(), opt(saved[7]),
                 ctx->saved_data["shared_dropout_mask"].toBool(), mask);
    // One gradient per forward argument; the non-tensor ones and the seed get none.
    return {gx, gw, gb, gr, ga, gbb, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> moe_lora_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  variable_list out = MoeLoraFunction::apply(x, weight, bias, router, lora_a, lora_b, top_k,
                                             scaling, dropout_p, training, compute, dropout_seed,
                                             shared_dropout_mask);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace mola::detail

TORCH_LIBRARY_IMPL(mola, Autograd, m) {
  m.impl("moe_lora", &mola::detail::moe_lora_autograd);
}
