// CPU routing and dropout mask of the moe_lora family. Both are also
// what the forward and backward call on the CPU (through the dispatcher), so the
// routing a forward used is recomputed bit for bit in its backward.
#include "ops/moe_lora_impl.h"

#include "ops/cpu/dropout.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace mola::detail {

// Softmax over all experts in fp32 (fp64 for fp64 logits), top-k, renormalise over the chosen ones: the
// authors' routing (methods.md 1.1). With k == E every expert is chosen and the
// weights are the softmax itself, with no renormalisation (methods.md 1.1:
// "routing is dense").
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_aten(const at::Tensor& logits,
                                                                   int64_t top_k) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "moe_lora_route: router_logits must be [tokens, experts]; got ",
                    logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "moe_lora_route: top_k (", top_k,
                    ") must be between 1 and the number of experts (", E, ")");
  at::Tensor probs = at::softmax(logits.to(routing_dtype(logits.scalar_type())), -1);  // [T, E]
  if (top_k == E) {
    at::Tensor idx = at::arange(E, logits.options().dtype(at::kLong)).expand({T, E}).contiguous();
    return {probs, idx, probs.clone()};
  }
  auto [v, idx] = probs.topk(top_k, -1, /*largest=*/true, /*sorted=*/true);  // [T, k]
  at::Tensor w = v / v.sum(-1, /*keepdim=*/true);
  at::Tensor gate = at::zeros_like(probs).scatter_(1, idx, w);  // [T, E]
  return {w, idx, gate};
}

namespace {

// The mask contract of kernels/philox.h: element i of the flattened [rows, cols]
// input keeps iff its Philox uniform is >= p; kept elements scale by 1/(1-p).
at::Tensor dropout_mask_cpu(const at::Tensor& seed_tensor, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "_dropout_mask: rows (", rows, ") and cols (", cols,
                    ") must be >= 0");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "_dropout_mask: p (", p, ") must be in [0, 1)");
  return dropout_mask_values_cpu(static_cast<uint64_t>(read_dropout_seed(seed_tensor)), rows, cols,
                                 p);
}

}  // namespace
}  // namespace mola::detail

TORCH_LIBRARY_IMPL(mola, CPU, m) {
  m.impl("moe_lora_route", &mola::detail::moe_lora_route_aten);
  m.impl("_dropout_mask", &mola::detail::dropout_mask_cpu);
}
