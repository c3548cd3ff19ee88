// Gradient checkpointing per decoder layer (mola/models/decoder.h,
// checkpointed_layer_forward; Chen et al. 2016, "Training deep nets with
// sublinear memory cost"). LibTorch has no torch.utils.checkpoint, so this
// is a torch::autograd::Function: forward runs the layer without autograd
// and keeps only its input, backward runs it again with autograd and
// differentiates that second run.
//
// Two things must be the same in both runs:
//   dropout   the MoLA op draws its dropout seed from the default CPU
//             generator; its state is saved before the forward and replayed
//             for the recompute, then the caller's state is put back.
//   routers   aux_loss reads the router logits each adapter recorded;
//             they are outputs of the Function too, so the load-balancing
//             loss still reaches the routers, and the recompute's own are
//             put back to what the forward recorded.
#include "mola/models/decoder.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace mola::models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The adapters of `layer` in projection_names() order (router_logits live there).
std::vector<nn::MoLAAdapterImpl*> adapters_of(DecoderLayerImpl& layer) {
  std::vector<nn::MoLAAdapterImpl*> out;
  for (const auto& name : projection_names()) {
    AdaptableLinear p = layer.projection(name);
    if (p->attached()) out.push_back(p->mola.get());
  }
  return out;
}

at::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Runs the layer and returns {h, router logits of each adapter...}.
variable_list run_layer(DecoderLayerImpl& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& mask) {
  variable_list out{layer.forward(x, cos, sin, mask)};
  for (auto* a : adapters_of(layer)) out.push_back(a->router_logits);
  return out;
}

struct LayerCheckpoint : public torch::autograd::Function<LayerCheckpoint> {
  // `layer` travels as an integer (saved_data holds IValues only); the model
  // outlives its backward, as for any training step. params: the layer's
  // trainable parameters, inputs so that autograd routes their gradients.
  static variable_list forward(AutogradContext* ctx, int64_t layer, const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& mask, const at::Tensor& x, at::TensorList params) {
    // Function::apply runs this with grad mode off: no activations are kept.
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["mask"] = mask.has_value() ? c10::IValue(*mask) : c10::IValue();
    ctx->saved_data["rng"] = cpu_rng_state();
    ctx->saved_data["x_requires_grad"] = x.requires_grad();
    ctx->save_for_backward({x});
    return run_layer(*reinterpret_cast<DecoderLayerImpl*>(layer), x, cos, sin, mask.value_or(at::Tensor()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto& layer = *reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    const at::Tensor cos = ctx->saved_data["cos"].toTensor();
    const at::Tensor sin = ctx->saved_data["sin"].toTensor();
    const c10::IValue& m = ctx->saved_data["mask"];
    const at::Tensor mask = m.isTensor() ? m.toTensor() : at::Tensor();
    const bool x_requires_grad = ctx->saved_data["x_requires_grad"].toBool();
    const at::Tensor x = ctx->get_saved_variables()[0].detach().requires_grad_(x_requires_grad);

    // The recompute must not disturb what the last forward left behind: the
    // caller's generator state and the adapters' router_logits.
    const auto adapters = adapters_of(layer);
    std::vector<nn::MoLAAdapterImpl::Routing> kept;
    for (auto* a : adapters) kept.push_back(a->routing());
    const at::Tensor caller_rng = cpu_rng_state();
    set_cpu_rng_state(ctx->saved_data["rng"].toTensor());
    variable_list outputs;
    {
      at::AutoGradMode grad_on(true);
      outputs = run_layer(layer, x, cos, sin, mask);
    }
    set_cpu_rng_state(caller_rng);
    for (size_t i = 0; i < adapters.size(); ++i) adapters[i]->set_routing(std::move(kept[i]));

    // Differentiate w.r.t. x (when it needs it) and the trainable parameters
    // in the order forward got them.
    variable_list inputs;
    if (x_requires_grad) inputs.push_back(x);
    std::vector<at::Tensor> params;
    for (const auto& p : layer.parameters(/*recurse=*/true))
      if (p.requires_grad()) params.push_back(p);
    inputs.insert(inputs.end(), params.begin(), params.end());

    variable_list outs, grads;
    for (size_t i = 0; i < outputs.size(); ++i)
      if (grad_outputs[i].defined() && outputs[i].requires_grad()) {
        outs.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    variable_list input_grads(inputs.size());
    if (!outs.empty() && !inputs.empty())
      input_grads = torch::autograd::grad(outs, inputs, grads, /*retain_graph=*/false, /*create_graph=*/false,
                                          /*allow_unused=*/true);

    // One entry per forward argument: layer, cos, sin, mask, x, params...
    variable_list result(5 + params.size());
    size_t next = 0;
    if (x_requires_grad) result[4] = input_grads[next++];
    for (size_t i = 0; i < params.size(); ++i) result[5 + i] = input_grads[next++];
    return result;
  }
};

}  // namespace

at::Tensor checkpointed_layer_forward(DecoderLayerImpl& layer, const at::Tensor& x, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& mask) {
  std::vector<at::Tensor> params;
  for (const auto& p : layer.parameters(/*recurse=*/true))
    if (p.requires_grad()) params.push_back(p);
  // Nothing to differentiate: the plain forward keeps nothing either.
  if (params.empty() && !x.requires_grad()) return layer.forward(x, cos, sin, mask);

  const std::optional<at::Tensor> m = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
  const variable_list out =
      LayerCheckpoint::apply(reinterpret_cast<int64_t>(&layer), cos, sin, m, x, at::TensorList(params));
  // The router logits handed back by the Function carry its grad_fn, so
  // aux_loss on them differentiates through the recompute.
  const auto adapters = adapters_of(layer);
  for (size_t i = 0; i < adapters.size(); ++i) adapters[i]->record_routing(out[1 + i]);
  return out[0];
}

}  // namespace mola::models
