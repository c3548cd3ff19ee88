// The moe_lora forward and backward in ATen: readable, device-generic, and the
// reference the CUDA kernels are tested against. Math: docs/design.md, The backward.
//
// Dense-masked: every expert on every token, h = x~ A_cat^T [T, E*r], scaled per
// expert block by s * g[t, e] (g: the [T, E] gate matrix, 0 off the top-k), then
// y += u B_cat^T. Grouped: the (token, slot) pairs sorted by expert and one small
// GEMM pair per expert segment, k/E of the dense work plus indexing. Per-expert
// dropout masks (the default when training with dropout) always run grouped:
// each expert's segment reads its tokens through its own mask.
// Routing and the dropout mask come through the dispatcher (mola::moe_lora_route,
// mola::_dropout_mask), so the backward recomputes exactly what the forward used.
#include "ops/moe_lora_impl.h"
#include "ops/cpu/dropout.h"
#include "ops/cpu/low_precision.h"

#include <philox.h>

#include <mola/ops.h>

#include <ATen/ATen.h>
#include <torch/library.h>

namespace mola::detail {
namespace {

constexpr int64_t kDense = static_cast<int64_t>(ops::Compute::kDense);

// x * mask(seed) for a [T, in] matrix: one fused pass on the CPU; elsewhere
// (the CUDA path's fallback for shapes its kernels do not take) the host-made
// mask, copied over. Both
// compute in fp32 (fp64 for fp64) and round once, as dropout.h defines.
at::Tensor apply_dropout(const at::Tensor& X, double p, const std::optional<at::Tensor>& seed) {
  const auto s = static_cast<uint64_t>(read_dropout_seed(seed));
  if (X.device().is_cpu()) return dropout_apply_cpu(X.contiguous(), s, p);
  const auto acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mask = dropout_mask_values_cpu(s, X.size(0), X.size(1), p).to(X.device(), acc);
  return (X.to(acc) * mask).to(X.scalar_type());
}

// x~ = dropout(x), or x itself when dropout is off. [T, in]
at::Tensor dropout_input(const at::Tensor& X, double p, bool training,
                         const std::optional<at::Tensor>& seed) {
  return dropout_active(p, training) ? apply_dropout(X, p, seed) : X;
}

// Expert e's x~ rows under per-expert masks: X[tok] * mask_e[tok] ([n, in];
// X [T, in]). With grad (same shape, [n, in]) also grad *= mask_e[tok] in
// place, from the same generation of the mask. On the CPU one fused pass;
// elsewhere (the CUDA path's ATen fallback) the host-made mask rows, copied over.
at::Tensor expert_rows(const at::Tensor& X, const at::Tensor& tok, int64_t e, double p,
                       const std::optional<at::Tensor>& seed, at::Tensor* grad = nullptr) {
  const auto s = static_cast<uint64_t>(read_dropout_seed(seed));
  const uint32_t stream = philox::expert_stream(e);
  if (X.device().is_cpu()) {
    const at::Tensor Xc = X.contiguous(), rows = tok.contiguous();
    if (grad != nullptr) return dropout_apply_rows_pair_cpu(Xc, rows, *grad, s, p, stream);
    return dropout_apply_rows_cpu(Xc, rows, s, p, stream);
  }
  const auto acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mask = dropout_mask_values_cpu(s, X.size(0), X.size(1), p, stream)
                              .index_select(0, tok.cpu())
                              .to(X.device(), acc);
  if (grad != nullptr) *grad = (grad->to(acc) * mask).to(grad->scalar_type());
  return (X.index_select(0, tok).to(acc) * mask).to(X.scalar_type());
}

// The routed (token, slot) pairs grouped by expert: `order` lists flat slot ids
// t*k + j sorted by expert, `counts` how many each expert got (on the host: the
// grouped loop needs them to slice; the CUDA kernels sort on the device instead).
struct ExpertSegments {
  at::Tensor order;              // [T*k] int64
  std::vector<int64_t> counts;   // [E]
};

ExpertSegments segment_by_expert(const at::Tensor& idx, int64_t E) {
  at::Tensor flat = idx.reshape({-1});
  at::Tensor order = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  at::Tensor counts = at::bincount(flat, {}, E).cpu();
  return {order, std::vector<int64_t>(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + E)};
}

}  // namespace

// The forward in x's dtype; `weight` may be 16-bit under an fp32 x (the
// CPU's fp32 compute from 16-bit storage, ops/cpu/low_precision.h), whose
// products then read it block by block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  const bool weight_16bit = has_base(weight) && weight.scalar_type() != x.scalar_type();
  const int64_t in = x.size(-1), out = lora_b.size(1), E = router.size(0), r = lora_a.size(1);
  const bool per_expert = per_expert_dropout(dropout_p, training, shared_dropout_mask);
  const int64_t mode = static_cast<int64_t>(
      ops::resolve_compute(static_cast<ops::Compute>(compute), E, r, per_expert));
  at::Tensor X = x.reshape({-1, in});  // [T, in]
  const int64_t T = X.size(0);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;

  const bool dropout = dropout_active(dropout_p, training);
  at::Tensor logits, hidden;  // [T, E], and per strategy (see moe_lora_impl.h)
  if (mode == kDense && !dropout) {
    // Every expert's A and the router read x in one GEMM: [T, E*r + E] = x [A_cat; Wr]^T.
    at::Tensor fused = at::mm(X, shrink_weight(router, lora_a).t());
    hidden = fused.narrow(1, 0, E * r).contiguous();  // [T, E*r]
    logits = fused.narrow(1, E * r, E).contiguous();
  } else {
    logits = at::mm(X, router.t());  // no dropout on the router input
  }
  auto [w, idx, gate] = ops::moe_lora_route(logits, top_k);  // [T,k], [T,k], [T,E]
  // The shared x~ (per-expert masks make each expert's rows below instead).
  at::Tensor Xd = per_expert ? X : dropout_input(X, dropout_p, training, dropout_seed);
  at::Tensor y = !has_base(weight) ? base_free_output(X, bias, out)
                 : weight_16bit     ? linear_from_16bit(X, weight, bias)
                                    : at::linear(X, weight, bias).contiguous();  // [T, out], exactly nn.Linear

  if (mode == kDense) {
    if (!hidden.defined()) hidden = at::mm(Xd, lora_a.reshape({E * r, in}).t());  // [T, E*r]
    at::Tensor g = (gate * scaling).to(x.scalar_type());    // [T, E]
    at::Tensor u = (hidden.view({T, E, r}) * g.unsqueeze(-1)).view({T, E * r});
    y.addmm_(u, cat_lora_b(lora_b).t());  // accumulate into y: beta = 1, no temporary
  } else {
    hidden = at::zeros({T * top_k, r}, X.options());  // [T*k, r], slot-major
    at::Tensor ws = (w.reshape({-1}) * scaling).to(x.scalar_type());  // [T*k]
    const ExpertSegments seg = segment_by_expert(idx, E);
    int64_t start = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = seg.counts[e];
      if (n == 0) continue;
      at::Tensor rows = seg.order.narrow(0, start, n);  // slot ids routed to e
      start += n;
      at::Tensor tok = at::floor_divide(rows, top_k);   // their tokens
      const at::Tensor Xe = per_expert ? expert_rows(X, tok, e, dropout_p, dropout_seed) : Xd.index_select(0, tok);
      at::Tensor he = at::mm(Xe, lora_a[e].t());  // [n, r]
      hidden.index_copy_(0, rows, he);
      at::Tensor ue = he * ws.index_select(0, rows).unsqueeze(1);      // [n, r]
      y.index_add_(0, tok, at::mm(ue, lora_b[e].t()));                 // [n, out]
    }
    hidden = hidden.view({T, top_k, r});
  }
  return {y.view(y_shape), logits, hidden};
}

// The backward in x's dtype; `weight` may be 16-bit under an fp32 x, as in forward_impl.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_impl(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_router_logits,
              const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router,
              const at::Tensor& lora_a, const at::Tensor& lora_b,
              const at::Tensor& router_logits, const at::Tensor& lora_hidden,
              int64_t top_k, double scaling, double dropout_p, bool training,
              int64_t compute, const std::optional<at::Tensor>& dropout_seed,
              bool shared_dropout_mask, std::array<bool, 6> output_mask) {
  const bool base = has_base(weight);
  const bool weight_16bit = base && weight.scalar_type() != x.scalar_type();
  const bool per_expert = per_expert_dropout(dropout_p, training, shared_dropout_mask);
  // dy W, or out += dy W: from 16-bit storage block by block when the weight
  // is; nothing (zeros) in the base-free form.
  const auto dy_w = [&](const at::Tensor& dY) {
    if (!base) return at::zeros({dY.size(0), x.size(-1)}, dY.options());
    if (!weight_16bit) return at::mm(dY, weight);
    at::Tensor out = at::zeros({dY.size(0), weight.size(1)}, dY.options());
    addmm_from_16bit_(out, dY, weight);
    return out;
  };
  const auto add_dy_w = [&](at::Tensor& out, const at::Tensor& dY) -> at::Tensor& {
    if (weight_16bit) addmm_from_16bit_(out, dY, weight);
    else if (base) out.addmm_(dY, weight);
    return out;
  };
  const int64_t in = x.size(-1), out = lora_b.size(1), E = router.size(0), r = lora_a.size(1);
  const int64_t mode = static_cast<int64_t>(
      ops::resolve_compute(static_cast<ops::Compute>(compute), E, r, per_expert));
  const auto dtype = x.scalar_type();
  const auto rdtype = routing_dtype(dtype);
  at::Tensor X = x.reshape({-1, in});             // [T, in]
  at::Tensor dY = grad_y.reshape({-1, out});      // [T, out]
  const int64_t T = X.size(0);
  const bool need_x = output_mask[0], need_router = output_mask[3];
  const bool need_a = output_mask[4], need_b = output_mask[5];

  const bool dropout = dropout_active(dropout_p, training);
  // Dense with dropout on the CPU: grad_x starts as the masked expert term and
  // dy W accumulates into it (beta = 1), which saves an add pass over [T, in].
  const bool dx_on_experts = need_x && mode == kDense && dropout && X.device().is_cpu();

  at::Tensor grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b;
  if (output_mask[1] && base) grad_weight = at::mm(dY.t(), X).to(weight.scalar_type());
  if (output_mask[2]) grad_bias = dY.sum(0);
  if (need_x && !dx_on_experts) grad_x = dy_w(dY);  // base: dy W
  if (!(need_x || need_router || need_a || need_b)) {
    return {grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b};
  }

  auto [w, idx, gate] = ops::moe_lora_route(router_logits, top_k);
  at::Tensor Xd;  // x~ [T, in], regenerated from the seed when a product needs it
  bool dXd_masked = false;  // whether dXd already went through the dropout mask
  if (need_a && mode != kDense && !per_expert) Xd = dropout_input(X, dropout_p, training, dropout_seed);

  at::Tensor dw;    // d loss / d w at the routed slots [T, k], routing dtype
  at::Tensor dXd;   // d loss / d x~ from the experts [T, in]
  at::Tensor dH;    // dense: d loss / d h [T, E*r], joined to the router's products below
  if (mode == kDense) {
    at::Tensor B_cat = cat_lora_b(lora_b);                  // [out, E*r]
    at::Tensor h3 = lora_hidden.view({T, E, r});
    at::Tensor g = (gate * scaling).to(dtype).unsqueeze(-1);  // [T, E, 1]
    at::Tensor dU3 = at::mm(dY, B_cat).view({T, E, r});     // du = dy B_cat
    if (need_b) {
      // dB_cat^T = u^T dy, [E*r, out]: with the long T reduction as the inner
      // dimension of both operands this is ~15 % faster on MKL than dy^T u.
      at::Tensor u = (h3 * g).view({T, E * r});
      grad_b = at::mm(u.t(), dY).view({E, r, out}).transpose(1, 2).contiguous();
    }
    dH = (dU3 * g).view({T, E * r});                        // dh = s g (.) du
    // dg[t, e] = s * sum_r du * h, reduced in the routing dtype (fp32 or wider)
    at::Tensor dg = (dU3 * h3).sum(-1, false, rdtype) * scaling;  // [T, E]
    dw = dg.gather(1, idx);
    if (dropout) {  // x~ differs from x: the expert and router products stay apart
      if (need_x) dXd = at::mm(dH, lora_a.reshape({E * r, in}));
      if (need_x && need_a && X.device().is_cpu()) {
        // One mask generation for both of its uses: x~ for dA, and dx~ -> dx.
        Xd = dropout_apply_pair_cpu(X.contiguous(), dXd,
                                    static_cast<uint64_t>(read_dropout_seed(dropout_seed)),
                                    dropout_p);
        dXd_masked = true;
      } else if (need_a) {
        Xd = dropout_input(X, dropout_p, training, dropout_seed);
      }
      if (need_a) grad_a = at::mm(dH.t(), Xd).view({E, r, in});
      if (dx_on_experts) {
        if (!dXd_masked) dropout_apply_cpu_(dXd, static_cast<uint64_t>(read_dropout_seed(dropout_seed)),
                                            dropout_p);
        grad_x = add_dy_w(dXd, dY);  // m (.) (dH A_cat) + dy W
        dXd = at::Tensor();
      }
    }
  } else {
    at::Tensor h2 = lora_hidden.reshape({T * top_k, r});
    at::Tensor ws = (w.reshape({-1}) * scaling).to(dtype);  // [T*k]
    at::Tensor dw_flat = at::zeros({T * top_k}, X.options().dtype(rdtype));
    if (need_x) dXd = at::zeros({T, in}, X.options());
    if (need_a) grad_a = at::zeros(lora_a.sizes(), lora_a.options());  // contiguous, as the fake
    if (need_b) grad_b = at::zeros(lora_b.sizes(), lora_b.options());
    const ExpertSegments seg = segment_by_expert(idx, E);
    int64_t start = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = seg.counts[e];
      if (n == 0) continue;
      at::Tensor rows = seg.order.narrow(0, start, n);
      start += n;
      at::Tensor tok = at::floor_divide(rows, top_k);
      at::Tensor dYe = dY.index_select(0, tok);               // [n, out]
      at::Tensor he = h2.index_select(0, rows);               // [n, r]
      at::Tensor we = ws.index_select(0, rows).unsqueeze(1);  // [n, 1]
      at::Tensor dUe = at::mm(dYe, lora_b[e]);                // [n, r]
      dw_flat.index_copy_(0, rows, (dUe * he).sum(-1, false, rdtype) * scaling);
      if (need_b) grad_b[e].copy_(at::mm(dYe.t(), he * we));  // [out, r]
      at::Tensor dHe = dUe * we;                              // [n, r]
      if (per_expert) {
        // Expert e's own mask: x~_e for dA_e, and its dx~ term masked before the sum.
        at::Tensor dXe = need_x ? at::mm(dHe, lora_a[e]) : at::Tensor();  // [n, in]
        if (need_a) {
          const at::Tensor Xe = expert_rows(X, tok, e, dropout_p, dropout_seed, need_x ? &dXe : nullptr);
          grad_a[e].copy_(at::mm(dHe.t(), Xe));  // [r, in]
        } else if (need_x) {
          expert_rows(X, tok, e, dropout_p, dropout_seed, &dXe);
        }
        if (need_x) dXd.index_add_(0, tok, dXe);
        continue;
      }
      if (need_a) grad_a[e].copy_(at::mm(dHe.t(), Xd.index_select(0, tok)));  // [r, in]
      if (need_x) dXd.index_add_(0, tok, at::mm(dHe, lora_a[e]));             // [n, in]
    }
    dw = dw_flat.view({T, top_k});
  }
  if (need_x && dXd.defined()) {  // through dropout: the same mask, regenerated (per expert: done above)
    grad_x.add_(dropout && !dXd_masked && !per_expert ? apply_dropout(dXd, dropout_p, dropout_seed) : dXd);
  }
  const bool fold = mode == kDense && !dropout;  // dense, no dropout: [dH | dz] in one GEMM each

  if (need_x || need_router || (need_a && mode == kDense && !dropout)) {
    // Through the renormalisation w = v / sum(v) (skipped when k == E, where w = P),
    // then the softmax: dz = P (.) (dP - sum_e dP_e P_e), in the routing dtype.
    at::Tensor P = at::softmax(router_logits.to(rdtype), -1);  // [T, E]
    at::Tensor dP;
    if (top_k == E) {
      dP = at::zeros_like(P).scatter_(1, idx, dw);
    } else {
      at::Tensor v = P.gather(1, idx);                   // [T, k]
      at::Tensor sum_v = v.sum(-1, /*keepdim=*/true);
      at::Tensor dv = (dw - (dw * w).sum(-1, /*keepdim=*/true)) / sum_v;
      dP = at::zeros_like(P).scatter_(1, idx, dv);
    }
    at::Tensor dz = P * (dP - (dP * P).sum(-1, /*keepdim=*/true));
    if (grad_router_logits && grad_router_logits->defined()) {
      dz = dz + grad_router_logits->reshape({T, E}).to(rdtype);
    }
    dz = dz.to(dtype);
    if (fold) {
      at::Tensor dhz = at::cat({dH, dz}, 1);  // [T, E*r + E]
      if (need_router || need_a) {
        at::Tensor g_cat = at::mm(dhz.t(), X);  // [dA_cat; dWr] = [dH | dz]^T x
        if (need_a) grad_a = g_cat.narrow(0, 0, E * r).view({E, r, in});
        if (need_router) grad_router = g_cat.narrow(0, E * r, E).clone();  // outputs must not alias
      }
      if (need_x) grad_x.addmm_(dhz, shrink_weight(router, lora_a));  // dx += [dH | dz] [A_cat; Wr]
    } else {
      if (need_router) grad_router = at::mm(dz.t(), X);  // [E, in]
      if (need_x) grad_x.addmm_(dz, router);           // dx += dz Wr
    }
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b};
}

namespace {

at::Tensor fp32(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
std::optional<at::Tensor> fp32(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? std::optional<at::Tensor>(t->to(at::kFloat)) : t;
}
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.defined() ? t.to(dtype) : t; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_forward_aten(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  check_moe_lora_args(x, weight, bias, router, lora_a, lora_b, top_k, dropout_p, training, compute,
                      dropout_seed);
  if (!compute_in_fp32_on_cpu(x))
    return forward_impl(x, weight, bias, router, lora_a, lora_b, top_k, scaling, dropout_p, training, compute,
                        dropout_seed, shared_dropout_mask);
  // A CPU without native 16-bit matmul: fp32 compute from 16-bit storage. The
  // outputs come back in x's dtype, as the 16-bit path gives them.
  const auto dtype = x.scalar_type();
  auto [y, logits, hidden] = forward_impl(fp32(x), weight, fp32(bias), fp32(router), fp32(lora_a), fp32(lora_b),
                                          top_k, scaling, dropout_p, training, compute, dropout_seed,
                                          shared_dropout_mask);
  return {y.to(dtype), logits.to(dtype), hidden.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_lora_backward_aten(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_router_logits,
                       const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router,
                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& router_logits, const at::Tensor& lora_hidden,
                       int64_t top_k, double scaling, double dropout_p, bool training,
                       int64_t compute, const std::optional<at::Tensor>& dropout_seed,
                       bool shared_dropout_mask, std::array<bool, 6> output_mask) {
  if (!compute_in_fp32_on_cpu(x))
    return backward_impl(grad_y, grad_router_logits, x, weight, router, lora_a, lora_b, router_logits,
                         lora_hidden, top_k, scaling, dropout_p, training, compute, dropout_seed,
                         shared_dropout_mask, output_mask);
  auto [gx, gw, gb, gr, ga, gb2] =
      backward_impl(fp32(grad_y), fp32(grad_router_logits), fp32(x), weight, fp32(router), fp32(lora_a),
                    fp32(lora_b), fp32(router_logits), fp32(lora_hidden), top_k, scaling, dropout_p, training,
                    compute, dropout_seed, shared_dropout_mask, output_mask);
  return {as_type(gx, x.scalar_type()), gw, gb, as_type(gr, router.scalar_type()),
          as_type(ga, lora_a.scalar_type()), as_type(gb2, lora_b.scalar_type())};
}

}  // namespace mola::detail

TORCH_LIBRARY_IMPL(mola, CPU, m) {
  m.impl("moe_lora", &mola::detail::forward_without_hidden<&mola::detail::moe_lora_forward_aten>);
  m.impl("_moe_lora_forward", &mola::detail::moe_lora_forward_aten);
  m.impl("_moe_lora_backward", &mola::detail::moe_lora_backward_aten);
}
