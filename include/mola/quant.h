// A quantized frozen base weight: int8 with one scale per output channel, or
// NF4 (4-bit NormalFloat, QLoRA's data type) in blocks of 64 with the block
// scales double-quantized (docs/quantization.md). The C++ models hold their
// seven projection weights this way under from_pretrained(..., quantize);
// the MoLA op adds the experts through its base-free form (mola/ops.h).
//
// On the CPU the forward never makes a full copy of the weight in a wider
// type: it dequantizes a block of rows at a time into a small reused buffer
// and multiplies it there. On a GPU one kernel (kernels/dequant.cu)
// dequantizes the weight into x's dtype for the one product that needs it,
// and cuBLAS multiplies; the copy is freed right after, so one layer's weight
// at a time exists in full (QLoRA's own scheme).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace mola::quant {

enum class Kind : int64_t { kNone = 0, kInt8 = 1, kNF4 = 2 };

// "none" (or "") | "int8" | "nf4" -> Kind; anything else is a ConfigError naming the value.
Kind parse_kind(const std::string& name);
const char* kind_name(Kind kind);

// NF4's sixteen values, ascending, from -1 to 1 with an exact 0: quantiles of
// the standard normal (QLoRA, section 3 and appendix E), normalised to [-1, 1].
const std::array<float, 16>& nf4_values();
constexpr int64_t kNF4BlockSize = 64;        // weights per absmax
constexpr int64_t kNF4ScaleBlockSize = 256;  // absmaxes per second-level scale

// The stored form. int8: data int8 [out, in], scale fp32 [out] (row absmax /
// 127). NF4: over the row-major [out, in] elements, block b = elements
// [64 b, 64 b + 64); data uint8 [ceil(out*in / 2)] holds two 4-bit indices
// into nf4_values() per byte, the earlier element in the high nibble; the
// block absmaxes are stored as int8 codes (scale) of absmax - offset, with
// one fp32 scale per 256 blocks (scale_scale) and one fp32 offset (their
// mean): about 4.13 bits per weight in all. Without double quantization
// (quantize's double_quant = false, bitsandbytes' default) scale holds the
// fp32 absmaxes themselves: 4.5 bits per weight.
struct QuantizedWeight {
  Kind kind = Kind::kNone;
  int64_t out_features = 0, in_features = 0;
  at::Tensor data, scale, scale_scale, scale_offset;

  // Bytes held by the four tensors.
  int64_t nbytes() const;
  // The tensors by name ("data", "scale", ...), for copies and state dicts.
  std::map<std::string, at::Tensor> tensors() const;
  // The same weight with its tensors on `device` (shared when already there).
  QuantizedWeight to(const at::Device& device) const;
};

// Quantizes `weight` ([out, in], any floating dtype) to `kind` (int8 or
// nf4). Round to nearest: int8 round(w / scale); NF4 the nearest of the
// sixteen values to w / absmax (ties to the lower one), absmax as stored.
// The work runs on the CPU; a weight on a GPU is copied there and the result
// placed back on its device.
QuantizedWeight quantize(const at::Tensor& weight, Kind kind, bool double_quant = true);

// The block absmaxes NF4 stores, dequantized ([blocks] fp32); for tests.
at::Tensor nf4_absmax(const QuantizedWeight& q);

// The whole weight back, [out, in] in `dtype` on the weight's device (tests,
// merging, analysis; on a GPU, the kernel the forward uses).
at::Tensor dequantize(const QuantizedWeight& q, at::ScalarType dtype = at::kFloat);

// x W^T + b for x [..., in] of any floating dtype on the weight's device,
// returned in x's dtype. CPU: W dequantized a block of rows at a time,
// computed in fp32 (fp64 for fp64). CUDA: W dequantized whole in x's dtype and
// multiplied by cuBLAS. Differentiable in x only: the base is frozen.
at::Tensor linear(const at::Tensor& x, std::shared_ptr<const QuantizedWeight> q,
                  const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace mola::quant
