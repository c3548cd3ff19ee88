// kernels/moe_lora_dense.h: parameters and launchers of the kernels around the
// dense-masked strategy of moe_lora (design.md section 4, kernels 2 and 3), the
// dropout passes, and the per-token gate backward both strategies share.
//
//   fused_shrink   reads x once: logits = x Wr^T and h = x~ A_cat^T, the
//                  dropout mask made from its Philox seed inside the load, so
//                  x~ is never stored (used when dropout is active; without
//                  dropout one cuBLAS call on [A_cat; Wr] does the same)
//   gate_scale     u = round(h * round(s * g)) per expert block (forward, and
//                  the backward's recomputation of u for dB)
//   gate_backward  per token, in one pass: dh = du * round(s * w) and
//                  dw = s * sum_r du * h for each routed slot, then through the
//                  renormalisation and the fp32 softmax to the router logits:
//                  dz = P (.) (dP - sum P dP) + grad_logits (design.md 4)
//   dropout        x~ = x (.) m into a buffer, and/or grad_x += m (.) dx~, one
//                  mask generation for both (the backward's two uses)
//
// Numerics as kernels/moe_lora_grouped.h: acc_t<T> arithmetic, one rounding per
// tensor ATen would also have rounded, with one exception: gate_backward sums
// the products du * h of dw in acc_t, where the CPU op rounds each to T first
// ((dU * h).sum in T's tensor), so for bf16/fp16 dw is the more accurate of the
// two (both within the tests' dtype tolerances). Plain C++ (no torch header).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "moe_lora_grouped.h"  // GroupedDropout

namespace mola {
namespace kernels {

// Largest E*r + E the fused shrink keeps per block column sweep; the host glue
// falls back to cuBLAS plus the dropout pass above it.
constexpr int kFusedShrinkMaxCols = 1024;

// hidden[t, n] = sum_c round_T(x[t, c] * M(t*in + c)) * lora_a[n, c]   n < num_a_rows
// logits[t, e] = sum_c x[t, c] * router[e, c]                           e < num_experts
struct FusedShrinkParams {
  const void* x = nullptr;  // [num_tokens, in_features], unit column stride
  int64_t x_row_stride = 0;
  const void* lora_a = nullptr;  // [num_a_rows, in_features] contiguous (A [E, r, in] flat)
  const void* router = nullptr;  // [num_experts, in_features] contiguous
  void* hidden = nullptr;        // [num_tokens, num_a_rows], unit column stride
  int64_t hidden_row_stride = 0;
  void* logits = nullptr;        // [num_tokens, num_experts], unit column stride
  int64_t logits_row_stride = 0;
  int64_t num_tokens = 0;
  int64_t in_features = 0;
  int num_a_rows = 0;  // E * r
  int num_experts = 0;
  GroupedDropout dropout;  // mask over [num_tokens, in_features]
};

// out[t, e*r + rr] = round_T(hidden[t, e*r + rr] * round_T(gate[t, e] * scaling))
struct GateScaleParams {
  const void* hidden = nullptr;  // [num_tokens, E*r] contiguous
  const void* gate = nullptr;    // [num_tokens, E] acc_t<T>, row stride below, unit column stride
  int64_t gate_row_stride = 0;
  void* out = nullptr;           // [num_tokens, E*r] contiguous
  int64_t num_tokens = 0;
  int num_experts = 0;
  int rank = 0;
  double scaling = 1.0;  // cast to acc_t<T> in the kernel (ATen multiplies by the scalar so)
};

// One warp per token. Dense layout (dense = true): du, h, dh are [T, E*r] and
// the routed slot j reads expert idx[t, j]'s block; dh covers every expert
// (gate 0 off the top-k). Grouped layout: du, h, dh are [T*k, r], slot-major.
//   dh          = round_T(du * round_T(s * g))   (g: the gate row, or w at the slot)
//   dw[t, j]    = s * sum_rr du * h              (acc_t; the gradient of w)
//   dz[t, :]    = P (.) (dP - sum_e P_e dP_e) + grad_logits[t, :]
// with P = softmax(logits[t]) in acc_t and dP the gradient of P through the
// renormalisation w = v / sum v (or w = P when top_k == E, dense routing).
struct GateBackwardParams {
  const void* grad_u = nullptr;   // du
  const void* hidden = nullptr;   // h
  void* grad_hidden = nullptr;    // dh (out)
  const void* logits = nullptr;   // [T, E] T, row stride below, unit column stride
  int64_t logits_row_stride = 0;
  const void* gate = nullptr;     // dense only: [T, E] acc_t<T>, row stride below
  int64_t gate_row_stride = 0;
  const void* weights = nullptr;  // [T, k] acc_t<T> contiguous: renormalised w
  const int64_t* indices = nullptr;  // [T, k] contiguous
  const void* grad_logits = nullptr;  // optional [T, E] T (balance loss), row stride below
  int64_t grad_logits_row_stride = 0;
  void* grad_router_logits = nullptr;  // dz [T, E] T contiguous (out)
  int64_t num_tokens = 0;
  int num_experts = 0;
  int top_k = 0;
  int rank = 0;
  double scaling = 1.0;  // cast to acc_t<T> in the kernel (ATen multiplies by the scalar so)
  bool dense = true;
};

// Over n contiguous elements with one mask m (philox.h, index = element index):
//   x_out  = round_T(x * m)                       when x_out != nullptr
//   grad_x = round_T(grad_x + grad_in * m)        when grad_x != nullptr (grad_in required)
// x_out may alias x (in place); grad_in may alias grad_x (then grad_x = grad_x * m,
// the "accumulate" term dropped: set accumulate = false).
struct DropoutParams {
  const void* x = nullptr;
  void* x_out = nullptr;
  const void* grad_in = nullptr;
  void* grad_x = nullptr;
  bool accumulate = true;
  int64_t numel = 0;
  GroupedDropout dropout;
};

template <typename T>
cudaError_t launch_fused_shrink(const FusedShrinkParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_gate_scale(const GateScaleParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_gate_backward(const GateBackwardParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_dropout(const DropoutParams& params, cudaStream_t stream);

#define MOLA_DENSE_EXTERN(T)                                                                    \
  extern template cudaError_t launch_fused_shrink<T>(const FusedShrinkParams&, cudaStream_t);   \
  extern template cudaError_t launch_gate_scale<T>(const GateScaleParams&, cudaStream_t);       \
  extern template cudaError_t launch_gate_backward<T>(const GateBackwardParams&, cudaStream_t); \
  extern template cudaError_t launch_dropout<T>(const DropoutParams&, cudaStream_t);
MOLA_DENSE_EXTERN(double)
MOLA_DENSE_EXTERN(float)
MOLA_DENSE_EXTERN(__half)
MOLA_DENSE_EXTERN(__nv_bfloat16)
#undef MOLA_DENSE_EXTERN

}  // namespace kernels
}  // namespace mola
