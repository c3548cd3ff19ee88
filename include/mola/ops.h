// The mola op family, one C++ function per registered op (design section 5).
// Each goes through the dispatcher, so C++ callers get the same autograd and
// device dispatch as `torch.ops.mola.*` from Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace mola::ops {

// How the experts are computed (design section 4). Both strategies give the same
// result to rounding; kAuto picks by the cost rule in resolve_compute.
enum class Compute : int64_t { kAuto = 0, kDense = 1, kGrouped = 2 };

// "auto" | "dense" | "grouped" -> Compute; anything else is an error naming the value.
Compute parse_compute(const std::string& name);
const char* compute_name(Compute compute);

// The strategy `compute` stands for at this shape: kAuto becomes dense when
// num_experts * rank <= 256 (dense costs E*r/in extra FLOPs and no indexing),
// else grouped.
Compute resolve_compute(Compute compute, int64_t num_experts, int64_t rank);

// y = x W^T + b + scaling * sum_j w_j (dropout(x) A[idx_j]^T) B[idx_j]^T, with
// top-k routing by softmax(x router^T). x [..., in]; weight [out, in]; router
// [E, in]; lora_a [E, r, in]; lora_b [E, out, r]. Returns y [..., out] and the
// router logits [T, E] (T = tokens in x), which the balance loss consumes.
// dropout_seed: an int64 tensor of one element, needed when training with
// dropout_p > 0; the mask is a function of (seed, element index), see dropout_mask.
std::tuple<at::Tensor, at::Tensor> moe_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b,
    int64_t top_k, double scaling, double dropout_p = 0.0, bool training = false,
    Compute compute = Compute::kAuto, const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// The Switch-style balance loss of design 2.2: coef * sum_l E_l * sum_e f_e * Pbar_e,
// one entry of router_logits ([N_l, E_l]) and top_k per transformer layer.
// mask (bool [N]) drops padding rows; each layer's rows are M stacked copies of
// the N tokens, so the mask is tiled.
at::Tensor load_balancing_loss(
    at::TensorList router_logits, at::IntArrayRef top_k, double coef,
    const std::optional<at::Tensor>& mask = std::nullopt);

// Routing alone: fp32 softmax, top-k, renormalise (dense softmax when k == E).
// Returns weights [T, k] float, indices [T, k] int64, gate [T, E] float.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route(const at::Tensor& router_logits,
                                                              int64_t top_k);

// The dropout multiplier moe_lora applies to x (flattened to [rows, cols]) for
// this seed: float [rows, cols] of 0 or 1/(1-p). Exposed for tests and oracles.
at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p);

}  // namespace mola::ops
