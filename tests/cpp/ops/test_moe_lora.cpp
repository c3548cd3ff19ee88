// The moe_lora op from C++ (through the dispatcher, autograd included) against a
// plain per-expert loop written here, in float64: forward, the gradients of x,
// router, lora_a and lora_b, both strategies; and mola::nn::MoLALinear.
#include <mola/nn/moe_lora_linear.h>
#include <mola/ops.h>

#include <philox.h>

#include "ops/cpu/dropout.h"
#include "ops/moe_lora_impl.h"

#include <gtest/gtest.h>
#include <cmath>
#include <torch/torch.h>

namespace {

using mola::detail::DropoutIsa;
using mola::ops::Compute;

struct Case {
  int64_t experts, top_k, rank;
  bool bias;
};

// The authors' loop (docs/design.md, Fidelity to the papers and the authors' code), token by token and slot by slot.
at::Tensor loop_reference(const at::Tensor& X, const at::Tensor& W, const at::Tensor& b,
                          const at::Tensor& Wr, const at::Tensor& A, const at::Tensor& B,
                          int64_t k, double s) {
  const int64_t T = X.size(0), E = Wr.size(0);
  at::Tensor y = at::mm(X, W.t());
  if (b.defined()) y = y + b;
  at::Tensor P = at::softmax(at::mm(X, Wr.t()), -1);  // float64 here: fp64 routing
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor p = P[t];
    at::Tensor w, idx;
    if (k == E) {
      w = p;
      idx = at::arange(E);
    } else {
      std::tie(w, idx) = p.topk(k);
      w = w / w.sum();
    }
    at::Tensor yt = y[t].clone();
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[j].item<int64_t>();
      yt = yt + s * w[j] * at::mv(B[e], at::mv(A[e], X[t]));
    }
    rows.push_back(yt);
  }
  return at::stack(rows);
}

class MoeLoraVsLoop : public ::testing::TestWithParam<std::tuple<Case, Compute>> {};

TEST_P(MoeLoraVsLoop, ForwardAndGradientsMatchInFloat64) {
  const auto [c, compute] = GetParam();
  torch::manual_seed(7);
  const int64_t T = 9, in = 6, out = 5;
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto leaf = [&](std::vector<int64_t> shape) {
    return torch::randn(shape, opts).requires_grad_(true);
  };
  at::Tensor X = leaf({T, in}), Wr = leaf({c.experts, in}), A = leaf({c.experts, c.rank, in}),
             B = leaf({c.experts, out, c.rank});
  at::Tensor W = torch::randn({out, in}, opts), b = c.bias ? torch::randn({out}, opts) : at::Tensor();
  const double s = 16.0 / static_cast<double>(c.rank);
  std::optional<at::Tensor> bias = c.bias ? std::optional<at::Tensor>(b) : std::nullopt;

  auto [y, logits] = mola::ops::moe_lora(X, W, bias, Wr, A, B, c.top_k, s, 0.0, false, compute);
  at::Tensor y_ref = loop_reference(X, W, b, Wr, A, B, c.top_k, s);
  ASSERT_TRUE(torch::allclose(y, y_ref, 0, 1e-10)) << (y - y_ref).abs().max();
  ASSERT_TRUE(torch::allclose(logits, at::mm(X, Wr.t()), 0, 1e-12));

  // A random functional of y plus one of the logits, so the logits' own gradient
  // path (the balance loss's) is checked too.
  at::Tensor gy = torch::randn_like(y), gl = torch::randn_like(logits);
  auto loss = (y * gy).sum() + (logits * gl).sum();
  auto grads = torch::autograd::grad({loss}, {X, Wr, A, B});
  auto loss_ref = (y_ref * gy).sum() + (at::mm(X, Wr.t()) * gl).sum();
  auto refs = torch::autograd::grad({loss_ref}, {X, Wr, A, B});
  const char* names[] = {"x", "router", "lora_a", "lora_b"};
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], refs[i], 0, 1e-10))
        << "grad of " << names[i] << " differs by " << (grads[i] - refs[i]).abs().max();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MoeLoraVsLoop,
    ::testing::Combine(::testing::Values(Case{1, 1, 1, true}, Case{2, 1, 8, false},
                                         Case{2, 2, 1, true}, Case{5, 2, 8, true},
                                         Case{8, 2, 8, false}, Case{8, 8, 1, true}),
                       ::testing::Values(Compute::kDense, Compute::kGrouped)));

TEST(MoeLora, DenseAndGroupedAgreeWithDropout) {
  torch::manual_seed(3);
  auto X = torch::randn({33, 16}), W = torch::randn({12, 16}), Wr = torch::randn({8, 16}),
       A = torch::randn({8, 4, 16}), B = torch::randn({8, 12, 4});
  auto seed = torch::tensor({int64_t{1234}});
  auto [yd, ld] = mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 2, 2.0, 0.25, true,
                                      Compute::kDense, seed);
  auto [yg, lg] = mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 2, 2.0, 0.25, true,
                                      Compute::kGrouped, seed);
  EXPECT_TRUE(torch::allclose(yd, yg, 1e-5, 1e-5));
  auto [y_eval, l_eval] = mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 2, 2.0, 0.25, false,
                                              Compute::kDense, seed);
  EXPECT_FALSE(torch::allclose(yd, y_eval)) << "dropout in training must change the output";
}

TEST(MoeLora, ErrorsNameTheArgument) {
  auto X = torch::randn({4, 6}), W = torch::randn({5, 6}), Wr = torch::randn({3, 6}),
       A = torch::randn({3, 2, 6}), B = torch::randn({3, 5, 2});
  auto message = [&](auto&& call) {
    try {
      call();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 4, 1.0); })
                .find("top_k (4)"),
            std::string::npos);
  EXPECT_NE(message([&] {
              mola::ops::moe_lora(X, W, std::nullopt, Wr, torch::randn({3, 2, 7}), B, 1, 1.0);
            }).find("lora_a"),
            std::string::npos);
  EXPECT_NE(message([&] { mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 1, 1.0, 0.1, true); })
                .find("dropout_seed"),
            std::string::npos);
}

TEST(MoLALinear, StartsAsTheBaseLayerAndTrainsOnlyTheAdapter) {
  torch::manual_seed(0);
  mola::nn::MoLALinear layer(mola::nn::MoLALinearOptions(16, 8).num_experts(4).top_k(2).rank(4));
  auto x = torch::randn({3, 5, 16});
  auto y = layer->forward(x);
  EXPECT_TRUE(torch::equal(y, layer->base->forward(x)));
  EXPECT_EQ(layer->router_logits.sizes(), (std::vector<int64_t>{15, 4}));
  auto names = layer->named_parameters().keys();
  EXPECT_EQ(names, (std::vector<std::string>{"router", "lora_a", "lora_b", "base.weight",
                                             "base.bias"}));
  y.sum().backward();
  EXPECT_TRUE(layer->lora_b.grad().defined());
  EXPECT_TRUE(layer->lora_b.grad().abs().sum().item<float>() > 0);
  EXPECT_FALSE(layer->base->weight.grad().defined());
  const double bound = 1.0 / std::sqrt(16.0);
  EXPECT_LE(layer->lora_a.abs().max().item<double>(), bound);
  EXPECT_LE(layer->router.abs().max().item<double>(), bound);
}

TEST(LoadBalancingLoss, UniformRoutingGivesOnePerLayer) {
  // Equal logits: P = 1/E everywhere and ties go to the lower index, so f is not
  // uniform but Pbar is; E * sum f_e / E = 1 per layer whatever f is.
  auto logits = torch::zeros({10, 4});
  auto loss = mola::ops::load_balancing_loss({logits, torch::zeros({6, 2})}, {2, 1}, 0.5);
  EXPECT_NEAR(loss.item<double>(), 0.5 * 2.0, 1e-6);
}

// Ties in the routing: the CPU kernel and the ATen composition (the CUDA
// fallback for fp64 and E > 256) pick the same experts, the lower index first,
// and the balance loss counts those same experts. (torch.topk's order among
// ties is unspecified: [1, 0, 0, 0, 0, 0, 0, 0] with k = 2 gave experts 0 and 6.)
TEST(Route, TiesGoToTheLowerExpertOnEveryPath) {
  auto logits = torch::tensor({1, 0, 0, 0, 0, 0, 0, 0,  //
                               0, 0, 0, 0, 0, 0, 0, 0,  //
                               2, 2, 1, 1, 1, 2, 0, 0,  //
                               -1, 3, 3, 3, -1, 0, 3, 0},
                              torch::kFloat32)
                    .view({4, 8});
  logits = torch::cat({logits, torch::randn({60, 8})}, 0);  // and rows without ties
  for (const int64_t k : {1, 2, 3, 8}) {
    auto [w, idx, gate] = mola::ops::moe_lora_route(logits, k);
    auto [w_ref, idx_ref, gate_ref] = mola::detail::moe_lora_route_aten(logits, k);
    ASSERT_TRUE(torch::equal(idx, idx_ref)) << "k = " << k;
    EXPECT_TRUE(torch::allclose(w, w_ref, 1e-6, 1e-7)) << "k = " << k;
    EXPECT_TRUE(torch::allclose(gate, gate_ref, 1e-6, 1e-7)) << "k = " << k;
  }
  auto [w, idx, gate] = mola::ops::moe_lora_route(logits, 2);
  EXPECT_EQ(idx[0][0].item<int64_t>(), 0);
  EXPECT_EQ(idx[0][1].item<int64_t>(), 1);
  EXPECT_EQ(idx[1][0].item<int64_t>(), 0);
  EXPECT_EQ(idx[1][1].item<int64_t>(), 1);
  EXPECT_EQ(idx[3][0].item<int64_t>(), 1);
  EXPECT_EQ(idx[3][1].item<int64_t>(), 2);
  // The balance loss from the routed experts by hand: E * sum_e f_e * Pbar_e.
  const int64_t N = logits.size(0), E = 8;
  auto f = torch::bincount(idx.reshape({-1}), {}, E).to(torch::kFloat64) / static_cast<double>(N * 2);
  auto pbar = torch::softmax(logits.to(torch::kFloat64), -1).mean(0);
  const double want = static_cast<double>(E) * (f * pbar).sum().item<double>();
  auto loss = mola::ops::load_balancing_loss({logits}, {2}, 1.0);
  EXPECT_NEAR(loss.item<double>(), want, 1e-6);
}

}  // namespace

namespace {

// The CPU op generates the mask 64 elements at a time (vectorised, with an AVX2
// clone): it must give exactly the scalar definition of kernels/philox.h, on
// sizes that are not multiples of the block, and dropout must apply exactly it.
TEST(DropoutMask, BlockGeneratorEqualsTheScalarDefinition) {
  const int64_t seed = 0x1234567890abcdefLL;
  const double p = 0.3;
  at::Tensor mask = mola::ops::dropout_mask(torch::tensor({seed}), 7, 97, p);
  ASSERT_EQ(mask.sizes(), (std::vector<int64_t>{7, 97}));
  const float* m = mask.data_ptr<float>();
  const float scale = mola::philox::dropout_scale(static_cast<float>(p));
  for (int64_t i = 0; i < mask.numel(); ++i) {
    const bool keep = mola::philox::dropout_keep(static_cast<uint64_t>(seed), i, 0.3f);
    ASSERT_EQ(m[i], keep ? scale : 0.0f) << "element " << i;
  }
  // Through the op: an identity-like layer exposes x~ in the expert path.
  auto X = torch::randn({7, 97}, torch::kFloat64);
  auto W = torch::zeros({97, 97}, torch::kFloat64);
  auto A = torch::eye(97, torch::kFloat64).unsqueeze(0);   // one expert, rank 97: h = x~
  auto B = torch::eye(97, torch::kFloat64).unsqueeze(0);
  auto Wr = torch::zeros({1, 97}, torch::kFloat64);
  auto [y, logits] = mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 1, 1.0, p, true,
                                         Compute::kDense, torch::tensor({seed}), /*shared_dropout_mask=*/true);
  EXPECT_TRUE(torch::equal(y, X * mask.to(torch::kFloat64)));
  // Per-expert masks (the default): the one expert's own mask, stream 1.
  auto [y_per, logits_per] = mola::ops::moe_lora(X, W, std::nullopt, Wr, A, B, 1, 1.0, p, true,
                                                 Compute::kDense, torch::tensor({seed}));
  const at::Tensor mask0 = mola::ops::dropout_mask(torch::tensor({seed}), 7, 97, p, /*expert=*/0);
  EXPECT_TRUE(torch::equal(y_per, X * mask0.to(torch::kFloat64)));
  EXPECT_FALSE(torch::equal(mask0, mask));
}

// Every block generator this CPU can run (scalar, AVX2, AVX-512) against the
// scalar definition, on a size with a partial last block, for p at the edges of
// the integer keep threshold: 0, one step of 2^-24, values whose p * 2^24 is and
// is not an integer, and p close to 1.
TEST(DropoutMask, EveryBlockGeneratorEqualsTheScalarDefinition) {
  const uint64_t seed = 0xfedcba9876543210ULL;
  const int64_t rows = 37, cols = 211;  // 7807 elements: 121 blocks of 64 and 63 over
  const std::vector<DropoutIsa> isas = mola::detail::dropout_isas();
  ASSERT_EQ(isas.front(), DropoutIsa::kScalar);
  for (const float p : {0.0f, 5.9604644775390625e-08f, 0.05f, 0.1f, 0.25f, 0.5f, 0.999f}) {
    const float scale = mola::philox::dropout_scale(p);
    for (const DropoutIsa isa : isas) {
      at::Tensor mask = mola::detail::dropout_mask_values_cpu(seed, rows, cols, p, isa);
      const float* m = mask.data_ptr<float>();
      int64_t kept = 0;
      for (int64_t i = 0; i < rows * cols; ++i) {
        const bool keep = mola::philox::dropout_keep(seed, static_cast<uint64_t>(i), p);
        ASSERT_EQ(m[i], keep ? scale : 0.0f)
            << "isa " << static_cast<int>(isa) << ", p " << p << ", element " << i;
        kept += keep;
      }
      // The mask is the dropout it claims: the kept share is 1 - p to within 5 sigma.
      const double n = static_cast<double>(rows * cols);
      EXPECT_NEAR(kept / n, 1.0 - p, 5.0 * std::sqrt(p * (1.0 - p) / n) + 1e-12);
    }
  }
}

// The per-expert streams (philox.h: counter word 2 = expert + 1) through every
// block generator, and the row-selected masks the grouped path applies: a
// selected row keeps the mask of its token, whichever rows are selected.
TEST(DropoutMask, ExpertStreamsAndSelectedRowsEqualTheScalarDefinition) {
  const uint64_t seed = 0x0123456789abcdefULL;
  const int64_t rows = 13, cols = 91;
  const float p = 0.3f, scale = mola::philox::dropout_scale(p);
  for (const int64_t expert : {0, 1, 6}) {
    const uint32_t stream = mola::philox::expert_stream(expert);
    for (const DropoutIsa isa : mola::detail::dropout_isas()) {
      at::Tensor mask = mola::detail::dropout_mask_values_cpu(seed, rows, cols, p, isa, stream);
      const float* m = mask.data_ptr<float>();
      for (int64_t i = 0; i < rows * cols; ++i)
        ASSERT_EQ(m[i], mola::philox::dropout_keep(seed, static_cast<uint64_t>(i), p, stream) ? scale : 0.0f)
            << "expert " << expert << ", isa " << static_cast<int>(isa) << ", element " << i;
    }
    const at::Tensor x = at::randn({rows, cols});
    const at::Tensor picked = torch::tensor({7, 0, 12, 7, 3}, at::kLong);
    const at::Tensor full = mola::detail::dropout_mask_values_cpu(seed, rows, cols, p, stream);
    const at::Tensor want = x.index_select(0, picked) * full.index_select(0, picked);
    EXPECT_TRUE(at::equal(mola::detail::dropout_apply_rows_cpu(x, picked, seed, p, stream), want)) << expert;
    at::Tensor grad = at::randn({picked.numel(), cols});
    const at::Tensor grad_want = grad * full.index_select(0, picked);
    const at::Tensor xd = mola::detail::dropout_apply_rows_pair_cpu(x, picked, grad, seed, p, stream);
    EXPECT_TRUE(at::equal(xd, want) && at::equal(grad, grad_want)) << expert;
  }
  EXPECT_FALSE(at::equal(mola::detail::dropout_mask_values_cpu(seed, rows, cols, p, 0u),
                         mola::detail::dropout_mask_values_cpu(seed, rows, cols, p, mola::philox::expert_stream(0))));
}

}  // namespace
