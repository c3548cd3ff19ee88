// kernels/dropout.cu: the dropout pass of moe_lora (contract in dropout.h),
// for the places no other kernel applies the mask while it reads.
#include "dropout.h"

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

// ---- dropout -------------------------------------------------------------------------

// Four consecutive elements per thread: exactly one Philox group (element i
// uses group i / 4), so each generator call feeds four elements.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) dropout_kernel(const DropoutParams p) {
  using Acc = acc_t<T>;
  const uint64_t seed = load_seed(p.dropout.seed_ptr, p.dropout.seed);
  const float scale = philox::dropout_scale(p.dropout.p);
  const T* x = static_cast<const T*>(p.x);
  T* x_out = static_cast<T*>(p.x_out);
  const T* grad_in = static_cast<const T*>(p.grad_in);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t groups = ceil_div(p.numel, 4);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::U32x4 bits = philox::dropout_bits4(seed, static_cast<uint64_t>(g));
#pragma unroll
    for (unsigned j = 0; j < 4; ++j) {
      const int64_t i = 4 * g + j;
      if (i >= p.numel) break;
      const Acc m = static_cast<Acc>(
          philox::u32_to_uniform(philox::u32x4_lane(bits, j)) >= p.dropout.p ? scale : 0.0f);
      if (x_out != nullptr) x_out[i] = from_acc<T>(to_acc(x[i]) * m);
      if (grad_x != nullptr) {
        // ATen: grad_x.add_(dropout(dx~)): the masked term rounded, then the sum
        // (mul_rn: for fp32/fp64 round_to is the identity, and an FMA would
        // round the two once).
        const Acc term = round_to<T>(mul_rn(to_acc(grad_in[i]), m));
        grad_x[i] = from_acc<T>(p.accumulate ? to_acc(grad_x[i]) + term : term);
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_dropout(const DropoutParams& p, cudaStream_t stream) {
  if (p.numel < 0 || !(p.dropout.p >= 0.0f && p.dropout.p < 1.0f)) return cudaErrorInvalidValue;
  if ((p.x_out != nullptr && p.x == nullptr) || (p.grad_x != nullptr && p.grad_in == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.numel == 0 || (p.x_out == nullptr && p.grad_x == nullptr)) return cudaSuccess;
  dropout_kernel<T><<<elementwise_grid(ceil_div(p.numel, 4)), kElementwiseThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define MOLA_DROPOUT_INSTANTIATE(T) \
  template cudaError_t launch_dropout<T>(const DropoutParams&, cudaStream_t);
MOLA_DROPOUT_INSTANTIATE(double)
MOLA_DROPOUT_INSTANTIATE(float)
MOLA_DROPOUT_INSTANTIATE(__half)
MOLA_DROPOUT_INSTANTIATE(__nv_bfloat16)
#undef MOLA_DROPOUT_INSTANTIATE

}  // namespace kernels
}  // namespace mola
