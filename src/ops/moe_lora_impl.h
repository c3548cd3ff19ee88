// Private declarations shared by the moe_lora backends: the schema file
// (src/ops/moe_lora.cpp), the ATen implementation (src/ops/cpu/), the CUDA
// registration (src/ops/cuda/) and the autograd function (src/ops/autograd/).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace mola::detail {

// Argument checks shared by every backend; messages name the argument, what it
// got, what it must be and how to fix it (docs/contributing.md).
void check_moe_lora_args(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& router,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
                         double dropout_p, bool training, int64_t compute,
                         const std::optional<at::Tensor>& dropout_seed);

// The forward with the tensor the backward needs: y [..., out], router logits
// [T, E] and lora_hidden = dropout(x) A^T, laid out per strategy: dense
// [T, E*r] (every expert), grouped [T, k, r] (the routed slots only).
// `compute` must already be resolved (1 dense or 2 grouped).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_forward_aten(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask);

// Gradients of x, weight, bias, router, lora_a, lora_b (output_mask says which
// to compute; the others come back undefined). grad_router_logits is the
// gradient reaching the logits output directly (from the balance loss).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_lora_backward_aten(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_router_logits,
                       const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router,
                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& router_logits, const at::Tensor& lora_hidden,
                       int64_t top_k, double scaling, double dropout_p, bool training,
                       int64_t compute, const std::optional<at::Tensor>& dropout_seed,
                       bool shared_dropout_mask, std::array<bool, 6> output_mask);

// Routing in ATen on any device: the CUDA fallback for what the routing kernel
// does not take (fp64, more than 256 experts). The CPU has its own one-pass
// kernel with the same numerics (src/ops/cpu/moe_lora_route.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_aten(const at::Tensor& logits,
                                                                   int64_t top_k);

// The public op (mola::moe_lora) of a backend whose _moe_lora_forward is
// `Forward`: the same call minus lora_hidden, for callers without autograd.
template <auto Forward>
std::tuple<at::Tensor, at::Tensor> forward_without_hidden(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  auto [y, logits, hidden] = Forward(x, weight, bias, router, lora_a, lora_b, top_k, scaling,
                                     dropout_p, training, compute, dropout_seed, shared_dropout_mask);
  return {y, logits};
}

// The dtype routing and its reductions run in: fp32 for fp32 and narrower
// inputs (the authors' fp32 softmax, docs/design.md, Fidelity to the papers and the authors' code), fp64 for fp64 inputs so
// float64 checks (gradcheck, the reference to 1e-10) are not capped at fp32.
inline at::ScalarType routing_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether dropout touches the expert input in this call.
inline bool dropout_active(double dropout_p, bool training) { return training && dropout_p > 0.0; }

// Whether this call draws a mask per routed expert (the default when dropout
// is active; see ops::moe_lora), which makes every strategy grouped.
inline bool per_expert_dropout(double dropout_p, bool training, bool shared_dropout_mask) {
  return dropout_active(dropout_p, training) && !shared_dropout_mask;
}

// The seed's value (an int64 tensor of one element).
int64_t read_dropout_seed(const std::optional<at::Tensor>& dropout_seed);

// Whether the op computes the base x W^T + b itself: a 2-d weight. A weight
// with no elements (any shape, e.g. torch.empty(0)) is the base-free form:
// y = b + the experts, for a base computed elsewhere (a quantized linear,
// include/mola/quant.h) whose output the caller adds; the backward then
// leaves the base's dy W to that layer.
inline bool has_base(const at::Tensor& weight) { return weight.numel() != 0; }
// y's start in the base-free form: the bias on every row, or zeros. [T, out] in X's dtype.
at::Tensor base_free_output(const at::Tensor& X, const std::optional<at::Tensor>& bias, int64_t out);

// The dense strategy's two stacked weights, one definition for the CPU and CUDA paths:
// [A_cat; Wr]: [E*r + E, in], every expert's A rows then the router's. One GEMM
// against it reads x once for the expert inputs and the logits. (A first, so the
// backward's dA is the leading block of [dA; dWr] and needs no copy.)
at::Tensor shrink_weight(const at::Tensor& router, const at::Tensor& lora_a);
// B [E, out, r] -> B_cat [out, E*r], the expand weight of the dense strategy.
at::Tensor cat_lora_b(const at::Tensor& lora_b);

}  // namespace mola::detail
