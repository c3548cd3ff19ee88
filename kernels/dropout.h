// kernels/dropout.h: the dropout mask as the kernels see it, and the dropout
// pass the host glue runs where no other kernel applies the mask on the fly.
//
//   DropoutMask  which mask a kernel applies to a matrix it reads or writes
//                (used by the fused shrink, the grouped kernels and the pass
//                below): the Philox seed, p, and whether each routed expert
//                draws its own mask
//   dropout      x~ = x (.) m into a buffer, and/or grad_x += m (.) dx~, one
//                mask generation for both (the backward's two uses)
//
// The mask contract is kernels/philox.h's: element (t, c) of a logical
// [rows, cols] matrix uses mask index t * cols + c. Plain C++ (no torch header).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace mola {
namespace kernels {

// Dropout on a matrix that a kernel reads or writes: mask index row * cols + col
// of the logical [rows, cols] matrix (philox.h), seed from seed_ptr when non-null.
// per_expert: the mask of a slot routed to expert e is philox stream
// expert_stream(e) (each routed expert of a token draws its own mask), else
// stream 0, the one mask every expert shares.
struct DropoutMask {
  bool enabled = false;
  float p = 0.0f;
  uint64_t seed = 0;
  const int64_t* seed_ptr = nullptr;  // device pointer to the seed, or nullptr
  bool per_expert = false;
};

// Over n contiguous elements with one mask m (philox.h, index = element index):
//   x_out  = round_T(x * m)                       when x_out != nullptr
//   grad_x = round_T(grad_x + grad_in * m)        when grad_x != nullptr (grad_in required)
// x_out may alias x (in place); grad_in may alias grad_x (then grad_x = grad_x * m,
// the "accumulate" term dropped: set accumulate = false).
struct DropoutParams {
  const void* x = nullptr;
  void* x_out = nullptr;
  const void* grad_in = nullptr;
  void* grad_x = nullptr;
  bool accumulate = true;
  int64_t numel = 0;
  DropoutMask dropout;
};

template <typename T>
cudaError_t launch_dropout(const DropoutParams& params, cudaStream_t stream);

#define MOLA_DROPOUT_EXTERN(T) \
  extern template cudaError_t launch_dropout<T>(const DropoutParams&, cudaStream_t);
MOLA_DROPOUT_EXTERN(double)
MOLA_DROPOUT_EXTERN(float)
MOLA_DROPOUT_EXTERN(__half)
MOLA_DROPOUT_EXTERN(__nv_bfloat16)
#undef MOLA_DROPOUT_EXTERN

}  // namespace kernels
}  // namespace mola
