// kernels/gate.h: the per-token gate steps both strategies of moe_lora share
// (docs/design.md, Strategies and kernels).
//
//   gate_scale     u = round(h * round(s * g)) per expert block (forward, and
//                  the backward's recomputation of u for dB)
//   gate_backward  per token, in one pass: dh = du * round(s * w) and
//                  dw = s * sum_r du * h for each routed slot, then through the
//                  renormalisation and the fp32 softmax to the router logits:
//                  dz = P (.) (dP - sum P dP) + grad_logits
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

namespace mola {
namespace kernels {

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

template <typename T>
cudaError_t launch_gate_scale(const GateScaleParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_gate_backward(const GateBackwardParams& params, cudaStream_t stream);

#define MOLA_GATE_EXTERN(T) \
  extern template cudaError_t launch_gate_scale<T>(const GateScaleParams&, cudaStream_t); \
  extern template cudaError_t launch_gate_backward<T>(const GateBackwardParams&, cudaStream_t);
MOLA_GATE_EXTERN(double)
MOLA_GATE_EXTERN(float)
MOLA_GATE_EXTERN(__half)
MOLA_GATE_EXTERN(__nv_bfloat16)
#undef MOLA_GATE_EXTERN

}  // namespace kernels
}  // namespace mola
