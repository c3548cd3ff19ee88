// src/ops/cpu/low_precision.h: bf16 / fp16 on CPUs without native 16-bit
// matrix units (private). Without AVX-512 BF16 or AMX (AVX-512 FP16 or AMX
// FP16 for fp16), ATen's 16-bit matmul with a non-transposed right operand
// falls to a scalar path: dy W for an 11008 x 4096 bf16 weight and 32 rows
// takes seconds where fp32 takes tens of milliseconds. Every backward of a
// linear layer is such a product. On those CPUs mola computes in fp32 from
// 16-bit storage: activations and adapter tensors (small) are converted
// whole, and a base weight is read in blocks of rows converted into a small
// reused fp32 buffer, so no fp32 copy of a weight is ever made.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>

namespace mola::detail {

// True for a bf16 / fp16 CPU tensor on a CPU without native support for its
// dtype's matmul: compute in fp32 instead.
bool compute_in_fp32_on_cpu(const at::Tensor& t);

// Fills `block` ([n, in], x's dtype) with rows [start, start + n) of a weight
// kept in another form (16-bit, quantized), converted.
using RowBlockFill = std::function<void(int64_t start, int64_t n, at::Tensor& block)>;

// x W^T + b for x [T, in] (fp32 or fp64) and a W [out, in] that `fill` gives a
// block of rows at a time, into a small buffer reused across calls on the
// thread (no full copy of W is made). b: [out], any float dtype, or none.
at::Tensor linear_by_blocks(const at::Tensor& x, int64_t out, const RowBlockFill& fill,
                            const std::optional<at::Tensor>& bias);
// out += dy W for dy [T, out] (fp32 or fp64), W as linear_by_blocks reads it, into out [T, in].
void addmm_by_blocks_(at::Tensor& out, const at::Tensor& dy, const RowBlockFill& fill);

// x W^T + b for x fp32 [T, in] and a 16-bit W [out, in] (b [out], any float
// dtype, or none): fp32 [T, out], W converted block by block.
at::Tensor linear_from_16bit(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// out += dy W for dy fp32 [T, out] and a 16-bit W [out, in], into out fp32
// [T, in]; W converted block by block.
void addmm_from_16bit_(at::Tensor& out, const at::Tensor& dy, const at::Tensor& weight);

}  // namespace mola::detail
