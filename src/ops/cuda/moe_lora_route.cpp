// src/ops/cuda/moe_lora_route.cpp: host glue of mola::moe_lora_route on CUDA.
//
// Checks, device guard, layout, allocation and the dtype switch live here so
// that kernels/moe_lora_route.cu never sees a torch header (docs/contributing.md, A new op: the
// mola_kernels target compiles in seconds; flash-attention's flash_api.cpp is
// the model). The math and its numerics are documented in the kernel file; the
// CPU twin (src/ops/cpu/moe_lora_route.cpp) is the oracle the CUDA path is
// tested against (tests/python/ops/test_route_cuda.py).
#include "ops/cuda/moe_lora_route.h"
#include "ops/moe_lora_impl.h"

// Spelled relative: this directory has a moe_lora_route.h of its own, so a bare
// "moe_lora_route.h" would resolve here, not to the kernel's params header.
#include <moe_lora_route.h>  // kernels/, on the include path

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

namespace mola {
namespace ops {
namespace {

using kernels::kMoeLoraRouteMaxExperts;

void check_logits(const at::Tensor& logits, int64_t top_k) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "moe_lora_route (CUDA): router_logits is on ",
                    logits.device(),
                    "; this kernel needs a CUDA tensor (move it with .cuda() or call the CPU op)");
  TORCH_CHECK_VALUE(logits.dim() == 2,
                    "moe_lora_route: router_logits must be [tokens, experts]; got ", logits.sizes(),
                    " (flatten the leading dimensions first)");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "moe_lora_route (CUDA): router_logits has dtype ", dtype,
                   "; it must be float32, float16 or bfloat16 (convert with .float())");
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= kMoeLoraRouteMaxExperts, "moe_lora_route (CUDA): ", E,
                    " experts (router_logits.size(1)); the kernel supports 1 to ",
                    kMoeLoraRouteMaxExperts, " (use fewer experts or the CPU op)");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "moe_lora_route: top_k (", top_k,
                    ") must be between 1 and the number of experts (", E, ")");
}

// An output must be `dtype` on logits' device, of `shape`, with unit stride in
// its last dimension (the kernel takes a row stride only).
void check_output(const char* name, const at::Tensor& out, at::ScalarType dtype,
                  at::IntArrayRef shape, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(out.device() == logits.device(), "moe_lora_route_cuda_out: ", name, " is on ",
                    out.device(), " but router_logits on ", logits.device(),
                    "; allocate it on the same device");
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "moe_lora_route_cuda_out: ", name, " has dtype ",
                   out.scalar_type(), "; it must be ", dtype);
  TORCH_CHECK_VALUE(out.sizes() == shape, "moe_lora_route_cuda_out: ", name, " has shape ",
                    out.sizes(), "; it must be ", shape);
  TORCH_CHECK_VALUE(out.size(-1) <= 1 || out.stride(-1) == 1,
                    "moe_lora_route_cuda_out: ", name, " has stride ", out.stride(-1),
                    " in its last dimension; it must be 1 (pass a contiguous tensor)");
}

template <typename T>
cudaError_t launch(const kernels::MoeLoraRouteParams& params) {
  return kernels::launch_moe_lora_route_fwd<T>(params, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

void moe_lora_route_cuda_out(const at::Tensor& logits, int64_t top_k, at::Tensor& weights,
                             at::Tensor& indices, at::Tensor& gate, at::Tensor* counts,
                             at::Tensor* prob_sum) {
  check_logits(logits, top_k);
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  check_output("weights", weights, at::kFloat, {T, top_k}, logits);
  check_output("indices", indices, at::kLong, {T, top_k}, logits);
  check_output("gate", gate, at::kFloat, {T, E}, logits);
  for (const auto& [name, stat] : {std::pair<const char*, at::Tensor*>{"counts", counts},
                                   std::pair<const char*, at::Tensor*>{"prob_sum", prob_sum}}) {
    if (stat == nullptr) continue;
    check_output(name, *stat, at::kFloat, {E}, logits);
  }

  const c10::cuda::CUDAGuard device_guard(logits.device());
  // Only the expert dimension must be dense: a row-strided slice (say the
  // router columns of a fused [y | logits | h] GEMM output, docs/design.md, Strategies and kernels) is
  // read in place rather than copied.
  const at::Tensor z = logits.stride(1) == 1 || E == 1 ? logits : logits.contiguous();
  if (T == 0) return;

  kernels::MoeLoraRouteParams params;
  params.logits = z.const_data_ptr();
  params.logits_row_stride = z.stride(0);
  params.weights = weights.mutable_data_ptr<float>();
  params.weights_row_stride = weights.stride(0);
  params.indices = indices.mutable_data_ptr<int64_t>();
  params.indices_row_stride = indices.stride(0);
  params.gate = gate.mutable_data_ptr<float>();
  params.gate_row_stride = gate.stride(0);
  params.counts = counts != nullptr ? counts->mutable_data_ptr<float>() : nullptr;
  params.prob_sum = prob_sum != nullptr ? prob_sum->mutable_data_ptr<float>() : nullptr;
  params.num_tokens = T;
  params.num_experts = static_cast<int>(E);
  params.top_k = static_cast<int>(top_k);

  cudaError_t err = cudaSuccess;
  switch (z.scalar_type()) {
    case at::kFloat:
      err = launch<float>(params);
      break;
    case at::kHalf:
      err = launch<__half>(params);
      break;
    case at::kBFloat16:
      err = launch<__nv_bfloat16>(params);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "moe_lora_route: dtype ", z.scalar_type(),
                            " got past check_logits");
  }
  C10_CUDA_CHECK(err);
}

void moe_lora_route_cuda_out(const at::Tensor& logits, int64_t top_k, at::Tensor& weights,
                             at::Tensor& indices, at::Tensor& gate) {
  moe_lora_route_cuda_out(logits, top_k, weights, indices, gate, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route_cuda(const at::Tensor& router_logits,
                                                                   int64_t top_k) {
  if (router_logits.dim() == 2 && (router_logits.scalar_type() == at::kDouble ||
                                   router_logits.size(1) > kernels::kMoeLoraRouteMaxExperts)) {
    // fp64 (gradcheck) and very wide routers: the same math in ATen on the GPU.
    return detail::moe_lora_route_aten(router_logits, top_k);
  }
  check_logits(router_logits, top_k);
  const c10::cuda::CUDAGuard device_guard(router_logits.device());
  const int64_t T = router_logits.size(0);
  const int64_t E = router_logits.size(1);
  const auto f32 = router_logits.options().dtype(at::kFloat);
  const auto i64 = router_logits.options().dtype(at::kLong);
  at::Tensor weights = at::empty({T, top_k}, f32);  // [T, k]
  at::Tensor indices = at::empty({T, top_k}, i64);  // [T, k]
  at::Tensor gate = at::empty({T, E}, f32);         // [T, E]
  if (T == 0) return {weights, indices, gate};
  moe_lora_route_cuda_out(router_logits, top_k, weights, indices, gate);
  return {weights, indices, gate};
}

}  // namespace ops
}  // namespace mola

TORCH_LIBRARY_IMPL(mola, CUDA, m) {
  m.impl("moe_lora_route", &mola::ops::moe_lora_route_cuda);
}
