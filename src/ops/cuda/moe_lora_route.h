// src/ops/cuda/moe_lora_route.h: C++ entry points of the CUDA routing op for
// other CUDA host code in mola (the forward of mola::moe_lora calls these
// directly, writing into its own buffers, instead of going through the
// dispatcher and allocating fresh outputs).
//
// The op itself, mola::moe_lora_route, is registered for the CUDA key in
// moe_lora_route.cpp; its schema lives in src/ops/moe_lora.cpp.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mola {
namespace ops {

// Routes `logits` [T, E] (float32, float16 or bfloat16 on a CUDA device,
// E <= 256, any strides) with 1 <= top_k <= E into caller-allocated outputs on
// the same device: weights [T, top_k] float32, indices [T, top_k] int64,
// gate [T, E] float32, each with unit stride along its last dimension (row
// strides are free, so slices of larger buffers work). Runs on the current
// CUDA stream without synchronising. Semantics: kernels/moe_lora_route.cu.
void moe_lora_route_cuda_out(const at::Tensor& logits, int64_t top_k, at::Tensor& weights,
                             at::Tensor& indices, at::Tensor& gate);

// Same, and also ADDS the load-balancing statistics (docs/design.md, The balance loss) into
// `counts` and `prob_sum`, contiguous float32 [E] tensors the caller zeroes:
// counts[e] += picks of expert e over all (token, slot); prob_sum[e] += sum of
// P[:, e] over tokens. Either pointer may be null to skip that statistic.
void moe_lora_route_cuda_out(const at::Tensor& logits, int64_t top_k, at::Tensor& weights,
                             at::Tensor& indices, at::Tensor& gate, at::Tensor* counts,
                             at::Tensor* prob_sum);

// The op's CUDA kernel: allocates and returns (weights, indices, gate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_cuda(const at::Tensor& router_logits,
                                                                   int64_t top_k);

}  // namespace ops
}  // namespace mola
