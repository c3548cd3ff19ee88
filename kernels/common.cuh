// kernels/common.cuh: helpers shared by the mola CUDA kernels (nvcc only).
//
// What lives here: dtype conversions to and from fp32 (all mola kernels load
// the model dtype and do their arithmetic in fp32, design.md section 4,
// "Precision"), warp-level reductions, and small launch arithmetic. The Philox
// generator and the dropout-mask contract live in philox.h, which is plain C++
// so the CPU op compiles the very same code with g++; it is included here so
// every kernel sees it. No torch header may appear here (style.md: the
// mola_kernels target never includes torch).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "philox.h"

namespace mola {
namespace kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Blocks needed to cover n items with `per_block` items per block.
constexpr int64_t ceil_div(int64_t n, int64_t per_block) {
  return (n + per_block - 1) / per_block;
}

// Loads of the three storage dtypes, widened to fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Stores back to the storage dtype, round-to-nearest-even (as ATen's casts).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly (xor) reductions: every lane ends with the result, so no broadcast
// is needed afterwards.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  }
  return v;
}

}  // namespace kernels
}  // namespace mola
