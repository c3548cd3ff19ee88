// kernels/moe_lora_route.h: parameters and launcher of the MoLA routing kernel
// (docs/design.md, The MoLA layer, kernel 1 of section 4).
//
// Per token: P = softmax(z) in fp32, top-k of P, weights renormalised to sum 1,
// the dense gate row g (w at the chosen experts, 0 elsewhere), and optionally
// the per-expert statistics the load-balancing loss needs (section 2.2).
//
// Why a plain struct: the kernels target (mola_kernels) never sees a torch
// header (docs/contributing.md, A new op; after flash-attention's Flash_fwd_params); the host glue in
// src/ops/cuda/moe_lora_route.cpp fills this struct from tensors. This header
// is plain C++ and compiles under g++ given the CUDA include directory.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace mola {
namespace kernels {

// Largest expert count the kernel handles: one warp per token holds up to
// kMoeLoraRouteMaxExperts / 32 = 8 probabilities per lane in registers.
constexpr int kMoeLoraRouteMaxExperts = 256;

// All strides are in elements; the innermost (expert / slot) stride is 1.
struct MoeLoraRouteParams {
  // Input: router logits z [num_tokens, num_experts], element type T of the
  // launcher (float, __half or __nv_bfloat16).
  const void* logits = nullptr;
  int64_t logits_row_stride = 0;

  // Output: renormalised top-k weights w [num_tokens, top_k], fp32, in
  // descending order of probability (torch.topk's sorted order). When
  // top_k == num_experts: the probabilities P themselves, in expert order.
  float* weights = nullptr;
  int64_t weights_row_stride = 0;

  // Output: chosen experts [num_tokens, top_k], int64 (torch.topk's index
  // dtype); 0 .. num_experts-1 in order when top_k == num_experts.
  int64_t* indices = nullptr;
  int64_t indices_row_stride = 0;

  // Output: gate matrix g [num_tokens, num_experts], fp32: w at the chosen
  // experts, 0 elsewhere (the dense-masked strategy's per-expert scale).
  float* gate = nullptr;
  int64_t gate_row_stride = 0;

  // Optional outputs (nullptr to skip), each [num_experts] fp32, ADDED to
  // (atomics; the caller zeroes them first):
  //   counts[e]   += number of (token, slot) picks of expert e   (exact below 2^24)
  //   prob_sum[e] += sum over tokens of P[t, e]   (float atomics: the
  //                  summation order, hence the last bits, vary run to run)
  float* counts = nullptr;
  float* prob_sum = nullptr;

  int64_t num_tokens = 0;  // T >= 0
  int num_experts = 0;     // 1 <= E <= kMoeLoraRouteMaxExperts
  int top_k = 0;           // 1 <= k <= E
};

// Enqueues the routing kernel on `stream`. T is float, __half or
// __nv_bfloat16. Never synchronises; the launch shape depends only on
// num_tokens and num_experts, so the call can be captured in a CUDA graph.
// Returns cudaErrorInvalidValue for parameters outside the ranges above
// (without launching), otherwise cudaGetLastError() after the launch; the
// host glue turns a non-success value into an exception (C10_CUDA_CHECK).
// num_tokens == 0 launches nothing and returns cudaSuccess.
template <typename T>
cudaError_t launch_moe_lora_route_fwd(const MoeLoraRouteParams& params, cudaStream_t stream);

extern template cudaError_t launch_moe_lora_route_fwd<float>(const MoeLoraRouteParams&,
                                                             cudaStream_t);
extern template cudaError_t launch_moe_lora_route_fwd<__half>(const MoeLoraRouteParams&,
                                                              cudaStream_t);
extern template cudaError_t launch_moe_lora_route_fwd<__nv_bfloat16>(const MoeLoraRouteParams&,
                                                                     cudaStream_t);

}  // namespace kernels
}  // namespace mola
