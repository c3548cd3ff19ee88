// kernels/moe_lora_dense.h: parameters and launcher of the fused shrink of the
// dense-masked strategy of moe_lora (docs/design.md, Strategies and kernels,
// kernels 2 and 3). The gate steps both strategies share are in gate.h, the
// dropout passes in dropout.h.
//
//   fused_shrink   reads x once: logits = x Wr^T and h = x~ A_cat^T, the
//                  dropout mask made from its Philox seed inside the load, so
//                  x~ is never stored (used when dropout is active; without
//                  dropout one cuBLAS call on [A_cat; Wr] does the same)
//
// Numerics as kernels/moe_lora_grouped.h: acc_t<T> arithmetic, one rounding per
// tensor ATen would also have rounded. Plain C++ (no torch header).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "dropout.h"  // DropoutMask
#include "gate.h"     // what the dense strategy runs with the fused shrink

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
  DropoutMask dropout;  // mask over [num_tokens, in_features]
};

template <typename T>
cudaError_t launch_fused_shrink(const FusedShrinkParams& params, cudaStream_t stream);

#define MOLA_DENSE_EXTERN(T)                                                                    \
  extern template cudaError_t launch_fused_shrink<T>(const FusedShrinkParams&, cudaStream_t);
MOLA_DENSE_EXTERN(double)
MOLA_DENSE_EXTERN(float)
MOLA_DENSE_EXTERN(__half)
MOLA_DENSE_EXTERN(__nv_bfloat16)
#undef MOLA_DENSE_EXTERN

}  // namespace kernels
}  // namespace mola
