// The mola op family, one C++ function per registered op (docs/design.md, Strategies and kernels).
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

// How the experts are computed (docs/design.md, Strategies and kernels). Both strategies give the same
// result to rounding; kAuto picks by the cost rule in resolve_compute.
enum class Compute : int64_t { kAuto = 0, kDense = 1, kGrouped = 2 };

// "auto" | "dense" | "grouped" -> Compute; anything else is an error naming the value.
Compute parse_compute(const std::string& name);
const char* compute_name(Compute compute);

// The strategy `compute` stands for at this shape: kAuto becomes dense when
// num_experts * rank <= 256 (dense costs E*r/in extra FLOPs and no indexing),
// else grouped. With per-expert dropout masks in play (training, p > 0, not
// shared) every strategy is grouped: each routed (token, expert) pair reads
// its own masked x~, which dense would have to make for every expert on
// every token.
Compute resolve_compute(Compute compute, int64_t num_experts, int64_t rank, bool per_expert_dropout = false);

// y = x W^T + b + scaling * sum_j w_j (dropout(x) A[idx_j]^T) B[idx_j]^T, with
// top-k routing by softmax(x router^T). x [..., in]; weight [out, in]; router
// [E, in]; lora_a [E, r, in]; lora_b [E, out, r]. Returns y [..., out] and the
// router logits [T, E] (T = tokens in x), which the balance loss consumes.
// A weight with no elements (at::empty({0}, x's options)) is the base-free
// form: y = b + the experts, for a base computed elsewhere (a quantized
// linear, mola/quant.h) whose output the caller adds; the backward then
// gives x only the experts' and the router's gradient, and no weight gradient.
// dropout_seed: an int64 tensor of one element, needed when training with
// dropout_p > 0. The masks: by default each routed expert of a token draws
// its own mask over the token's features, a function of (seed, expert,
// token, feature), as the MoLA authors' per-expert dropout; with
// shared_dropout_mask one mask of (seed, token, feature) serves every expert
// (faster, and a deviation from the authors). See dropout_mask.
std::tuple<at::Tensor, at::Tensor> moe_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b,
    int64_t top_k, double scaling, double dropout_p = 0.0, bool training = false,
    Compute compute = Compute::kAuto, const std::optional<at::Tensor>& dropout_seed = std::nullopt,
    bool shared_dropout_mask = false);

// The Switch-style balance loss of docs/design.md, The balance loss: coef * sum_l E_l * sum_e f_e * Pbar_e,
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
// this seed: float [rows, cols] of 0 or 1/(1-p); expert e's mask (per-expert
// masks) for expert >= 0, the shared mask for expert -1. Exposed for tests
// and oracles.
at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p, int64_t expert = -1);

// Whether this CPU runs `dtype` (bf16, fp16) work in fp32 from 16-bit
// storage: true without native 16-bit matrix units (AVX-512 BF16 / AMX for
// bf16, AVX-512 FP16 / AMX for fp16), where ATen's 16-bit matmul falls to a
// slow path. The op and the models' frozen linears then compute in fp32 and
// return 16-bit results; false for other dtypes.
bool cpu_computes_in_fp32(at::ScalarType dtype);

}  // namespace mola::ops
