// kernels/moe_lora_grouped.h: parameters and launchers of the grouped (sparse)
// strategy of moe_lora (docs/design.md, Strategies and kernels, kernel 4): each routed
// (token, slot) pair does only its own expert's work, k/E of the dense FLOPs.
//
// A "slot" is the flat id s = t * top_k + j of the j-th expert chosen for token
// t (indices [T, top_k], row-major). Every per-slot tensor is [T * top_k, ...]
// in slot order, the layout the ATen path saves for backward ([T, k, r]).
//
// The pieces, and which product of the layer each one computes:
//   grouped_sort          slot ids stable-sorted by expert, per-expert segment
//                         offsets and tile offsets, on the device (no host
//                         synchronisation: the grids below have fixed sizes)
//   grouped_shrink        out[s, :] = in~[t] W_e^T       forward h = x~ A_e^T;
//                         backward du = dy B_e (W given by strides)
//   grouped_expand        out[t, :] (+)= sum_j c_j u[t*k+j] W_{e_j}^T, an
//                         optional dropout mask on the sum: forward
//                         y += s w h B_e^T; backward dx += mask (.) dh A_e
//   grouped_weight_grad   G_e = sum over e's slots of in~[t]^T (c_s v[s]):
//                         dA_e = dh_e^T x~_e and dB_e = dy_e^T u_e
//
// Numerics: loads widened to acc_t<T> (fp32; fp64 for double), sums in acc_t,
// one rounding to T at the store. The intermediates the ATen path rounds as
// tensors of their own (h, u = s w h, the masked x~) are rounded the same way
// here. The ATen path rounds more often where the kernels fuse: y and dx take
// one rounding per routed expert there (index_add_ of each expert's product)
// against one here, and the products du * h of dw are rounded before their
// sum. For fp32/fp64 that is summation order; for bf16/fp16 the kernels are the
// more accurate side, and the CUDA tests bound both against an fp64 oracle with
// dtype-derived tolerances rather than against each other. Dropout follows
// kernels/philox.h: element (t, c) of a [T, C] matrix uses mask index t * C + c.
//
// Plain C++ (no torch): the host glue in src/ops/cuda/moe_lora.cpp fills these
// structs from tensors. Supported: 1 <= rank <= kGroupedMaxRank,
// 1 <= num_experts <= kGroupedMaxExperts, num_tokens * top_k < 2^31.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "dropout.h"  // DropoutMask

namespace mola {
namespace kernels {

constexpr int kGroupedMaxRank = 64;
constexpr int kGroupedMaxExperts = 256;
// Rows (slots of one expert) per tile of grouped_shrink: the tile offsets that
// grouped_sort writes count tiles of this many rows.
constexpr int kGroupedTileRows = 64;

// The sorted routing, all device pointers the caller allocates.
struct GroupedSortParams {
  const int64_t* indices = nullptr;  // [num_slots] expert of each slot (indices [T, k] flat)
  int64_t num_slots = 0;             // T * top_k
  int num_experts = 0;

  int32_t* sorted_slots = nullptr;    // [num_slots] out: slot ids, stable by expert
  int32_t* expert_offsets = nullptr;  // [num_experts + 1] out: segment starts; last = num_slots
  int32_t* tile_offsets = nullptr;    // [num_experts + 1] out: first tile of each expert
                                      // (ceil(count_e / kGroupedTileRows) tiles each); last = total
  int32_t* workspace = nullptr;       // grouped_sort_workspace_elems(...) int32s, scratch
};

// Int32 elements of scratch grouped_sort needs.
int64_t grouped_sort_workspace_elems(int64_t num_slots, int num_experts);

// An upper bound on the tiles of a sorted routing, used as the fixed grid size
// of grouped_shrink: ceil(num_slots / kGroupedTileRows) + num_experts.
int64_t grouped_max_tiles(int64_t num_slots, int num_experts);

cudaError_t launch_grouped_sort(const GroupedSortParams& params, cudaStream_t stream);

// out[s, rr] = sum_kk in~[t, kk] * W[e, rr, kk], s a slot of expert e, t = s / top_k.
// W element (e, rr, kk) at weight + e*w_stride_e + rr*w_stride_r + kk*w_stride_k.
// in~ = in (.) mask when dropout is enabled (mask over [num_tokens, in_features]);
// the masked value is rounded to T before the product, as ATen's x~ tensor is.
struct GroupedShrinkParams {
  const void* input = nullptr;  // [num_tokens, in_features], unit column stride
  int64_t input_row_stride = 0;
  const void* weight = nullptr;
  int64_t w_stride_e = 0, w_stride_r = 0, w_stride_k = 0;
  void* out = nullptr;  // [num_slots, rank] contiguous, written (not accumulated)

  const int32_t* sorted_slots = nullptr;    // from grouped_sort
  const int32_t* expert_offsets = nullptr;  // from grouped_sort
  const int32_t* tile_offsets = nullptr;    // from grouped_sort

  int64_t num_tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int rank = 0;
  int64_t in_features = 0;
  DropoutMask dropout;
};

// out[t, c] = round(out[t, c] + M(t, c) * sum_j sum_rr u[t*k+j, rr] * W[e_j, c, rr])
// (per-expert dropout: sum_j M_{e_j}(t, c) * sum_rr ..., each slot's term
// through its expert's mask)
// with e_j = indices[t, j], u[s, rr] = round_T(v[s, rr] * round_T(coef[s] * scaling))
// (coef == nullptr: u = v), M the dropout multiplier (1 when disabled), and
// the old out value left out when accumulate is false.
// W element (e, c, rr) at weight + e*w_stride_e + c*w_stride_c + rr*w_stride_r.
struct GroupedExpandParams {
  const void* v = nullptr;      // [num_slots, rank] contiguous
  const void* coef = nullptr;   // [num_slots] acc_t<T> (fp32; fp64 for double), or nullptr
  double scaling = 1.0;  // cast to acc_t<T> in the kernel (ATen multiplies by the scalar so)
  const int64_t* indices = nullptr;  // [num_tokens, top_k] contiguous
  const void* weight = nullptr;
  int64_t w_stride_e = 0, w_stride_c = 0, w_stride_r = 0;
  void* out = nullptr;  // [num_tokens, out_features], unit column stride
  int64_t out_row_stride = 0;
  bool accumulate = true;

  int64_t num_tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int rank = 0;
  int64_t out_features = 0;
  DropoutMask dropout;  // mask over [num_tokens, out_features], applied to the sum
};

// G[e, c, rr] = sum over the slots s of expert e, in sorted order, of
// in~[t, c] * u[s, rr], t = s / top_k, u as in GroupedExpandParams, in~ as in
// GroupedShrinkParams. Written (not accumulated); an expert with no slots gets 0.
// G element (e, c, rr) at grad + e*g_stride_e + c*g_stride_c + rr*g_stride_r.
// Deterministic: each output element is summed by one thread block in slot order.
struct GroupedWeightGradParams {
  const void* input = nullptr;  // [num_tokens, in_features], unit column stride
  int64_t input_row_stride = 0;
  const void* v = nullptr;      // [num_slots, rank] contiguous
  const void* coef = nullptr;   // [num_slots] acc_t<T>, or nullptr
  double scaling = 1.0;  // cast to acc_t<T> in the kernel (ATen multiplies by the scalar so)
  void* grad = nullptr;
  int64_t g_stride_e = 0, g_stride_c = 0, g_stride_r = 0;

  const int32_t* sorted_slots = nullptr;
  const int32_t* expert_offsets = nullptr;

  int64_t num_tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int rank = 0;
  int64_t in_features = 0;
  DropoutMask dropout;  // mask over [num_tokens, in_features]
};

// T is double, float, __half or __nv_bfloat16. None synchronises; grids depend
// only on the sizes, so the calls can be captured in a CUDA graph. Each returns
// cudaErrorInvalidValue for parameters outside the documented ranges (nothing
// launched), otherwise cudaGetLastError() after its launches; num_tokens == 0
// launches nothing.
template <typename T>
cudaError_t launch_grouped_shrink(const GroupedShrinkParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_grouped_expand(const GroupedExpandParams& params, cudaStream_t stream);
template <typename T>
cudaError_t launch_grouped_weight_grad(const GroupedWeightGradParams& params,
                                       cudaStream_t stream);

#define MOLA_GROUPED_EXTERN(T)                                                                   \
  extern template cudaError_t launch_grouped_shrink<T>(const GroupedShrinkParams&, cudaStream_t); \
  extern template cudaError_t launch_grouped_expand<T>(const GroupedExpandParams&, cudaStream_t); \
  extern template cudaError_t launch_grouped_weight_grad<T>(const GroupedWeightGradParams&,      \
                                                            cudaStream_t);
MOLA_GROUPED_EXTERN(double)
MOLA_GROUPED_EXTERN(float)
MOLA_GROUPED_EXTERN(__half)
MOLA_GROUPED_EXTERN(__nv_bfloat16)
#undef MOLA_GROUPED_EXTERN

}  // namespace kernels
}  // namespace mola
