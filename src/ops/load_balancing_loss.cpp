// mola::load_balancing_loss, the Switch-style balance loss of docs/design.md, The balance loss in the
// form the MoLA authors coded it (docs/design.md, Fidelity to the papers and the authors' code): per transformer layer l,
//   P = softmax(logits_l) in fp32, sel = topk(P, k_l),
//   f_e = count(sel == e) / (N * k_l)   (sums to 1, not differentiable),
//   Pbar_e = mean over rows of P[:, e],  L_l = E_l * sum_e f_e * Pbar_e,
// and aux = coef * sum_l L_l: a sum over layers, not a mean. It is a composition
// of differentiable ATen ops, so it is registered CompositeImplicitAutograd:
// autograd, every device and torch.compile come from the decomposition, and the
// gradient reaches the logits through Pbar only.
#include <mola/ops.h>

#include <ATen/ATen.h>
#include <torch/library.h>

namespace mola::detail {
namespace {

at::Tensor load_balancing_loss_impl(at::TensorList router_logits, at::IntArrayRef top_k,
                                    double coef, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(!router_logits.empty(),
                    "load_balancing_loss: router_logits is empty; give one [rows, experts] "
                    "tensor per transformer layer");
  TORCH_CHECK_VALUE(router_logits.size() == top_k.size(), "load_balancing_loss: ",
                    router_logits.size(), " router_logits tensors but ", top_k.size(),
                    " top_k values; give one top_k per layer");
  at::Tensor total;
  for (size_t l = 0; l < router_logits.size(); ++l) {
    const at::Tensor& logits = router_logits[l];
    TORCH_CHECK_VALUE(logits.dim() == 2, "load_balancing_loss: router_logits[", l,
                      "] must be [rows, experts]; got ", logits.sym_sizes());
    TORCH_SYM_CHECK(logits.sym_size(0).sym_gt(0), "load_balancing_loss: router_logits[", l,
                    "] has no rows; drop layers that saw no tokens");
    // sym_size, never size(): on a symbolic tensor size() specialises every
    // dimension, so torch.compile(dynamic) would recompile per token count.
    // E is guarded (it is fixed per layer), the row count stays symbolic.
    const int64_t E = logits.sym_size(1).guard_int(__FILE__, __LINE__), k = top_k[l];
    TORCH_CHECK_VALUE(k >= 1 && k <= E, "load_balancing_loss: top_k[", l, "] (", k,
                      ") must be between 1 and that layer's number of experts (", E, ")");
    at::Tensor P = at::softmax(logits.to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), -1);  // [N, E]
    // The experts the routing picked: a stable descending sort, so ties go to the
    // lower index as in moe_lora_route (topk's order among ties is unspecified).
    at::Tensor sel = std::get<1>(P.detach().sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true))
                         .narrow(-1, 0, k)
                         .reshape({-1});  // [N*k]
    // Sizes go through SymInt and f is normalised by its own total (N*k routed
    // slots, or the unmasked ones), so the op traces with dynamic shapes.
    at::Tensor slot_weight = at::ones_like(sel, P.options());           // [N*k]
    at::Tensor pbar;                                                    // [E]
    if (mask && mask->defined()) {
      const c10::SymInt rows = logits.sym_size(0), tokens = mask->sym_numel();
      TORCH_SYM_CHECK((rows % tokens).sym_eq(0), "load_balancing_loss: router_logits[", l,
                      "] has ", rows, " rows, not a multiple of the mask's ", tokens,
                      " tokens; the mask must cover the tokens each adapted module saw");
      at::Tensor row_weight =
          mask->reshape({-1}).to(P.device(), P.scalar_type()).repeat_symint({rows / tokens});
      slot_weight = row_weight.unsqueeze(1).expand_symint({rows, k}).reshape({-1});
      pbar = (P * row_weight.unsqueeze(1)).sum(0) / row_weight.sum().clamp_min(1.0);
    } else {
      pbar = P.mean(0);
    }
    at::Tensor counts = at::zeros_like(pbar).scatter_add_(0, sel, slot_weight);  // [E]
    at::Tensor f = counts / counts.sum().clamp_min(1.0);
    at::Tensor layer = (f * pbar).sum() * static_cast<double>(E);
    total = total.defined() ? total + layer : layer;
  }
  return total * coef;
}

}  // namespace
}  // namespace mola::detail

TORCH_LIBRARY_FRAGMENT(mola, m) {
  m.def("load_balancing_loss(Tensor[] router_logits, int[] top_k, float coef=0.001, "
        "Tensor? mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mola, CompositeImplicitAutograd, m) {
  m.impl("load_balancing_loss", &mola::detail::load_balancing_loss_impl);
}
