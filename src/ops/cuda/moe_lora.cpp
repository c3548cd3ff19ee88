// moe_lora on CUDA: host glue around the kernels in kernels/ (moe_lora_dense,
// moe_lora_grouped, gate, dropout, moe_lora_route), with cuBLAS (through ATen's mm/addmm, which
// call it with beta = 1 when they accumulate) for the wide products. The math
// and the ATen oracle are in src/ops/cpu/moe_lora.cpp; this file mirrors its
// structure step by step, replacing what ATen cannot do without extra passes
// or host synchronisation:
//   - dropout: the Philox mask is generated inside the kernels that read x
//     (fused shrink, grouped shrink, the weight gradient) or write dx (grouped
//     expand, the dropout pass), from the seed, never stored;
//   - grouped: the sort by expert, segment offsets and the grouped products on
//     the device with grids fixed by the shapes, so nothing reads a count back;
//   - the gate scale and the gate/routing backward: one kernel each.
// No call here synchronises with the host (a CUDA seed tensor is read by the
// kernels; a CPU one is read on the host, no device involved), so forward and
// backward can be captured in a CUDA graph. What the kernels do not cover
// (more than 256 experts, rank above 64, more than 2^31 routed slots) runs the
// ATen composition on the GPU instead, which is correct but synchronises.
#include "ops/moe_lora_impl.h"

#include <mola/ops.h>

#include <moe_lora_dense.h>  // kernels/, on the include path
#include <moe_lora_grouped.h>
#include <moe_lora_route.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace mola::detail {
namespace {

namespace k = mola::kernels;
constexpr int64_t kDense = static_cast<int64_t>(ops::Compute::kDense);

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Calls launch<T> for x's dtype; the kernels cover fp64, fp32, fp16, bf16.
template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kDouble: err = fn(double{}); break;
    case at::kFloat: err = fn(float{}); break;
    case at::kHalf: err = fn(__half{}); break;
    case at::kBFloat16: err = fn(__nv_bfloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "moe_lora (CUDA): dtype ", dtype, " reached the kernels");
  }
  C10_CUDA_CHECK(err);
}

// Whether the kernels take this call; otherwise the ATen composition runs.
// (A layer with no input or output features, which the kernels' launchers
// refuse, runs there too: it has nothing to compute.)
bool kernels_cover(const at::Tensor& x, int64_t out_features, int64_t num_experts, int64_t rank,
                   int64_t top_k) {
  const auto dtype = x.scalar_type();
  const bool dtype_ok = dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                        dtype == at::kBFloat16;
  const int64_t tokens = x.numel() / std::max<int64_t>(x.size(-1), 1);
  return dtype_ok && num_experts <= k::kGroupedMaxExperts &&
         num_experts <= k::kMoeLoraRouteMaxExperts && rank <= k::kGroupedMaxRank &&
         tokens * top_k < (int64_t{1} << 31) && tokens > 0 && out_features > 0;
}

// The dropout parameters the kernels take: a CUDA seed tensor is passed by
// pointer (read on the device: graph replays see its current value), a CPU
// one by value.
k::DropoutMask make_dropout(double p, bool training,
                               const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  k::DropoutMask d;
  d.enabled = dropout_active(p, training);
  if (!d.enabled) return d;
  d.p = static_cast<float>(p);
  d.per_expert = !shared_dropout_mask;
  if (dropout_seed->is_cuda()) {
    d.seed_ptr = dropout_seed->const_data_ptr<int64_t>();
  } else {
    d.seed = static_cast<uint64_t>(read_dropout_seed(dropout_seed));
  }
  return d;
}

// The routing: (w [T, k], idx [T, k], gate [T, E]) in the routing dtype, from
// the routing kernel (or its ATen twin for fp64), through the dispatcher so the
// backward recomputes exactly what the forward used.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t top_k) {
  return ops::moe_lora_route(logits, top_k);
}

// The routed slots sorted by expert, on the device (kernels/moe_lora_grouped.h).
struct Sorted {
  at::Tensor storage;  // int32: sorted slots, expert offsets, tile offsets, scratch
  const int32_t* slots = nullptr;
  const int32_t* expert_offsets = nullptr;
  const int32_t* tile_offsets = nullptr;
};

Sorted sort_slots(const at::Tensor& idx, int64_t E) {
  const int64_t slots = idx.numel();
  const int64_t scratch = k::grouped_sort_workspace_elems(slots, static_cast<int>(E));
  Sorted s;
  s.storage = at::empty({slots + 2 * (E + 1) + scratch}, idx.options().dtype(at::kInt));
  int32_t* base = s.storage.mutable_data_ptr<int32_t>();
  k::GroupedSortParams p;
  p.indices = idx.const_data_ptr<int64_t>();
  p.num_slots = slots;
  p.num_experts = static_cast<int>(E);
  p.sorted_slots = base;
  p.expert_offsets = base + slots;
  p.tile_offsets = base + slots + (E + 1);
  p.workspace = base + slots + 2 * (E + 1);
  C10_CUDA_CHECK(k::launch_grouped_sort(p, stream()));
  s.slots = p.sorted_slots;
  s.expert_offsets = p.expert_offsets;
  s.tile_offsets = p.tile_offsets;
  return s;
}

// The fields GroupedShrinkParams and GroupedWeightGradParams share: the
// sorted segments, the sizes (input [T, in_features]) and the dropout.
template <typename Params>
void set_segment_fields(Params& p, const at::Tensor& input, const Sorted& sorted, int64_t top_k,
                        int64_t E, int64_t r, const k::DropoutMask& drop) {
  p.sorted_slots = sorted.slots;
  p.expert_offsets = sorted.expert_offsets;
  p.num_tokens = input.size(0);
  p.top_k = static_cast<int>(top_k);
  p.num_experts = static_cast<int>(E);
  p.rank = static_cast<int>(r);
  p.in_features = input.size(1);
  p.dropout = drop;
}

// out[s, :] = in~[s / k] W_e^T for every slot s (GroupedShrinkParams).
at::Tensor grouped_shrink(const at::Tensor& input, const at::Tensor& weight,
                          std::array<int64_t, 3> strides_erk, const Sorted& sorted,
                          int64_t top_k, int64_t E, int64_t r, const k::DropoutMask& drop) {
  const int64_t T = input.size(0);
  at::Tensor out = at::empty({T * top_k, r}, input.options());
  k::GroupedShrinkParams p;
  p.input = input.const_data_ptr();
  p.input_row_stride = input.stride(0);
  p.weight = weight.const_data_ptr();
  p.w_stride_e = strides_erk[0];
  p.w_stride_r = strides_erk[1];
  p.w_stride_k = strides_erk[2];
  p.out = out.mutable_data_ptr();
  p.tile_offsets = sorted.tile_offsets;
  set_segment_fields(p, input, sorted, top_k, E, r, drop);
  dispatch(input.scalar_type(), [&](auto tag) {
    return k::launch_grouped_shrink<decltype(tag)>(p, stream());
  });
  return out;
}

// out[t, :] += M (.) sum_j u[t*k+j] W_{e_j}^T (GroupedExpandParams), in place.
void grouped_expand(at::Tensor& out, const at::Tensor& v, const at::Tensor* coef, double scaling,
                    const at::Tensor& idx, const at::Tensor& weight,
                    std::array<int64_t, 3> strides_ecr, int64_t E, int64_t r,
                    const k::DropoutMask& drop) {
  k::GroupedExpandParams p;
  p.v = v.const_data_ptr();
  p.coef = coef != nullptr ? coef->const_data_ptr() : nullptr;
  p.scaling = scaling;
  p.indices = idx.const_data_ptr<int64_t>();
  p.weight = weight.const_data_ptr();
  p.w_stride_e = strides_ecr[0];
  p.w_stride_c = strides_ecr[1];
  p.w_stride_r = strides_ecr[2];
  p.out = out.mutable_data_ptr();
  p.out_row_stride = out.stride(0);
  p.accumulate = true;
  p.num_tokens = out.size(0);
  p.top_k = static_cast<int>(idx.size(1));
  p.num_experts = static_cast<int>(E);
  p.rank = static_cast<int>(r);
  p.out_features = out.size(1);
  p.dropout = drop;
  dispatch(out.scalar_type(), [&](auto tag) {
    return k::launch_grouped_expand<decltype(tag)>(p, stream());
  });
}

// G[e] = sum over e's slots of in~[t]^T u[s] into a new tensor of `shape`
// whose (e, c, rr) element sits at the given strides (GroupedWeightGradParams).
at::Tensor grouped_weight_grad(const at::Tensor& input, const at::Tensor& v, const at::Tensor* coef,
                               double scaling, const Sorted& sorted, int64_t top_k, int64_t E,
                               int64_t r, at::IntArrayRef shape, std::array<int64_t, 3> strides_ecr,
                               const k::DropoutMask& drop) {
  at::Tensor grad = at::empty(shape, input.options());
  k::GroupedWeightGradParams p;
  p.input = input.const_data_ptr();
  p.input_row_stride = input.stride(0);
  p.v = v.const_data_ptr();
  p.coef = coef != nullptr ? coef->const_data_ptr() : nullptr;
  p.scaling = scaling;
  p.grad = grad.mutable_data_ptr();
  p.g_stride_e = strides_ecr[0];
  p.g_stride_c = strides_ecr[1];
  p.g_stride_r = strides_ecr[2];
  set_segment_fields(p, input, sorted, top_k, E, r, drop);
  dispatch(input.scalar_type(), [&](auto tag) {
    return k::launch_grouped_weight_grad<decltype(tag)>(p, stream());
  });
  return grad;
}

// u = h * round(s * g) per expert block, [T, E*r].
at::Tensor gate_scale(const at::Tensor& hidden, const at::Tensor& gate, double scaling, int64_t E,
                      int64_t r) {
  at::Tensor out = at::empty_like(hidden);
  k::GateScaleParams p;
  p.hidden = hidden.const_data_ptr();
  p.gate = gate.const_data_ptr();
  p.gate_row_stride = gate.stride(0);
  p.out = out.mutable_data_ptr();
  p.num_tokens = hidden.size(0);
  p.num_experts = static_cast<int>(E);
  p.rank = static_cast<int>(r);
  p.scaling = scaling;
  dispatch(hidden.scalar_type(), [&](auto tag) {
    return k::launch_gate_scale<decltype(tag)>(p, stream());
  });
  return out;
}

// Fills x_out = x (.) m and/or grad_x += dx~ (.) m (DropoutParams); all contiguous.
void dropout_pass(const at::Tensor& x, at::Tensor* x_out, const at::Tensor* grad_in,
                  at::Tensor* grad_x, const k::DropoutMask& drop) {
  k::DropoutParams p;
  p.x = x.const_data_ptr();
  p.x_out = x_out != nullptr ? x_out->mutable_data_ptr() : nullptr;
  p.grad_in = grad_in != nullptr ? grad_in->const_data_ptr() : nullptr;
  p.grad_x = grad_x != nullptr ? grad_x->mutable_data_ptr() : nullptr;
  p.accumulate = true;
  p.numel = x.numel();
  p.dropout = drop;
  dispatch(x.scalar_type(), [&](auto tag) { return k::launch_dropout<decltype(tag)>(p, stream()); });
}

// What forward and backward both start from: the strategy, the adapter
// contiguous, and x as [T, in] with unit column stride (the kernels take a
// row stride only).
struct Operands {
  int64_t mode;
  at::Tensor router, lora_a, lora_b, X;
};

Operands prepare(const at::Tensor& x, const at::Tensor& router, const at::Tensor& lora_a,
                 const at::Tensor& lora_b, int64_t compute, bool per_expert) {
  const int64_t mode = static_cast<int64_t>(ops::resolve_compute(
      static_cast<ops::Compute>(compute), router.size(0), lora_a.size(1), per_expert));
  at::Tensor X = x.reshape({-1, x.size(-1)});
  if (X.stride(1) != 1) X = X.contiguous();
  return {mode, router.contiguous(), lora_a.contiguous(), lora_b.contiguous(), X};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router_in, const at::Tensor& lora_a_in, const at::Tensor& lora_b_in,
    int64_t top_k, double scaling, double dropout_p, bool training, int64_t compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  check_moe_lora_args(x, weight, bias, router_in, lora_a_in, lora_b_in, top_k, dropout_p,
                      training, compute, dropout_seed);
  const int64_t in = x.size(-1), out = lora_b_in.size(1), E = router_in.size(0);
  const int64_t r = lora_a_in.size(1);
  if (!kernels_cover(x, out, E, r, top_k)) {
    return moe_lora_forward_aten(x, weight, bias, router_in, lora_a_in, lora_b_in, top_k, scaling,
                                 dropout_p, training, compute, dropout_seed, shared_dropout_mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands ops_in = prepare(x, router_in, lora_a_in, lora_b_in, compute,
                                  per_expert_dropout(dropout_p, training, shared_dropout_mask));
  const int64_t mode = ops_in.mode;
  const at::Tensor &router = ops_in.router, &lora_a = ops_in.lora_a, &lora_b = ops_in.lora_b;
  const at::Tensor& X = ops_in.X;
  const int64_t T = X.size(0);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  const k::DropoutMask drop = make_dropout(dropout_p, training, dropout_seed, shared_dropout_mask);

  at::Tensor logits, hidden;
  if (mode == kDense && !drop.enabled) {
    // One cuBLAS GEMM reads x for the experts and the router: [T, E*r + E].
    at::Tensor fused = at::mm(X, shrink_weight(router, lora_a).t());
    hidden = fused.narrow(1, 0, E * r).contiguous();
    logits = fused.narrow(1, E * r, E).contiguous();
  } else if (mode == kDense && (E * r + 15) / 16 * 16 + E <= k::kFusedShrinkMaxCols) {
    // The fused shrink: x read once, the mask made in the load, x~ never stored.
    hidden = at::empty({T, E * r}, X.options());
    logits = at::empty({T, E}, X.options());
    k::FusedShrinkParams p;
    p.x = X.const_data_ptr();
    p.x_row_stride = X.stride(0);
    p.lora_a = lora_a.const_data_ptr();
    p.router = router.const_data_ptr();
    p.hidden = hidden.mutable_data_ptr();
    p.hidden_row_stride = hidden.stride(0);
    p.logits = logits.mutable_data_ptr();
    p.logits_row_stride = logits.stride(0);
    p.num_tokens = T;
    p.in_features = in;
    p.num_a_rows = static_cast<int>(E * r);
    p.num_experts = static_cast<int>(E);
    p.dropout = drop;
    dispatch(X.scalar_type(), [&](auto tag) {
      return k::launch_fused_shrink<decltype(tag)>(p, stream());
    });
  } else {
    logits = at::mm(X, router.t());  // no dropout on the router input
  }
  auto [w, idx, gate] = route(logits, top_k);  // [T, k], [T, k], [T, E]
  at::Tensor y = has_base(weight) ? at::linear(X, weight, bias).contiguous()  // [T, out], exactly nn.Linear
                                  : base_free_output(X, bias, out);

  if (mode == kDense) {
    if (!hidden.defined()) {  // wide E*r with dropout: the mask pass, then cuBLAS
      at::Tensor Xd = at::empty({T, in}, X.options());
      at::Tensor Xc = X.contiguous();
      dropout_pass(Xc, &Xd, nullptr, nullptr, drop);
      hidden = at::mm(Xd, lora_a.reshape({E * r, in}).t());
    }
    at::Tensor u = gate_scale(hidden, gate, scaling, E, r);  // [T, E*r]
    y.addmm_(u, cat_lora_b(lora_b).t());                     // beta = 1 into y
  } else {
    const Sorted sorted = sort_slots(idx, E);
    // h[s] = x~[t] A_e^T: W(e, rr, kk) = A[e, rr, kk].
    hidden = grouped_shrink(X, lora_a, {r * in, in, 1}, sorted, top_k, E, r, drop);
    // y[t] += sum_j s w_j h[t, j] B_e^T: W(e, c, rr) = B[e, c, rr].
    at::Tensor w_flat = w.reshape({-1}).contiguous();  // the kernel reads it with unit stride
    grouped_expand(y, hidden, &w_flat, scaling, idx, lora_b, {out * r, r, 1}, E, r,
                   k::DropoutMask{});
    hidden = hidden.view({T, top_k, r});
  }
  return {y.view(y_shape), logits, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_lora_backward_cuda(const at::Tensor& grad_y,
                       const std::optional<at::Tensor>& grad_router_logits, const at::Tensor& x,
                       const at::Tensor& weight, const at::Tensor& router_in,
                       const at::Tensor& lora_a_in, const at::Tensor& lora_b_in,
                       const at::Tensor& router_logits, const at::Tensor& lora_hidden,
                       int64_t top_k, double scaling, double dropout_p, bool training,
                       int64_t compute, const std::optional<at::Tensor>& dropout_seed,
                       bool shared_dropout_mask, std::array<bool, 6> output_mask) {
  const int64_t in = x.size(-1), out = lora_b_in.size(1), E = router_in.size(0);
  const int64_t r = lora_a_in.size(1);
  if (!kernels_cover(x, out, E, r, top_k)) {
    return moe_lora_backward_aten(grad_y, grad_router_logits, x, weight, router_in, lora_a_in,
                                  lora_b_in, router_logits, lora_hidden, top_k, scaling, dropout_p,
                                  training, compute, dropout_seed, shared_dropout_mask, output_mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands ops_in = prepare(x, router_in, lora_a_in, lora_b_in, compute,
                                  per_expert_dropout(dropout_p, training, shared_dropout_mask));
  const int64_t mode = ops_in.mode;
  const at::Tensor &router = ops_in.router, &lora_a = ops_in.lora_a, &lora_b = ops_in.lora_b;
  const at::Tensor& X = ops_in.X;
  // In x's dtype: autograd casts, a direct call of the op may not, and the kernels
  // read every operand as one type.
  const at::Tensor dY = grad_y.reshape({-1, out}).to(x.scalar_type()).contiguous();  // [T, out]
  const int64_t T = X.size(0);
  const bool need_x = output_mask[0], need_router = output_mask[3];
  const bool need_a = output_mask[4], need_b = output_mask[5];
  const k::DropoutMask drop = make_dropout(dropout_p, training, dropout_seed, shared_dropout_mask);

  at::Tensor grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b;
  if (output_mask[1] && has_base(weight)) grad_weight = at::mm(dY.t(), X);
  if (output_mask[2]) grad_bias = dY.sum(0);
  if (need_x) grad_x = has_base(weight) ? at::mm(dY, weight)  // base: dy W, [T, in] contiguous
                                        : at::zeros({T, in}, X.options());
  if (!(need_x || need_router || need_a || need_b)) {
    return {grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b};
  }

  auto [w, idx, gate] = route(router_logits, top_k);
  at::Tensor logits = router_logits.reshape({T, E});
  if (logits.stride(1) != 1) logits = logits.contiguous();
  at::Tensor glogits;  // the gradient reaching the logits directly (balance loss)
  if (grad_router_logits && grad_router_logits->defined()) {
    glogits = grad_router_logits->reshape({T, E}).to(logits.scalar_type());
    if (glogits.stride(1) != 1) glogits = glogits.contiguous();
  }
  const at::Tensor w_flat = w.reshape({-1}).contiguous();  // [T*k], routing dtype

  // dh and dz from du, h and the routing (kernels/gate.h, gate_backward).
  auto gate_backward = [&](const at::Tensor& dU, const at::Tensor& h, bool dense) {
    at::Tensor dH = at::empty_like(dU);
    at::Tensor dz = at::empty({T, E}, X.options());
    k::GateBackwardParams p;
    p.grad_u = dU.const_data_ptr();
    p.hidden = h.const_data_ptr();
    p.grad_hidden = dH.mutable_data_ptr();
    p.logits = logits.const_data_ptr();
    p.logits_row_stride = logits.stride(0);
    p.gate = dense ? gate.const_data_ptr() : nullptr;
    p.gate_row_stride = dense ? gate.stride(0) : 0;
    p.weights = w_flat.const_data_ptr();
    p.indices = idx.const_data_ptr<int64_t>();
    p.grad_logits = glogits.defined() ? glogits.const_data_ptr() : nullptr;
    p.grad_logits_row_stride = glogits.defined() ? glogits.stride(0) : 0;
    p.grad_router_logits = dz.mutable_data_ptr();
    p.num_tokens = T;
    p.num_experts = static_cast<int>(E);
    p.top_k = static_cast<int>(top_k);
    p.rank = static_cast<int>(r);
    p.scaling = scaling;
    p.dense = dense;
    dispatch(X.scalar_type(), [&](auto tag) {
      return k::launch_gate_backward<decltype(tag)>(p, stream());
    });
    return std::make_pair(dH, dz);
  };

  at::Tensor dz;
  if (mode == kDense) {
    const at::Tensor h = lora_hidden.reshape({T, E * r}).contiguous();
    const at::Tensor B_cat = cat_lora_b(lora_b);  // [out, E*r]
    const at::Tensor dU = at::mm(dY, B_cat);      // du = dy B_cat, [T, E*r]
    if (need_b) {
      at::Tensor u = gate_scale(h, gate, scaling, E, r);
      grad_b = at::mm(dY.t(), u).view({out, E, r}).permute({1, 0, 2}).contiguous();
    }
    at::Tensor dH;
    std::tie(dH, dz) = gate_backward(dU, h, /*dense=*/true);
    if (drop.enabled) {
      // x~ and dx~ -> dx with one mask generation; x~ only lives until dA is made.
      at::Tensor dXd, Xd;
      if (need_x) dXd = at::mm(dH, lora_a.reshape({E * r, in}));  // [T, in]
      if (need_a) Xd = at::empty({T, in}, X.options());
      const at::Tensor Xc = X.contiguous();
      dropout_pass(Xc, need_a ? &Xd : nullptr, need_x ? &dXd : nullptr,
                   need_x ? &grad_x : nullptr, drop);
      if (need_a) grad_a = at::mm(dH.t(), Xd).view({E, r, in});
      if (need_router) grad_router = at::mm(dz.t(), X);
      if (need_x) grad_x.addmm_(dz, router);
    } else {
      at::Tensor dhz = at::cat({dH, dz}, 1);  // [T, E*r + E]
      if (need_router || need_a) {
        at::Tensor g_cat = at::mm(dhz.t(), X);  // [dA_cat; dWr]
        if (need_a) grad_a = g_cat.narrow(0, 0, E * r).view({E, r, in});
        if (need_router) grad_router = g_cat.narrow(0, E * r, E).clone();
      }
      if (need_x) grad_x.addmm_(dhz, shrink_weight(router, lora_a));
    }
  } else {
    const at::Tensor h = lora_hidden.reshape({T * top_k, r}).contiguous();
    const Sorted sorted = sort_slots(idx, E);
    // du[s] = dy[t] B_e: W(e, rr, kk) = B[e, kk, rr].
    const at::Tensor dU = grouped_shrink(dY, lora_b, {out * r, 1, r}, sorted, top_k, E, r,
                                         k::DropoutMask{});
    at::Tensor dH;
    std::tie(dH, dz) = gate_backward(dU, h, /*dense=*/false);
    if (need_b) {  // dB_e = dy_e^T (s w h)_e, laid out [E, out, r]
      grad_b = grouped_weight_grad(dY, h, &w_flat, scaling, sorted, top_k, E, r, {E, out, r},
                                   {out * r, r, 1}, k::DropoutMask{});
    }
    if (need_a) {  // dA_e = dh_e^T x~_e, laid out [E, r, in]
      grad_a = grouped_weight_grad(X, dH, nullptr, 1.0, sorted, top_k, E, r, {E, r, in},
                                   {r * in, 1, in}, drop);
    }
    if (need_x) {  // dx += m (.) sum_j dh[t, j] A_e: W(e, c, rr) = A[e, rr, c]
      grouped_expand(grad_x, dH, nullptr, 1.0, idx, lora_a, {r * in, 1, in}, E, r, drop);
    }
    if (need_router) grad_router = at::mm(dz.t(), X);
    if (need_x) grad_x.addmm_(dz, router);
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_weight, grad_bias, grad_router, grad_a, grad_b};
}

}  // namespace
}  // namespace mola::detail

TORCH_LIBRARY_IMPL(mola, CUDA, m) {
  m.impl("moe_lora", &mola::detail::forward_without_hidden<&mola::detail::moe_lora_forward_cuda>);
  m.impl("_moe_lora_forward", &mola::detail::moe_lora_forward_cuda);
  m.impl("_moe_lora_backward", &mola::detail::moe_lora_backward_cuda);
}
