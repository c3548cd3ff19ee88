// kernels/dequant.cu: quantized weights back to a dense dtype (contract in
// dequant.h; the element arithmetic in quant_codes.h, shared with the CPU).
#include "dequant.h"

#include <type_traits>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

__constant__ float kNF4Values[16] = MOLA_NF4_VALUES;

// The element value of dequant.h's contract; p.nf4 is the same for every thread.
template <typename T>
__device__ __forceinline__ T element(const DequantParams& p, int64_t f) {
  if (p.nf4) return from_float<T>(nf4_element(static_cast<const uint8_t*>(p.data), p.scales, kNF4Values, f));
  const int8_t q = static_cast<const int8_t*>(p.data)[f];
  const float scale = p.row_scale[f / p.in_features];
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(q) * static_cast<double>(scale);
  } else {
    return from_float<T>(static_cast<float>(q) * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) dequant_kernel(const DequantParams p) {
  T* out = static_cast<T*>(p.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = element<T>(p, p.first + i);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_dequantize(const DequantParams& p, cudaStream_t stream) {
  if (p.count <= 0) return cudaSuccess;
  if (p.data == nullptr || p.out == nullptr || p.in_features <= 0 || p.first < 0) return cudaErrorInvalidValue;
  if (p.nf4 && p.scales.absmax == nullptr &&
      (p.scales.code == nullptr || p.scales.scale_scale == nullptr || p.scales.offset == nullptr))
    return cudaErrorInvalidValue;
  if (!p.nf4 && p.row_scale == nullptr) return cudaErrorInvalidValue;
  dequant_kernel<T><<<elementwise_grid(p.count), kElementwiseThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define MOLA_DEQUANT_INSTANTIATE(T) template cudaError_t launch_dequantize<T>(const DequantParams&, cudaStream_t);
MOLA_DEQUANT_INSTANTIATE(double)
MOLA_DEQUANT_INSTANTIATE(float)
MOLA_DEQUANT_INSTANTIATE(__half)
MOLA_DEQUANT_INSTANTIATE(__nv_bfloat16)
#undef MOLA_DEQUANT_INSTANTIATE

}  // namespace kernels
}  // namespace mola
