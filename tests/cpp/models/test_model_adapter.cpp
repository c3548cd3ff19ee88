// Tests for adapters on the C++ decoder (CausalLM::attach, aux_loss and
// mola/models/adapter.h): a fresh adapter leaves the logits exactly as they
// were (B is zero), only adapter parameters train, per-layer experts follow
// the preset, and save_adapter / load_adapter round-trip, with every mismatch
// an error naming what differs. Python's side is tests/python/models/test_model_adapter.py.
#include "tiny_model.h"

#include "mola/io/safetensors.h"
#include "mola/models/adapter.h"
#include "mola/models/decoder.h"

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

namespace {

using mola::AdapterConfig;
using mola::models::CausalLM;
using mola::models::ModelConfig;
using nlohmann::json;

using mola::testing::tiny_llama;
using mola::testing::tiny_model;

AdapterConfig inverted(int64_t rank = 4) {
  AdapterConfig c;
  c.experts = "2468";
  c.top_k = 2;
  c.rank = rank;
  c.dropout = 0.0;
  return c;
}

at::Tensor batch() { return torch::randint(61, {2, 7}, torch::kLong); }

std::string temp_dir(const std::string& name) {
  char pattern[] = "/tmp/mola_adapter_XXXXXX";
  const char* d = ::mkdtemp(pattern);
  EXPECT_NE(d, nullptr);
  return std::string(d) + "/" + name;  // a subdirectory that does not exist yet: save makes it
}

template <class E>
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing \"" << *parts.begin() << "\"";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

TEST(ModelAdapterAttach, FreshAdapterLeavesLogitsUnchanged) {
  CausalLM m = tiny_model();
  const at::Tensor ids = batch();
  const at::Tensor before = m->forward(ids).logits;
  m->attach(inverted());
  const at::Tensor after = m->forward(ids).logits;
  EXPECT_TRUE(torch::equal(before, after)) << (before - after).abs().max();
  EXPECT_TRUE(m->has_adapter());
}

TEST(ModelAdapterAttach, PerLayerExpertsFollowThePreset) {
  CausalLM m = tiny_model();
  m->attach(inverted(/*rank=*/3));
  const auto params = m->named_parameters(/*recurse=*/true);
  const int64_t experts[] = {2, 4, 6, 8};
  for (int64_t l = 0; l < 4; ++l) {
    const std::string q = "model.layers." + std::to_string(l) + ".self_attn.q_proj.";
    EXPECT_EQ(params[q + "mola.router"].sizes(), at::IntArrayRef({experts[l], 32})) << l;
    EXPECT_EQ(params[q + "mola.lora_a"].sizes(), at::IntArrayRef({experts[l], 3, 32})) << l;
    EXPECT_EQ(params[q + "mola.lora_b"].sizes(), at::IntArrayRef({experts[l], 32, 3})) << l;
    const std::string down = "model.layers." + std::to_string(l) + ".mlp.down_proj.";
    EXPECT_EQ(params[down + "mola.lora_a"].sizes(), at::IntArrayRef({experts[l], 3, 48})) << l;
    EXPECT_EQ(params[down + "mola.lora_b"].sizes(), at::IntArrayRef({experts[l], 32, 3})) << l;
    EXPECT_TRUE(params.contains(q + "weight"));  // the base keeps its checkpoint name
  }
  EXPECT_EQ(m->adapter_config().experts, std::vector<int64_t>({2, 4, 6, 8}));
  // 7 targets x 3 tensors x 4 layers.
  EXPECT_EQ(mola::models::adapter_state_dict(*m).size(), 84u);
}

TEST(ModelAdapterAttach, OnlyAdapterParametersGetGradients) {
  CausalLM m = tiny_model();
  m->attach(inverted());
  m->train();
  const at::Tensor ids = batch();
  const auto out = m->forward(ids, {}, ids);
  (out.loss + m->aux_loss(0.01)).backward();
  int64_t adapter = 0;
  for (const auto& p : m->named_parameters(/*recurse=*/true)) {
    const bool is_adapter = p.key().find(".mola.") != std::string::npos;
    EXPECT_EQ(p.value().requires_grad(), is_adapter) << p.key();
    EXPECT_EQ(p.value().grad().defined(), is_adapter) << p.key();
    adapter += is_adapter;
  }
  EXPECT_EQ(adapter, 84);
  // With B zero, A's gradient is zero and the routers' comes from aux_loss
  // alone; B's is what the language-model loss moves first.
  const auto params = m->named_parameters(/*recurse=*/true);
  EXPECT_GT(params["model.layers.0.mlp.up_proj.mola.lora_b"].grad().abs().sum().item<double>(), 0.0);
}

TEST(ModelAdapterAttach, AuxLossStacksEachLayersModules) {
  CausalLM m = tiny_model();
  AdapterConfig c = inverted();
  c.targets = {"v_proj", "q_proj"};  // stacked in q, k, v, ... order whatever the config's order
  m->attach(c);
  const at::Tensor ids = batch();
  m->forward(ids);
  const auto params = m->named_parameters(/*recurse=*/true);
  std::vector<at::Tensor> per_layer;
  for (const auto& a : m->adapted_projections()) {
    if (static_cast<size_t>(a.layer) == per_layer.size()) per_layer.push_back(a.module->mola->router_logits);
    else per_layer.back() = at::cat({per_layer.back(), a.module->mola->router_logits}, 0);
  }
  ASSERT_EQ(per_layer.size(), 4u);
  EXPECT_EQ(per_layer[0].sizes(), at::IntArrayRef({2 * 2 * 7, 2}));
  const at::Tensor expected = mola::ops::load_balancing_loss(per_layer, {2, 2, 2, 2}, 0.5);
  EXPECT_TRUE(torch::allclose(m->aux_loss(0.5), expected));
  EXPECT_TRUE(torch::allclose(m->aux_loss(), expected * (0.001 / 0.5)));  // the config's coef
}

TEST(ModelAdapterAttach, Errors) {
  CausalLM m = tiny_model();
  AdapterConfig bad = inverted();
  bad.targets = {"q_proj", "gate"};
  expect_error<mola::ConfigError>([&] { m->attach(bad); }, {"\"gate\"", "did you mean \"gate_proj\""});
  EXPECT_FALSE(m->has_adapter());
  expect_error<std::logic_error>([&] { m->aux_loss(); }, {"no adapter"});
  expect_error<std::logic_error>([&] { mola::save_adapter(*m, temp_dir("x")); }, {"no adapter"});
  m->attach(inverted());
  expect_error<std::logic_error>([&] { m->aux_loss(); }, {"run a forward first"});
  expect_error<std::logic_error>([&] { m->attach(inverted()); }, {"already has an adapter"});
}

TEST(ModelAdapterAttach, LoraIsOneExpert) {
  CausalLM m = tiny_model();
  m->attach(AdapterConfig::from_json_string(R"({"method": "lora", "rank": 2, "targets": ["q_proj"]})"));
  const auto params = m->named_parameters(/*recurse=*/true);
  EXPECT_EQ(params["model.layers.3.self_attn.q_proj.mola.lora_a"].sizes(), at::IntArrayRef({1, 2, 32}));
  EXPECT_EQ(mola::models::adapter_state_dict(*m).size(), 12u);
}

TEST(ModelAdapterFiles, SaveThenLoadGivesIdenticalLogits) {
  CausalLM m = tiny_model();
  m->attach(inverted());
  {
    at::NoGradGuard no_grad;
    for (auto& [key, t] : mola::models::adapter_state_dict(*m)) t.add_(torch::randn_like(t) * 0.1);
  }
  const at::Tensor ids = batch();
  const at::Tensor logits = m->forward(ids).logits;
  const at::Tensor base = tiny_model()->forward(ids).logits;
  EXPECT_FALSE(torch::allclose(logits, base));  // the perturbed B changes the output

  const std::string dir = temp_dir("nested/out");
  mola::save_adapter(*m, dir);
  const json cfg = json::parse(std::ifstream(dir + "/adapter_config.json"));
  EXPECT_EQ(cfg.at("experts"), json({2, 4, 6, 8}));
  EXPECT_EQ(cfg.at("method"), "mola");

  CausalLM fresh = tiny_model();  // same seed: the same base weights
  mola::load_adapter(*fresh, dir);
  EXPECT_TRUE(torch::equal(fresh->forward(ids).logits, logits));
  // Loading again into the now attached model checks and overwrites.
  mola::load_adapter(*fresh, dir);
  EXPECT_TRUE(torch::equal(fresh->forward(ids).logits, logits));
}

TEST(ModelAdapterFiles, LoadErrors) {
  CausalLM m = tiny_model();
  m->attach(inverted());
  const std::string dir = temp_dir("out");
  mola::save_adapter(*m, dir);

  // Another allocation attached: the first differing layer and both values.
  CausalLM other = tiny_model();
  AdapterConfig flat = inverted();
  flat.experts = 4;
  other->attach(flat);
  expect_error<mola::ConfigError>([&] { mola::load_adapter(*other, dir); },
                                  {"layer 0 (model.layers.0)", "experts 2 in the file", "attached adapter has experts 4"});

  // Missing directory and a tensor of the wrong shape.
  expect_error<mola::models::ModelFileNotFoundError>([&] { mola::load_adapter(*other, dir + "/none"); },
                                                     {"no such adapter directory"});
  auto tensors = mola::io::load_safetensors(dir + "/adapter_model.safetensors");
  const std::string key = "model.layers.1.mlp.up_proj.mola.lora_b";
  tensors[key] = torch::zeros({4, 48, 5});
  mola::io::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  CausalLM fresh = tiny_model();
  expect_error<std::invalid_argument>([&] { mola::load_adapter(*fresh, dir); },
                                      {key, "[4, 48, 5]", "[4, 48, 4]"});
  EXPECT_FALSE(fresh->has_adapter());  // nothing changed

  tensors.erase(key);
  tensors["model.layers.1.mlp.up_proj.mola.extra"] = torch::zeros({1});
  mola::io::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  expect_error<std::invalid_argument>([&] { mola::load_adapter(*fresh, dir); }, {"lacks 1 tensor", key});
  tensors[key] = torch::zeros({4, 48, 4});
  mola::io::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  expect_error<std::invalid_argument>([&] { mola::load_adapter(*fresh, dir); },
                                      {"does not call for", "mola.extra"});
}

}  // namespace

namespace {

void randomise_adapter(mola::models::CausalLMImpl& m, uint64_t seed = 5) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& [key, t] : mola::models::adapter_state_dict(m)) t.normal_(0.0, 0.2);
}

}  // namespace

// The balance loss counts every training forward since it was last taken
// (two sequences scored separately before one backward), as one batch of
// their tokens; a forward whose graph a backward spent no longer counts.
TEST(ModelAdapterAuxLoss, CountsEveryForwardSinceItWasTaken) {
  CausalLM m = tiny_model();
  m->attach(inverted());
  randomise_adapter(*m);
  m->train();
  const at::Tensor a = batch(), b = batch();
  m->forward(a);
  m->forward(b);
  const at::Tensor two = m->aux_loss();
  m->forward(at::cat({a, b}));
  const at::Tensor joined = m->aux_loss();
  EXPECT_NEAR(two.item<double>(), joined.item<double>(), 1e-7);

  m->forward(b);
  const double only_b = m->aux_loss().item<double>();
  std::vector<at::Tensor> params;
  for (const auto& p : m->parameters())
    if (p.requires_grad()) params.push_back(p);
  torch::autograd::grad({m->forward(a, {}, a).loss}, params);  // spends that forward's graph
  m->forward(b);
  const at::Tensor aux = m->aux_loss();
  EXPECT_NEAR(aux.item<double>(), only_b, 1e-7);
  aux.backward();  // through b's live graph only

  // Eval mode or no grad: the last forward counts, and nothing piles up.
  m->eval();
  {
    torch::NoGradGuard no_grad;
    m->forward(a);
    m->forward(b);
  }
  EXPECT_NEAR(m->aux_loss().item<double>(), only_b, 1e-7);
}

// load_adapter is for inference by default (frozen, eval mode), as PEFT's
// from_pretrained; is_trainable keeps the mode and trains the adapter.
TEST(ModelAdapterFiles, LoadIsForInferenceUnlessTrainable) {
  CausalLM m = tiny_model();
  m->attach(inverted());
  const std::string dir = temp_dir("adapter");
  mola::save_adapter(*m, dir);
  CausalLM fresh = tiny_model();
  fresh->train();
  mola::load_adapter(*fresh, dir);
  EXPECT_FALSE(fresh->is_training());
  for (const auto& p : fresh->parameters()) EXPECT_FALSE(p.requires_grad());
  CausalLM again = tiny_model();
  again->train();
  mola::load_adapter(*again, dir, /*is_trainable=*/true);
  EXPECT_TRUE(again->is_training());
  for (const auto& [key, t] : mola::models::adapter_state_dict(*again)) EXPECT_TRUE(t.requires_grad()) << key;
}

// A copy owns its tensors, keeps adapter, mode and flags, and draws no random numbers.
TEST(ModelAdapterCopy, CopyIsDeepAndDrawsNothing) {
  CausalLM m = tiny_model();
  AdapterConfig cfg = inverted();
  cfg.init = "pissa";
  m->attach(cfg);
  randomise_adapter(*m);
  m->train();
  const at::Tensor ids = batch();
  m->forward(ids);
  torch::manual_seed(7);
  const at::Tensor expected_draw = torch::rand({3});
  torch::manual_seed(7);
  auto twin = m->copy();
  EXPECT_TRUE(torch::equal(torch::rand({3}), expected_draw));  // the copy drew nothing
  EXPECT_TRUE(twin->is_training());
  EXPECT_EQ(twin->adapter_config().to_json(), m->adapter_config().to_json());
  m->eval();
  twin->eval();
  torch::NoGradGuard no_grad;
  const at::Tensor want = m->forward(ids).logits;
  EXPECT_TRUE(torch::equal(twin->forward(ids).logits, want));
  mola::models::adapter_state_dict(*twin).begin()->second.add_(1.0);
  EXPECT_TRUE(torch::equal(m->forward(ids).logits, want));
}

// The adapter switch runs the base model alone (PiSSA's principal part
// included); detach gives the base model back with its parameters trainable.
TEST(ModelAdapterSwitch, DisableAndDetachGiveTheBaseModel) {
  for (const char* init : {"kaiming", "pissa"}) {
    CausalLM m = tiny_model();
    const at::Tensor ids = batch();
    torch::NoGradGuard no_grad;
    const at::Tensor base = m->forward(ids).logits;
    AdapterConfig cfg = inverted();
    cfg.init = init;
    m->attach(cfg);
    randomise_adapter(*m);
    const at::Tensor adapted = m->forward(ids).logits;
    EXPECT_GT((adapted - base).abs().max().item<double>(), 1e-3) << init;
    m->set_adapter_enabled(false);
    EXPECT_LT((m->forward(ids).logits - base).abs().max().item<double>(), 1e-4) << init;
    m->set_adapter_enabled(true);
    EXPECT_TRUE(torch::equal(m->forward(ids).logits, adapted)) << init;
    m->detach_adapter();
    EXPECT_FALSE(m->has_adapter());
    EXPECT_LT((m->forward(ids).logits - base).abs().max().item<double>(), 1e-4) << init;
    for (const auto& p : m->named_parameters()) {
      EXPECT_TRUE(p.value().requires_grad()) << p.key();
      EXPECT_EQ(p.key().find(".mola."), std::string::npos) << p.key();
    }
    m->attach(inverted());  // a fresh adapter attaches again
  }
}
