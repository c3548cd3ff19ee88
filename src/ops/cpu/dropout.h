// The dropout of moe_lora on the CPU, applied in one pass: the Philox mask of
// kernels/philox.h is generated block by block and multiplied into the data, so
// no mask tensor is stored between forward and backward (docs/design.md, Dropout masks and the Philox contract: the
// mask is regenerated from its seed).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mola::detail {

// x~ = x * mask(seed, stream) for a contiguous x seen as a flat array
// (element i of x.view(-1) uses mask element i): kept elements times
// 1/(1-p), computed in fp32 (fp64 for fp64 x) and rounded to x's dtype.
// stream: 0 the shared mask, philox::expert_stream(e) expert e's.
at::Tensor dropout_apply_cpu(const at::Tensor& x, uint64_t seed, double p, uint32_t stream = 0);

// The same, in place (the backward's dx~ -> dx).
void dropout_apply_cpu_(at::Tensor& x, uint64_t seed, double p, uint32_t stream = 0);

// Backward's two uses of one mask in a single pass: returns x~ = x * mask and
// multiplies grad (dx~ -> dx) by the same mask in place. Both contiguous, same shape.
at::Tensor dropout_apply_pair_cpu(const at::Tensor& x, at::Tensor& grad, uint64_t seed, double p,
                                  uint32_t stream = 0);

// Selected rows of a contiguous x [T, cols]: out[r] = x[rows[r]] * mask row
// rows[r] (the mask is over x's [T, cols] elements, so a token keeps its
// mask whichever rows are selected). rows: contiguous int64 on the CPU.
// The grouped path's per-expert x~ for the tokens routed to one expert.
at::Tensor dropout_apply_rows_cpu(const at::Tensor& x, const at::Tensor& rows, uint64_t seed, double p,
                                  uint32_t stream);
// The same, also multiplying grad [rows.numel(), cols] by those mask rows in place (backward).
at::Tensor dropout_apply_rows_pair_cpu(const at::Tensor& x, const at::Tensor& rows, at::Tensor& grad,
                                       uint64_t seed, double p, uint32_t stream);

// The multiplier itself as float [rows, cols]: 0 or 1/(1-p).
at::Tensor dropout_mask_values_cpu(uint64_t seed, int64_t rows, int64_t cols, double p, uint32_t stream = 0);

// The block generators (64 elements at a time), picked at run time: the widest
// this CPU has. Every one gives the bits of the scalar definition in
// kernels/philox.h; the overload below runs a given one, for the tests.
enum class DropoutIsa { kScalar, kAvx2, kAvx512 };
std::vector<DropoutIsa> dropout_isas();  // those this CPU can run, narrowest first
at::Tensor dropout_mask_values_cpu(uint64_t seed, int64_t rows, int64_t cols, double p,
                                   DropoutIsa isa, uint32_t stream = 0);

}  // namespace mola::detail
