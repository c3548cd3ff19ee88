// kernels/quant_codes.h: how one element of a quantized weight is read back
// (mola/quant.h gives the stored form), shared by the CPU's dequantization
// (src/ops/quant.cpp, g++) and the CUDA kernel (kernels/dequant.cu, nvcc), so
// the two give the same bits. Plain C++ like philox.h: MOLA_HD expands to
// `__host__ __device__` only under nvcc.
//
//   int8   w[f] = float(data[f]) * row_scale[f / in]          (fp64: in double)
//   NF4    w[f] = values[index(f)] * absmax(f / 64)
//          index(f): the high nibble of byte f / 2 for even f, the low one for odd f
//          absmax(b) = absmax[b] (fp32 scales), or, double-quantized,
//                      float(code[b]) * scale_scale[b / 256] + offset,
//                      a product and a sum each rounded on its own (never an FMA)
#pragma once

#include <cstdint>

#include "philox.h"  // MOLA_HD

namespace mola {
namespace kernels {

// NF4's sixteen values, ascending, from -1 to 1 with an exact 0: quantiles of
// the standard normal (QLoRA, section 3 and appendix E), normalised to [-1, 1].
// A brace list so the CPU's table and the GPU's __constant__ one are one text.
#define MOLA_NF4_VALUES                                                                               \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,   \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,          \
   0.7229568362236023f, 1.0f}

constexpr int64_t kNF4Block = 64;        // weights per absmax (mola::quant::kNF4BlockSize)
constexpr int64_t kNF4ScaleBlock = 256;  // absmaxes per second-level scale (kNF4ScaleBlockSize)

// NF4's block absmaxes as stored: fp32 values, or int8 codes with a scale per
// 256 codes and one offset (double quantization). Device or host pointers.
struct NF4Scales {
  const float* absmax = nullptr;       // [blocks] fp32, or null when double-quantized
  const int8_t* code = nullptr;        // [blocks]
  const float* scale_scale = nullptr;  // [ceil(blocks / 256)]
  const float* offset = nullptr;       // [1]
};

// a * b + c with the product and the sum rounded on their own.
MOLA_HD float mul_then_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  const volatile float product = a * b;  // no contraction into an FMA by the host compiler either
  return product + c;
#endif
}

MOLA_HD float nf4_absmax(const NF4Scales& s, int64_t block) {
  return s.absmax != nullptr ? s.absmax[block]
                             : mul_then_add(static_cast<float>(s.code[block]), s.scale_scale[block / kNF4ScaleBlock],
                                            s.offset[0]);
}

// The 4-bit index of element f: two per byte, the earlier element in the high nibble.
MOLA_HD uint32_t nf4_index(const uint8_t* data, int64_t f) {
  const uint32_t byte = data[f >> 1];
  return (f & 1) != 0 ? (byte & 0x0Fu) : (byte >> 4);
}

// Element f of an NF4 weight, `values` the sixteen code values.
MOLA_HD float nf4_element(const uint8_t* data, const NF4Scales& s, const float* values, int64_t f) {
  return values[nf4_index(data, f)] * nf4_absmax(s, f / kNF4Block);
}

}  // namespace kernels
}  // namespace mola
