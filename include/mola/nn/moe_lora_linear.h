// mola::nn::MoLALinear: a frozen linear layer with a router and E LoRA experts
// (design 2.1), thin over mola::ops::moe_lora. Its parameter names equal the
// Python mola.MoLALinear's (base.weight, base.bias, router, lora_a, lora_b), so
// state dicts move between the two.
#pragma once

#include <mola/ops.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace mola::nn {

struct MoLALinearOptions {
  MoLALinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(int64_t, num_experts) = 8;
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(int64_t, rank) = 8;
  TORCH_ARG(double, alpha) = 16.0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(ops::Compute, compute) = ops::Compute::kAuto;
  // The transformer layer this module belongs to; the balance loss groups by it.
  TORCH_ARG(int64_t, layer_index) = -1;
};

class MoLALinearImpl : public torch::nn::Module {
 public:
  explicit MoLALinearImpl(const MoLALinearOptions& options);
  // Wraps an existing (pretrained) linear layer; its sizes and bias come from it.
  MoLALinearImpl(torch::nn::Linear base, MoLALinearOptions options);

  // LoRA's initialisation (methods.md 1.1, the authors' code): router and A
  // Kaiming-uniform with a = sqrt(5) per expert matrix, i.e. U(-1/sqrt(in),
  // 1/sqrt(in)); B zero, so a fresh module computes exactly the base layer.
  void reset_parameters();

  // y = base(x) + the routed experts; keeps the router logits in router_logits.
  at::Tensor forward(const at::Tensor& x);

  double scaling() const { return options.alpha() / static_cast<double>(options.rank()); }

  MoLALinearOptions options;
  torch::nn::Linear base{nullptr};
  at::Tensor router;   // [E, in]
  at::Tensor lora_a;   // [E, r, in]
  at::Tensor lora_b;   // [E, out, r]
  at::Tensor router_logits;  // [T, E] of the last forward

 private:
  void build();
};

TORCH_MODULE(MoLALinear);

}  // namespace mola::nn
