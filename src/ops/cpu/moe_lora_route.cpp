// CPU routing and dropout mask of the moe_lora family. Both are also
// what the forward and backward call on the CPU (through the dispatcher), so the
// routing a forward used is recomputed bit for bit in its backward.
#include "ops/moe_lora_impl.h"

#include "ops/cpu/dropout.h"

#include <philox.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace mola::detail {

namespace {

void check_route_args(const at::Tensor& logits, int64_t top_k) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "moe_lora_route: router_logits must be [tokens, experts]; got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= logits.size(1), "moe_lora_route: top_k (", top_k,
                    ") must be between 1 and the number of experts (", logits.size(1), ")");
}

}  // namespace

// Softmax over all experts in fp32 (fp64 for fp64 logits), top-k, renormalise over the chosen ones: the
// authors' routing (docs/design.md, Fidelity to the papers and the authors' code). With k == E every expert is chosen and the
// weights are the softmax itself, with no renormalisation (docs/design.md, Fidelity to the papers and the authors' code:
// "routing is dense").
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_aten(const at::Tensor& logits,
                                                                   int64_t top_k) {
  check_route_args(logits, top_k);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor probs = at::softmax(logits.to(routing_dtype(logits.scalar_type())), -1);  // [T, E]
  if (top_k == E) {
    at::Tensor idx = at::arange(E, logits.options().dtype(at::kLong)).expand({T, E}).contiguous();
    return {probs, idx, probs.clone()};
  }
  // A stable descending sort, not topk: equal probabilities keep expert order (the
  // lower index first, as the CPU and CUDA kernels rank them; topk's order among
  // ties is unspecified and differs between devices). NaN sorts first.
  auto [sorted, order] = probs.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  at::Tensor v = sorted.narrow(-1, 0, top_k);    // [T, k]
  at::Tensor idx = order.narrow(-1, 0, top_k).contiguous();
  at::Tensor w = v / v.sum(-1, /*keepdim=*/true);
  at::Tensor gate = at::zeros_like(probs).scatter_(1, idx, w);  // [T, E]
  return {w, idx, gate};
}

namespace {

// The CPU kernel of moe_lora_route: one pass per token over its E logits, the
// numerics of kernels/moe_lora_route.cu (softmax with the row maximum
// subtracted, in acc_t; top-k as k argmax passes under the order "higher
// probability, then lower expert index", a NaN ranking first; w = v / sum(v)
// with the sum in slot order; k == E dense). Tokens run in parallel. It does
// what moe_lora_route_aten does without its eight ATen passes over [T, E]
// (softmax, topk, sum, division, zeros, scatter, and copies), which at MoLA's
// small E cost more than the arithmetic.
template <typename scalar_t, typename acc_t>
void route_rows(const scalar_t* logits, int64_t row_stride, int64_t col_stride, int64_t T,
                int64_t E, int64_t k, acc_t* weights, int64_t* indices, acc_t* gate) {
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(static_cast<size_t>(E));
    std::vector<char> chosen(static_cast<size_t>(E));
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* z = logits + t * row_stride;
      acc_t row_max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t e = 0; e < E; ++e) {
        prob[e] = static_cast<acc_t>(z[e * col_stride]);
        row_max = std::fmax(row_max, prob[e]);
      }
      acc_t denom = 0;
      for (int64_t e = 0; e < E; ++e) {
        prob[e] = std::exp(prob[e] - row_max);
        denom += prob[e];
      }
      for (int64_t e = 0; e < E; ++e) prob[e] /= denom;

      acc_t* w = weights + t * k;
      int64_t* idx = indices + t * k;
      acc_t* g = gate + t * E;
      if (k == E) {  // dense routing: w = P, experts in order
        for (int64_t e = 0; e < E; ++e) {
          w[e] = g[e] = prob[e];
          idx[e] = e;
        }
        continue;
      }
      std::fill(chosen.begin(), chosen.end(), 0);
      acc_t chosen_sum = 0;
      for (int64_t s = 0; s < k; ++s) {
        int64_t best = -1;
        acc_t best_v = 0;
        for (int64_t e = 0; e < E; ++e) {
          if (chosen[e]) continue;
          const acc_t v = std::isnan(prob[e]) ? std::numeric_limits<acc_t>::infinity() : prob[e];
          if (best < 0 || v > best_v) {  // strict: the lower index keeps a tie
            best = e;
            best_v = v;
          }
        }
        chosen[best] = 1;
        idx[s] = best;
        chosen_sum += best_v;
      }
      for (int64_t e = 0; e < E; ++e) g[e] = 0;
      for (int64_t s = 0; s < k; ++s) {
        w[s] = prob[idx[s]] / chosen_sum;
        g[idx[s]] = w[s];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_cpu(const at::Tensor& logits,
                                                                  int64_t top_k) {
  check_route_args(logits, top_k);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = routing_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(acc));
  at::Tensor indices = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  at::Tensor gate = at::empty({T, E}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_lora_route", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                                T, E, top_k, weights.mutable_data_ptr<acc_t>(),
                                indices.mutable_data_ptr<int64_t>(), gate.mutable_data_ptr<acc_t>());
  });
  return {weights, indices, gate};
}

// The mask contract of kernels/philox.h: element i of the flattened [rows, cols]
// input keeps iff its Philox uniform is >= p; kept elements scale by 1/(1-p).
at::Tensor dropout_mask_cpu(const at::Tensor& seed_tensor, int64_t rows, int64_t cols, double p, int64_t expert) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "_dropout_mask: rows (", rows, ") and cols (", cols,
                    ") must be >= 0");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "_dropout_mask: p (", p, ") must be in [0, 1)");
  TORCH_CHECK_VALUE(expert >= -1 && expert < (int64_t{1} << 32) - 1, "_dropout_mask: expert (", expert,
                    ") must be -1 (the shared mask) or an expert index >= 0");
  const uint32_t stream = expert < 0 ? 0u : philox::expert_stream(expert);
  return dropout_mask_values_cpu(static_cast<uint64_t>(read_dropout_seed(seed_tensor)), rows, cols, p, stream);
}

}  // namespace
}  // namespace mola::detail

TORCH_LIBRARY_IMPL(mola, CPU, m) {
  m.impl("moe_lora_route", &mola::detail::moe_lora_route_cpu);
  m.impl("_dropout_mask", &mola::detail::dropout_mask_cpu);
}
