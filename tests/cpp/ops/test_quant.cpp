// Tests for mola/quant.h: int8 and NF4 round trips within their bounds, the
// block-wise linear against the dequantized weight, the MoLA op's base-free
// form over a quantized linear against the op on the dequantized weight, and
// CausalLM::from_pretrained(..., quantize) against the dense model holding the
// dequantized weights. The NF4 values against QLoRA's definition, and the
// formats against bitsandbytes', are tested from Python
// (tests/python/ops/test_quant.py, tests/python/nn/test_quantized_inject.py).
#include "tiny_model.h"

#include <mola/io/safetensors.h>
#include <mola/ops.h>
#include <mola/quant.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

namespace {

namespace quant = mola::quant;

TEST(Quant, NF4ValuesAscendFromMinusOneToOneThroughZero) {
  const auto& v = quant::nf4_values();
  EXPECT_EQ(v.front(), -1.0f);
  EXPECT_EQ(v.back(), 1.0f);
  EXPECT_EQ(v[7], 0.0f);
  for (size_t i = 1; i < v.size(); ++i) EXPECT_LT(v[i - 1], v[i]);
}

TEST(Quant, Int8IsWithinHalfAStepPerRow) {
  torch::manual_seed(0);
  const at::Tensor w = torch::randn({33, 70}) * 0.1;
  const quant::QuantizedWeight q = quant::quantize(w, quant::Kind::kInt8);
  ASSERT_EQ(q.data.scalar_type(), at::kChar);
  const at::Tensor err = (w - quant::dequantize(q)).abs();
  EXPECT_TRUE((err <= q.scale.unsqueeze(1) * (0.5 + 1e-5)).all().item<bool>());
  EXPECT_EQ(q.nbytes(), 33 * 70 + 33 * 4);
}

TEST(Quant, NF4IsWithinHalfTheWidestGapTimesTheBlockAbsmax) {
  torch::manual_seed(1);
  const at::Tensor w = torch::randn({50, 96}) * 0.02;
  for (const bool double_quant : {true, false}) {
    const quant::QuantizedWeight q = quant::quantize(w, quant::Kind::kNF4, double_quant);
    const at::Tensor absq = quant::nf4_absmax(q);                       // [blocks], as stored
    const at::Tensor absmax = w.reshape({-1, 64}).abs().amax(1);       // 4800 = 75 blocks of 64
    const auto& v = quant::nf4_values();
    float gap = 0;
    for (size_t i = 1; i < v.size(); ++i) gap = std::max(gap, v[i] - v[i - 1]);
    const at::Tensor bound = (absq * (gap / 2) + (absmax - absq).clamp_min(0)).repeat_interleave(64).view({50, 96});
    EXPECT_TRUE(((w - quant::dequantize(q)).abs() <= bound + 1e-7).all().item<bool>()) << double_quant;
  }
}

TEST(Quant, LinearEqualsTheDequantizedWeightForwardAndBackward) {
  torch::manual_seed(2);
  for (const auto kind : {quant::Kind::kInt8, quant::Kind::kNF4}) {
    auto q = std::make_shared<const quant::QuantizedWeight>(quant::quantize(torch::randn({300, 8192}) * 0.01, kind));
    const at::Tensor deq = quant::dequantize(*q, at::kDouble);
    const at::Tensor x = torch::randn({2, 3, 8192}, at::kDouble).requires_grad_();
    const at::Tensor b = torch::randn({300}, at::kDouble);
    const at::Tensor y = quant::linear(x, q, b);  // 300 rows of 8192: three blocks of 128 rows
    EXPECT_TRUE(torch::allclose(y, at::linear(x, deq, b), 1e-10, 1e-10));
    const at::Tensor dy = torch::randn_like(y);
    const at::Tensor dx = torch::autograd::grad({y}, {x}, {dy})[0];
    EXPECT_TRUE(torch::allclose(dx, at::matmul(dy, deq), 1e-10, 1e-10));
  }
}

TEST(Quant, BaseFreeOpOverAQuantizedLinearEqualsTheDenseOp) {
  torch::manual_seed(3);
  const int64_t T = 10, in = 64, out = 40, E = 4, r = 3, k = 2;
  auto q = std::make_shared<const quant::QuantizedWeight>(quant::quantize(torch::randn({out, in}) * 0.1,
                                                                          quant::Kind::kNF4));
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor deq = quant::dequantize(*q, at::kDouble), bias = torch::randn({out}, f64);
  const at::Tensor x = torch::randn({T, in}, f64).requires_grad_();
  const at::Tensor router = torch::randn({E, in}, f64).requires_grad_();
  const at::Tensor a = (torch::randn({E, r, in}, f64) * 0.2).requires_grad_();
  const at::Tensor b = (torch::randn({E, out, r}, f64) * 0.2).requires_grad_();
  for (const auto compute : {mola::ops::Compute::kDense, mola::ops::Compute::kGrouped}) {
    const auto [y_ref, l_ref] = mola::ops::moe_lora(x, deq, bias, router, a, b, k, 2.0, 0.0, false, compute);
    const auto [experts, logits] =
        mola::ops::moe_lora(x, at::empty({0}, f64), std::nullopt, router, a, b, k, 2.0, 0.0, false, compute);
    const at::Tensor y = quant::linear(x, q, bias) + experts;
    EXPECT_TRUE(torch::allclose(y, y_ref, 1e-10, 1e-10));
    const at::Tensor dy = torch::randn_like(y);
    const auto g_ref = torch::autograd::grad({(y_ref * dy).sum() + l_ref.square().sum()}, {x, router, a, b});
    const auto g = torch::autograd::grad({(y * dy).sum() + logits.square().sum()}, {x, router, a, b});
    for (size_t i = 0; i < g.size(); ++i) EXPECT_TRUE(torch::allclose(g[i], g_ref[i], 1e-10, 1e-10)) << i;
  }
}

// The tiny llama written as a checkpoint directory.
std::string write_checkpoint(const mola::models::CausalLM& model) {
  char pattern[] = "/tmp/mola-quant-XXXXXX";
  const std::string dir = ::mkdtemp(pattern);
  std::ofstream(dir + "/config.json") << mola::testing::tiny_llama_json().dump();
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : model->named_parameters()) tensors[p.key()] = p.value().detach();
  mola::io::save_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

TEST(QuantizedModel, LogitsEqualTheDenseModelOnTheDequantizedWeights) {
  mola::models::CausalLM dense = mola::testing::tiny_model(4);
  const std::string dir = write_checkpoint(dense);
  const at::Tensor ids = torch::randint(0, 61, {2, 9});
  for (const auto kind : {quant::Kind::kInt8, quant::Kind::kNF4}) {
    auto model = mola::models::CausalLMImpl::from_pretrained(dir, at::kFloat, at::kCPU, kind);
    EXPECT_EQ(model->quantization(), kind);
    auto reference = mola::models::CausalLMImpl::from_pretrained(dir);
    {
      torch::NoGradGuard no_grad;
      for (size_t l = 0; l < 4; ++l) {
        auto* layer = model->model->layers->ptr(l)->as<mola::models::DecoderLayerImpl>();
        auto* ref = reference->model->layers->ptr(l)->as<mola::models::DecoderLayerImpl>();
        for (const auto& name : mola::models::projection_names()) {
          ASSERT_TRUE(layer->projection(name)->quantized) << name;
          EXPECT_EQ(layer->projection(name)->weight.numel(), 0);
          ref->projection(name)->weight.copy_(quant::dequantize(*layer->projection(name)->quantized));
        }
      }
    }
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::allclose(model->forward(ids).logits, reference->forward(ids).logits, 1e-5, 1e-5));
    EXPECT_FALSE(torch::allclose(model->forward(ids).logits, dense->forward(ids).logits, 1e-5, 1e-5));
    // A copy holds its own quantized weights and computes the same.
    auto twin = model->copy();
    EXPECT_EQ(twin->quantization(), kind);
    EXPECT_TRUE(torch::equal(twin->forward(ids).logits, model->forward(ids).logits));
  }
  std::system(("rm -rf " + dir).c_str());
}

// On a GPU (skipped without one, or in a build without the CUDA kernels): the
// dequantize kernel gives the CPU's values bit for bit, and quant::linear there
// the dense product's.
TEST(QuantCuda, DequantizeAndLinearEqualTheCpu) {
#ifndef MOLA_WITH_CUDA
  GTEST_SKIP() << "built without the CUDA kernels";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA GPU";
  torch::manual_seed(0);
  const at::Tensor w = torch::randn({33, 70}) * 0.05;
  for (const auto kind : {quant::Kind::kInt8, quant::Kind::kNF4}) {
    for (const bool double_quant : {true, false}) {
      const quant::QuantizedWeight q = quant::quantize(w, kind, double_quant);
      const quant::QuantizedWeight qc = q.to(at::Device(at::kCUDA, 0));
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        const at::Tensor got = quant::dequantize(qc, dtype);
        ASSERT_TRUE(got.is_cuda());
        EXPECT_TRUE(torch::equal(got.cpu(), quant::dequantize(q, at::kFloat).to(dtype))) << quant::kind_name(kind);
      }
      const at::Tensor x = torch::randn({4, 70}, torch::kDouble);
      const at::Tensor y = quant::linear(x.cuda(), std::make_shared<const quant::QuantizedWeight>(qc));
      EXPECT_TRUE(torch::allclose(y.cpu(), torch::matmul(x, quant::dequantize(q, at::kDouble).t()), 1e-12, 1e-12));
    }
  }
#endif
}

}  // namespace
