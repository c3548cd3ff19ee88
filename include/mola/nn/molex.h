// mola/nn/molex.h: the gate of MoLEx, mixture of layer experts (Teo and
// Nguyen, ICLR 2025; docs/design.md, MoLEx). At decoder layer t the gate looks at the
// layer input z_t, picks one layer j of the model (top-1), and the layer's
// output becomes
//
//   z_{t+1} = alpha * u_t(z_t) + (1 - alpha) * u_j(z_t)
//
// u being the whole decoder block (residual included) with its own adapters.
// This module owns only what MoLEx adds to a layer: the gate (a Linear hidden
// -> L with bias) and, when learned, alpha. Running the blocks is the
// decoder's job (src/models/molex.cpp), so the gate can serve the C++ model
// while mola.inject's transformers wrapper mirrors it in Python
// (python/mola/molex.py; same parameter names, same arithmetic).
//
// Choices marked "ours" are not in the paper's available text (docs/design.md, MoLEx):
//   pool        "mean" (ours, default): mean of z_t over non-padding tokens;
//               "last": the last non-padding token (right or left padding);
//               "token": every token routed on its own
//   gate init   nn.Linear's weight init (kaiming_uniform a = sqrt(5)) with a
//               zero bias (ours): no layer is favoured a priori, the argmax
//               depends on the input, so choices spread over layers
//   routing     logits and softmax in fp32 whatever the model's dtype, as
//               MoLA's router (docs/design.md, Strategies and kernels, "Precision")
//   gate_grad   "straight_through" (ours, default): the chosen block times
//               p_j / stop_gradient(p_j), value exactly 1; "prob": times p_j
//               (Switch Transformer style; the forward value then is
//               alpha * u_t + (1 - alpha) * p_j * u_j); "none": no gradient
//   alpha       fixed 0.5 (ours), or learned as sigmoid(a) with a per-layer
//               parameter a = logit(molex_alpha) at the start
//   balance     optional (ours): n * sum_j f_j * P_j over the gate's units
//               (sequences, or non-padding tokens for "token"), f_j the
//               fraction routed to j, P_j the mean probability, n the number
//               of choosable layers (Fedus et al. 2021's loss, 1 when uniform)
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>

namespace mola::nn {

struct MoLExGateOptions {
  MoLExGateOptions(int64_t hidden_size, int64_t num_layers, int64_t layer_index)
      : hidden_size_(hidden_size), num_layers_(num_layers), layer_index_(layer_index) {}
  TORCH_ARG(int64_t, hidden_size);
  TORCH_ARG(int64_t, num_layers);   // L: the layers the gate chooses from
  TORCH_ARG(int64_t, layer_index);  // t: the layer this gate belongs to
  TORCH_ARG(std::string, pool) = "mean";
  TORCH_ARG(double, alpha) = 0.5;
  TORCH_ARG(bool, alpha_learned) = false;
  TORCH_ARG(std::string, gate_grad) = "straight_through";
  TORCH_ARG(bool, exclude_self) = false;
};

// One route() call's result. A unit is a sequence (pools "mean", "last") or
// a token (pool "token").
struct MoLExRouting {
  at::Tensor choice;  // [batch] (sequence pools) or [batch, seq] ("token"), int64: the chosen layer j
  at::Tensor scale;   // choice's shape, fp32: the factor on u_j (see gate_grad)
  at::Tensor probs;   // [units, L] fp32 softmax of the gate logits
  at::Tensor valid;   // [units] bool: the units the balance loss counts (not padding)
};

class MoLExGateImpl : public torch::nn::Module {
 public:
  // Parameters in `tensor_options`' dtype and device (the model's).
  MoLExGateImpl(const MoLExGateOptions& options, const at::TensorOptions& tensor_options);

  // Weight as nn.Linear's default, bias zero, alpha = logit(options.alpha).
  void reset_parameters();

  // z [batch, seq, hidden]; padding [batch, seq] bool (true = token) or
  // undefined (no padding). Keeps the result in `last` for balance_loss().
  MoLExRouting route(const at::Tensor& z, const at::Tensor& padding);

  // alpha as a 0-dim fp32 tensor (sigmoid of the parameter when learned).
  at::Tensor alpha_value() const;

  // alpha * own + (1 - alpha) * scale * other in own's dtype; scale is
  // broadcast against own ([batch, 1, 1] or [batch, seq, 1]), fp32.
  at::Tensor mix(const at::Tensor& own, const at::Tensor& other, const at::Tensor& scale) const;

  // The balance loss over the last route() (see the file comment), fp32
  // scalar; throws std::logic_error before any route().
  at::Tensor balance_loss() const;

  MoLExGateOptions options;
  torch::nn::Linear gate{nullptr};  // hidden -> L, with bias
  at::Tensor alpha;                 // [1], the logit of alpha; undefined unless alpha_learned
  MoLExRouting last;
  bool enabled = true;  // false: the layer runs its own block alone (CausalLM::set_adapter_enabled)
};
TORCH_MODULE(MoLExGate);

// The gate's input per unit, fp32: [batch, hidden] for "mean" (over
// padding == true tokens; all tokens when padding is undefined) and "last"
// (the last token with padding == true, wherever the padding is), and
// [batch * seq, hidden] for "token".
at::Tensor molex_pool(const at::Tensor& z, const at::Tensor& padding, const std::string& pool);

}  // namespace mola::nn
