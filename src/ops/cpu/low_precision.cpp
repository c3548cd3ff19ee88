// 16-bit storage, fp32 compute on the CPU (low_precision.h).
#include "ops/cpu/low_precision.h"

#include <mola/ops.h>

#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <string>

namespace mola::detail {
namespace {

bool capability(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Rows of W per block: about 4 MiB of fp32 (8 of fp64), so the converted block stays in cache.
int64_t block_rows(int64_t in) { return std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, in)); }

// The block buffer, reused across calls on this thread (a fresh 4 MiB buffer
// per call would fault its pages in every time).
at::Tensor& block_buffer(int64_t rows, int64_t in, at::ScalarType dtype) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < rows * in || buffer.scalar_type() != dtype)
    buffer = at::empty({rows * in}, at::TensorOptions().dtype(dtype));
  return buffer;
}

}  // namespace

bool compute_in_fp32_on_cpu(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu()) return false;
  static const bool bf16 = capability("avx512_bf16") || capability("amx_bf16");
  static const bool fp16 = capability("avx512_fp16") || capability("amx_fp16");
  if (t.scalar_type() == at::kBFloat16) return !bf16;
  if (t.scalar_type() == at::kHalf) return !fp16;
  return false;
}

at::Tensor linear_by_blocks(const at::Tensor& x, int64_t out, const RowBlockFill& fill,
                            const std::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), in = x.size(1);
  at::Tensor y = at::empty({T, out}, x.options());
  const int64_t rows = block_rows(in);
  at::Tensor& buffer = block_buffer(rows, in, x.scalar_type());
  for (int64_t start = 0; start < out; start += rows) {
    const int64_t n = std::min(rows, out - start);
    at::Tensor block = buffer.narrow(0, 0, n * in).view({n, in});
    fill(start, n, block);                                   // [n, in], x's dtype
    at::Tensor y_block = y.narrow(1, start, n);              // [T, n]
    at::mm_out(y_block, x, block.t());
  }
  if (bias && bias->defined()) y.add_(bias->to(x.scalar_type()));
  return y;
}

void addmm_by_blocks_(at::Tensor& out_x, const at::Tensor& dy, const RowBlockFill& fill) {
  const int64_t out = dy.size(1), in = out_x.size(1);
  const int64_t rows = block_rows(in);
  at::Tensor& buffer = block_buffer(rows, in, dy.scalar_type());
  for (int64_t start = 0; start < out; start += rows) {
    const int64_t n = std::min(rows, out - start);
    at::Tensor block = buffer.narrow(0, 0, n * in).view({n, in});
    fill(start, n, block);
    out_x.addmm_(dy.narrow(1, start, n), block);  // [T, n] [n, in]
  }
}

namespace {
RowBlockFill rows_of(const at::Tensor& weight) {
  return [w = weight.contiguous()](int64_t start, int64_t n, at::Tensor& block) { block.copy_(w.narrow(0, start, n)); };
}
}  // namespace

at::Tensor linear_from_16bit(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear_by_blocks(x, weight.size(0), rows_of(weight), bias);
}

void addmm_from_16bit_(at::Tensor& out_x, const at::Tensor& dy, const at::Tensor& weight) {
  addmm_by_blocks_(out_x, dy, rows_of(weight));
}

}  // namespace mola::detail

namespace mola::ops {
bool cpu_computes_in_fp32(at::ScalarType dtype) {
  return detail::compute_in_fp32_on_cpu(at::empty({0}, at::TensorOptions().dtype(dtype)));
}
}  // namespace mola::ops
