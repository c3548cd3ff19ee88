// kernels/common.cuh: helpers shared by the mola CUDA kernels (nvcc only).
//
// What lives here: dtype conversions to and from fp32 (all mola kernels load
// the model dtype and do their arithmetic in fp32, docs/design.md, Strategies and kernels,
// "Precision"), warp-level reductions, and small launch arithmetic. The Philox
// generator and the dropout-mask contract live in philox.h, which is plain C++
// so the CPU op compiles the very same code with g++; it is included here so
// every kernel sees it. No torch header may appear here (docs/contributing.md, A new op: the
// mola_kernels target never includes torch).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "philox.h"

namespace mola {
namespace kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Elementwise kernels (gate scale, dropout): 256 threads a block, grid-stride
// loops over at most kElementwiseMaxBlocks blocks, so the grid depends only on
// the size (fixed, shape-only grids can be captured in a CUDA graph).
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 4096;

// Blocks needed to cover n items with `per_block` items per block.
constexpr int64_t ceil_div(int64_t n, int64_t per_block) {
  return (n + per_block - 1) / per_block;
}

inline unsigned elementwise_grid(int64_t items) {
  const int64_t blocks = ceil_div(items, kElementwiseThreads);
  return static_cast<unsigned>(blocks < kElementwiseMaxBlocks ? (blocks > 0 ? blocks : 1)
                                                              : kElementwiseMaxBlocks);
}

// The arithmetic type of a storage dtype: fp32 for float, half and bfloat16
// (docs/design.md, Strategies and kernels, "Precision"), fp64 for double (so float64 gradchecks run the
// kernels themselves at full precision).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Loads of the storage dtypes, widened to their arithmetic type.
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Loads of the three 16/32-bit storage dtypes, widened to fp32.
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
__device__ __forceinline__ double from_float<double>(float v) {
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

// Arithmetic type -> storage dtype, rounding once (to nearest even).
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return from_float<T>(v);
  }
}

// Rounds v to T and back: the value an ATen op in dtype T would have stored.
template <typename T>
__device__ __forceinline__ acc_t<T> round_to(acc_t<T> v) {
  return to_acc(from_acc<T>(v));
}

// A product rounded on its own: never contracted with a following add into an
// FMA (nvcc contracts by default), where ATen rounds the product as a tensor
// before the sum.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Butterfly (xor) reductions: every lane ends with the result, so no broadcast
// is needed afterwards.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmax(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  }
  return v;
}

// The dropout multiplier of element i (kernels/philox.h's contract): 0 or
// 1/(1-p) as float, widened to the arithmetic type.
template <typename Acc>
__device__ __forceinline__ Acc dropout_multiplier(uint64_t seed, uint64_t i, float p, uint32_t stream = 0) {
  return static_cast<Acc>(philox::dropout_keep(seed, i, p, stream) ? philox::dropout_scale(p) : 0.0f);
}

// The expert id of a routed slot, or -1 when outside [0, E): the grouped
// kernels leave such a slot out rather than index out of bounds.
__device__ __forceinline__ int checked_expert(int64_t e, int E) {
  return (e >= 0 && e < E) ? static_cast<int>(e) : -1;
}

// The seed a kernel uses: read from device memory when the caller passed a
// CUDA tensor (a CUDA graph then replays with whatever value it holds), the
// host value otherwise.
__device__ __forceinline__ uint64_t load_seed(const int64_t* seed_ptr, uint64_t seed) {
  return seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed;
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
