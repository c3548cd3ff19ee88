// kernels/dequant.h: a quantized weight (mola/quant.h) back into a dense
// storage dtype on the GPU, the element arithmetic of kernels/quant_codes.h
// (the CPU's, bit for bit: fp32 products rounded once into T). Plain C++ (no
// torch header); the host glue is src/ops/cuda/quant.cpp.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "quant_codes.h"

namespace mola {
namespace kernels {

// Elements [first, first + count) of the row-major [out, in] weight into
// out[0, count). One thread an element, grid-stride.
struct DequantParams {
  bool nf4 = false;                   // false: int8 per output row
  const void* data = nullptr;         // int8 [out * in], or NF4's packed uint8 [ceil(out * in / 2)]
  const float* row_scale = nullptr;   // int8: [out]
  NF4Scales scales;                   // NF4: the block absmaxes as stored
  int64_t in_features = 0;
  int64_t first = 0;
  int64_t count = 0;
  void* out = nullptr;                // [count] T, contiguous
};

// T: double, float, __half, __nv_bfloat16. int8 in double multiplies in
// double (as the CPU's fp64 path); every other case rounds the fp32 value once.
template <typename T>
cudaError_t launch_dequantize(const DequantParams& params, cudaStream_t stream);

#define MOLA_DEQUANT_EXTERN(T) extern template cudaError_t launch_dequantize<T>(const DequantParams&, cudaStream_t);
MOLA_DEQUANT_EXTERN(double)
MOLA_DEQUANT_EXTERN(float)
MOLA_DEQUANT_EXTERN(__half)
MOLA_DEQUANT_EXTERN(__nv_bfloat16)
#undef MOLA_DEQUANT_EXTERN

}  // namespace kernels
}  // namespace mola
