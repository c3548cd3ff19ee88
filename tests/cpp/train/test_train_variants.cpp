// Tests for the training variants of docs/recipes.md in C++: the train option
// `trainable` and the adapter option `init` (JSON, validation, errors), the
// Gaussian and PiSSA initialisations of MoLALinear and of the C++ model, and a
// PiSSA adapter surviving save / load into a fresh base model. The Trainer's
// use of `trainable` and the Python side are tests/python/train/test_train_variants.py.
#include "mola/config.h"
#include "mola/models/adapter.h"
#include "mola/models/decoder.h"
#include "mola/nn/moe_lora_linear.h"
#include "mola/train/options.h"

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <string>

namespace {

using mola::AdapterConfig;
using mola::ConfigError;
using mola::ResolvedAdapter;
using mola::train::TrainOptions;
using nlohmann::json;

// Runs f, expects a ConfigError, and checks the message holds every part.
template <typename F>
void expect_config_error(F f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

TEST(TrainVariantsOptions, TrainableDefaultsRoundTripsAndRejectsUnknownValues) {
  EXPECT_EQ(TrainOptions{}.trainable, "all");
  EXPECT_EQ(TrainOptions::trainables(), (std::vector<std::string>{"all", "experts", "routers"}));
  for (const char* t : {"all", "experts", "routers"}) {
    const TrainOptions o = TrainOptions::from_json(json{{"trainable", t}});
    EXPECT_EQ(o.trainable, t);
    EXPECT_EQ(o.to_json()["trainable"], t);
    EXPECT_EQ(TrainOptions::from_json(o.to_json()), o);
  }
  expect_config_error([] { TrainOptions::from_json(json{{"trainable", "router"}}); },
                      {"trainable \"router\"", "all, experts, routers", "did you mean \"routers\""});
  expect_config_error([] { TrainOptions::from_json(json{{"trainable", 1}}); }, {"trainable must be a string"});
  TrainOptions o;
  o.trainable = "lora_b";
  expect_config_error([&] { o.validate(); }, {"trainable \"lora_b\"", "use one of all, experts, routers"});
}

TEST(TrainVariantsOptions, InitDefaultsRoundTripsAndOldFilesLoad) {
  EXPECT_EQ(AdapterConfig{}.init, "kaiming");
  EXPECT_EQ(AdapterConfig::inits(), (std::vector<std::string>{"kaiming", "gaussian", "pissa"}));
  for (const char* init : {"kaiming", "gaussian", "pissa"}) {
    const AdapterConfig c = AdapterConfig::from_json(json{{"experts", 4}, {"init", init}});
    EXPECT_EQ(c.init, init);
    EXPECT_EQ(c.to_json()["init"], init);
    const ResolvedAdapter r = c.resolve(4);
    EXPECT_EQ(r.init, init);
    // adapter_config.json names init only when it is not the default, so
    // files written before init existed stay as they were.
    EXPECT_EQ(r.to_json().contains("init"), std::string(init) != "kaiming");
    EXPECT_EQ(ResolvedAdapter::from_json(r.to_json()).init, init);
  }
  json old = AdapterConfig{}.resolve(4).to_json();
  old.erase("init");
  EXPECT_EQ(ResolvedAdapter::from_json(old).init, "kaiming");
  expect_config_error([] { AdapterConfig::from_json(json{{"init", "pisa"}}); },
                      {"init \"pisa\"", "kaiming, gaussian, pissa", "did you mean \"pissa\""});
  expect_config_error([] { AdapterConfig::from_json(json{{"init", true}}); }, {"init must be a string"});
}

TEST(TrainVariantsInit, GaussianDrawsAWithStdOneOverRank) {
  torch::manual_seed(0);
  const auto options = mola::nn::MoLALinearOptions(256, 64).num_experts(8).rank(4).init("gaussian");
  mola::nn::MoLALinear layer(options);
  // 8 * 4 * 256 = 8192 draws: the sample std of N(0, 0.25^2) is within 3% of 0.25.
  EXPECT_NEAR(layer->lora_a.std().item<double>(), 0.25, 0.25 * 0.03);
  EXPECT_NEAR(layer->lora_a.mean().item<double>(), 0.0, 0.01);
  EXPECT_EQ(layer->lora_b.abs().max().item<double>(), 0.0);
  // The router stays Kaiming-uniform: U(-1/16, 1/16).
  EXPECT_LE(layer->router.abs().max().item<double>(), 1.0 / 16.0);
}

TEST(TrainVariantsInit, PissaKeepsTheOutputAndTakesTheTopSingularDirections) {
  torch::manual_seed(1);
  torch::nn::Linear base(torch::nn::LinearOptions(24, 16).bias(true));
  const at::Tensor w0 = base->weight.detach().clone().to(at::kDouble);
  const at::Tensor x = torch::randn({10, 24});
  const at::Tensor y0 = base->forward(x).detach();
  const auto options = mola::nn::MoLALinearOptions(24, 16).num_experts(3).top_k(2).rank(4).alpha(8).init("pissa");
  mola::nn::MoLALinear layer(base, options);
  layer->eval();
  EXPECT_TRUE(torch::allclose(layer->forward(x), y0, 1e-5, 1e-5));

  // s B A is the rank-4 truncated SVD of the original weight, in every expert.
  const auto svd = torch::linalg_svd(w0, /*full_matrices=*/false);
  const at::Tensor u = std::get<0>(svd).slice(1, 0, 4), s = std::get<1>(svd).slice(0, 0, 4);
  const at::Tensor vh = std::get<2>(svd).slice(0, 0, 4);
  const at::Tensor truncated = (u * s.unsqueeze(0)).matmul(vh);
  for (int64_t e = 0; e < 3; ++e) {
    const at::Tensor ba = layer->lora_b[e].to(at::kDouble).matmul(layer->lora_a[e].to(at::kDouble)) * 2.0;
    EXPECT_LT((ba - truncated).abs().max().item<double>(), 1e-5) << "expert " << e;
  }
  EXPECT_LT((layer->base->weight.to(at::kDouble) - (w0 - truncated)).abs().max().item<double>(), 1e-5);
  // Rank above min(out, in) names both.
  try {
    mola::nn::MoLALinear(torch::nn::Linear(8, 6), mola::nn::MoLALinearOptions(8, 6).num_experts(2).rank(7).init("pissa"));
    ADD_FAILURE() << "no error for rank 7 > 6";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 7 exceeds min(out, in) = 6"), std::string::npos) << e.what();
  }
}

TEST(TrainVariantsInit, PissaModelSavesAndLoadsIntoAFreshBase) {
  const auto config = mola::models::ModelConfig::from_json(json::parse(R"({
    "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "tie_word_embeddings": false})"));
  const auto fresh = [&] {
    torch::manual_seed(3);
    mola::models::CausalLM m(config);
    m->eval();
    return m;
  };
  const at::Tensor ids = torch::randint(61, {2, 7}, torch::kLong);
  auto model = fresh();
  const at::Tensor base_logits = model->forward(ids).logits.detach();
  const at::Tensor q0 = model->model->layers->ptr(0)->as<mola::models::DecoderLayerImpl>()->self_attn->q_proj->weight.clone();
  AdapterConfig cfg;
  cfg.experts = "2468";
  cfg.rank = 4;
  cfg.dropout = 0.0;
  cfg.init = "pissa";
  model->attach(cfg);
  EXPECT_TRUE(torch::allclose(model->forward(ids).logits, base_logits, 1e-5, 1e-5));
  const auto* layer0 = model->model->layers->ptr(0)->as<mola::models::DecoderLayerImpl>();
  EXPECT_GT((layer0->self_attn->q_proj->weight - q0).abs().max().item<double>(), 1e-3);  // the base moved

  // "Training": move the experts and routers, then save and load into a fresh base.
  {
    torch::NoGradGuard no_grad;
    for (auto& [key, t] : mola::models::adapter_state_dict(*model)) t.add_(torch::randn_like(t) * 0.05);
  }
  const at::Tensor trained = model->forward(ids).logits.detach();
  char pattern[] = "/tmp/mola_pissa_XXXXXX";
  const std::string dir = std::string(::mkdtemp(pattern)) + "/adapter";
  mola::models::save_adapter(*model, dir);
  auto loaded = fresh();
  mola::models::load_adapter(*loaded, dir);
  EXPECT_EQ(loaded->adapter_config().init, "pissa");
  EXPECT_TRUE(torch::allclose(loaded->forward(ids).logits, trained, 1e-5, 1e-5));

  // A Kaiming adapter cannot take PiSSA weights: its base was never adjusted.
  auto kaiming = fresh();
  AdapterConfig plain = cfg;
  plain.init = "kaiming";
  kaiming->attach(plain);
  expect_config_error([&] { mola::models::load_adapter(*kaiming, dir); },
                      {"init \"pissa\" in the file", "init \"kaiming\"", "load into a model without an adapter"});
}

}  // namespace
