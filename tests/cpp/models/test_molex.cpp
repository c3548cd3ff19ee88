// MoLEx on the C++ side (config, gate, decoder; docs/design.md, MoLEx): the config
// keys and their errors, lora/mola JSON unchanged, alpha = 1 is exactly the
// base method, the straight-through gate leaves the forward value alone and
// still trains the gate, "none" does not, exclude_self is honoured, the
// balance loss against hand-computed values, and save/load with the gates.
// The forward against a block-by-block oracle and the transformers side are
// in tests/python/models/test_molex.py.
#include "tiny_model.h"

#include "mola/config.h"
#include "mola/models/adapter.h"
#include "mola/models/decoder.h"
#include "mola/nn/molex.h"

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <string>

namespace {

using mola::AdapterConfig;
using mola::ConfigError;
using mola::models::CausalLM;
using mola::models::DecoderLayerImpl;
using mola::models::ModelConfig;
using nlohmann::json;

using mola::testing::tiny_llama;
using mola::testing::tiny_model;

// Non-zero LoRA B and larger gate weights, so that adapters matter and the
// gates pick different layers for different sequences.
void perturb(CausalLM& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters()) {
    const std::string& k = p.key();
    if (k.find(".lora_b") != std::string::npos) p.value().normal_(0.0, 0.3);
    if (k.find(".molex.gate.weight") != std::string::npos) p.value().normal_(0.0, 2.0);
  }
}

std::string expect_config_error(const std::string& text) {
  try {
    AdapterConfig::from_json_string(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ConfigError for " << text;
  return "";
}

TEST(MoLExConfig, KeysOnlyWithMethodMolex) {
  const std::string msg = expect_config_error(R"({"method": "mola", "molex_pool": "last"})");
  EXPECT_NE(msg.find("molex_pool is a MoLEx setting"), std::string::npos) << msg;
  EXPECT_NE(msg.find("set method \"molex\""), std::string::npos) << msg;
  EXPECT_NE(expect_config_error(R"({"method": "lora", "base_method": "lora"})").find("base_method"),
            std::string::npos);
  // A C++ caller who sets the fields directly gets the same answer.
  AdapterConfig c;
  c.molex_alpha = 0.3;
  EXPECT_THROW(c.validate(), ConfigError);
}

TEST(MoLExConfig, LoraAndMolaJsonUnchanged) {
  for (const char* method : {"mola", "lora"}) {
    const json j = AdapterConfig::for_method(method).to_json();
    EXPECT_EQ(j.size(), AdapterConfig::keys().size()) << j.dump();  // no MoLEx key added
    for (const auto& key : AdapterConfig::molex_keys()) EXPECT_FALSE(j.contains(key)) << key;
    EXPECT_FALSE(AdapterConfig::for_method(method).resolve(4).to_json().contains("molex_pool"));
  }
}

TEST(MoLExConfig, DefaultsAndRoundTrip) {
  const AdapterConfig c = AdapterConfig::from_json_string(R"({"method": "molex"})");
  EXPECT_EQ(c.base_method, "lora");
  EXPECT_EQ(std::get<int64_t>(c.experts.value), 1);
  EXPECT_EQ(std::get<int64_t>(c.top_k.value), 1);
  EXPECT_EQ(c.molex_pool, "mean");
  EXPECT_EQ(c.molex_alpha, 0.5);
  EXPECT_EQ(c.molex_gate_grad, "straight_through");
  const AdapterConfig m =
      AdapterConfig::from_json_string(R"({"method": "molex", "base_method": "mola", "experts": "2468",
                                          "molex_pool": "last", "molex_alpha": 0.25, "molex_alpha_learned": true,
                                          "molex_gate_grad": "prob", "molex_exclude_self": true,
                                          "molex_aux_loss_coef": 0.01})");
  EXPECT_EQ(std::get<int64_t>(m.top_k.value), 2);  // mola's default
  EXPECT_EQ(AdapterConfig::from_json(m.to_json()), m);
  const auto r = m.resolve(4);
  EXPECT_EQ(r.experts, (std::vector<int64_t>{2, 4, 6, 8}));
  const auto back = mola::ResolvedAdapter::from_json(r.to_json());
  EXPECT_EQ(back.to_json(), r.to_json());
  EXPECT_EQ(back.molex_gate_grad, "prob");
}

TEST(MoLExConfig, BadValuesNameTheKeyAndFix) {
  EXPECT_NE(expect_config_error(R"({"method": "molex", "base_method": "dora"})").find("base_method \"dora\""),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_pool": "max"})").find("molex_pool"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_gate_grad": "gumbel"})").find("molex_gate_grad"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_alpha": 1.5})").find("0 <= molex_alpha <= 1"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_alpha": 1.0, "molex_alpha_learned": true})")
                .find("0 < molex_alpha < 1"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_alpha_learned": 1})").find("true or false"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "molex_aux_loss_coef": -1})").find("molex_aux_loss_coef"),
            std::string::npos);
  EXPECT_NE(expect_config_error(R"({"method": "molex", "experts": 4})").find("base_method \"mola\""),
            std::string::npos);
  AdapterConfig c = AdapterConfig::from_json_string(R"({"method": "molex", "molex_exclude_self": true})");
  EXPECT_THROW(c.resolve(1), ConfigError);
  EXPECT_NO_THROW(c.resolve(2));
}

AdapterConfig molex(const std::string& extra) {
  json j = json::parse(R"({"method": "molex", "rank": 4, "dropout": 0.0})");
  j.update(json::parse(extra));
  return AdapterConfig::from_json(j);
}

at::Tensor ids() { return torch::randint(61, {4, 9}, torch::TensorOptions().dtype(torch::kLong)); }

TEST(MoLExModel, AlphaOneIsTheBaseMethodExactly) {
  for (const char* base : {"lora", "mola"}) {
    const std::string b = base;
    const std::string extra = b == "mola" ? R"(, "experts": 4, "top_k": 2)" : "";
    CausalLM plain = tiny_model(3), mixed = tiny_model(3);
    json jb = json::parse(R"({"rank": 4, "dropout": 0.0, "method": ")" + b + "\"" + extra + "}");
    plain->attach(AdapterConfig::from_json(jb));
    mixed->attach(molex(R"({"molex_alpha": 1.0, "base_method": ")" + b + "\"" + extra + "}"));
    perturb(mixed, 5);
    {
      torch::NoGradGuard no_grad;
      auto want = mola::models::adapter_state_dict(*mixed);
      for (auto& [key, p] : mola::models::adapter_state_dict(*plain)) p.copy_(want.at(key));
    }
    torch::manual_seed(1);
    const at::Tensor x = ids();
    const at::Tensor mask = torch::ones_like(x).index_put_({1, torch::indexing::Slice(6)}, 0);
    const at::Tensor a = plain->forward(x, mask).logits, m = mixed->forward(x, mask).logits;
    EXPECT_TRUE(torch::equal(a, m)) << base << ": " << (a - m).abs().max().item<double>();
    // The same adapter with alpha 0.5 is a different model.
    CausalLM half = tiny_model(3);
    half->attach(molex(R"({"base_method": ")" + b + "\"" + extra + "}"));
    {
      torch::NoGradGuard no_grad;
      auto want = mola::models::adapter_state_dict(*mixed);
      for (auto& [key, p] : mola::models::adapter_state_dict(*half)) p.copy_(want.at(key));
    }
    EXPECT_GT((half->forward(x, mask).logits - a).abs().max().item<double>(), 1e-3);
  }
}

// The gates' weight gradients after one backward of the LM loss.
std::vector<at::Tensor> gate_grads(const std::string& gate_grad) {
  CausalLM m = tiny_model(4);
  m->attach(molex(R"({"molex_gate_grad": ")" + gate_grad + "\"}"));
  perturb(m, 6);
  m->train();
  torch::manual_seed(2);
  const at::Tensor x = ids();
  m->forward(x, std::nullopt, x).loss.backward();
  std::vector<at::Tensor> out;
  for (const auto& layer : *m->model->layers) out.push_back(layer->as<DecoderLayerImpl>()->molex->gate->weight.grad());
  return out;
}

TEST(MoLExModel, GateGradients) {
  for (const char* mode : {"straight_through", "prob"})
    for (const auto& g : gate_grads(mode)) {
      ASSERT_TRUE(g.defined()) << mode;
      EXPECT_GT(g.abs().sum().item<double>(), 0.0) << mode;
    }
  for (const auto& g : gate_grads("none")) EXPECT_TRUE(!g.defined() || g.abs().sum().item<double>() == 0.0);
}

TEST(MoLExModel, StraightThroughKeepsTheForwardValueProbChangesIt) {
  auto logits = [](const std::string& mode) {
    CausalLM m = tiny_model(7);
    m->attach(molex(R"({"molex_gate_grad": ")" + mode + "\"}"));
    perturb(m, 8);
    torch::manual_seed(3);
    return m->forward(ids()).logits;
  };
  const at::Tensor none = logits("none");
  EXPECT_TRUE(torch::equal(logits("straight_through"), none));
  EXPECT_GT((logits("prob") - none).abs().max().item<double>(), 1e-4);
}

TEST(MoLExModel, ExcludeSelf) {
  for (const bool exclude : {false, true}) {
    CausalLM m = tiny_model(9);
    m->attach(molex(exclude ? R"({"molex_exclude_self": true})" : "{}"));
    {
      torch::NoGradGuard no_grad;
      int64_t t = 0;
      for (const auto& layer : *m->model->layers) {
        auto& gate = *layer->as<DecoderLayerImpl>()->molex;
        gate.gate->bias.zero_();
        gate.gate->bias[t++] = 100.0;  // every gate would pick its own layer
      }
    }
    m->forward(ids());
    int64_t t = 0;
    for (const auto& layer : *m->model->layers) {
      const at::Tensor choice = layer->as<DecoderLayerImpl>()->molex->last.choice;
      if (exclude) EXPECT_FALSE(choice.eq(t).any().item<bool>()) << "layer " << t;
      else EXPECT_TRUE(choice.eq(t).all().item<bool>()) << "layer " << t;
      ++t;
    }
  }
}

TEST(MoLExGate, BalanceLossByHand) {
  // Three sequences over L = 2 layers: probs (0.9, 0.1), (0.2, 0.8), (0.7, 0.3)
  // choose 0, 1, 0: f = (2/3, 1/3), P = (0.6, 0.4), loss = 2 * (0.4 + 0.4/3).
  mola::nn::MoLExGate gate(mola::nn::MoLExGateOptions(2, 2, 0), torch::TensorOptions());
  {
    torch::NoGradGuard no_grad;
    gate->gate->weight.copy_(torch::tensor({{1.0f, 0.0f}, {0.0f, 1.0f}}));
  }
  // logits = z (mean of one token): pick z so that softmax gives the probs above.
  const auto lg = [](double p) { return std::log(p); };
  const at::Tensor z = torch::tensor({lg(0.9), lg(0.1), lg(0.2), lg(0.8), lg(0.7), lg(0.3)}, torch::kFloat)
                           .view({3, 1, 2});
  const auto r = gate->route(z, at::Tensor());
  EXPECT_TRUE(torch::equal(r.choice, torch::tensor({0, 1, 0}, torch::kLong)));
  EXPECT_NEAR(gate->balance_loss().item<double>(), 2.0 * (2.0 / 3 * 0.6 + 1.0 / 3 * 0.4), 1e-6);
}

TEST(MoLExModel, SaveLoadKeepsGatesAndLogits) {
  CausalLM m = tiny_model(10);
  m->attach(molex(R"({"base_method": "mola", "experts": 2, "top_k": 1, "molex_alpha": 0.3,
                      "molex_alpha_learned": true, "molex_pool": "last"})"));
  perturb(m, 11);
  char pattern[] = "/tmp/mola_molex_XXXXXX";
  const std::string dir = std::string(::mkdtemp(pattern)) + "/adapter";
  mola::save_adapter(*m, dir);
  CausalLM fresh = tiny_model(10);
  mola::load_adapter(*fresh, dir);
  EXPECT_EQ(fresh->adapter_config().to_json(), m->adapter_config().to_json());
  const auto state = mola::models::adapter_state_dict(*fresh);
  EXPECT_TRUE(state.count("model.layers.3.molex.gate.weight"));
  EXPECT_NEAR(state.at("model.layers.0.molex.alpha").sigmoid().item<double>(), 0.3, 1e-6);
  torch::manual_seed(4);
  const at::Tensor x = ids();
  EXPECT_TRUE(torch::equal(fresh->forward(x).logits, m->forward(x).logits));
  // Another MoLEx setting in an attached adapter is refused, naming the key.
  CausalLM other = tiny_model(10);
  other->attach(molex(R"({"base_method": "mola", "experts": 2, "top_k": 1, "molex_alpha": 0.3,
                          "molex_alpha_learned": true, "molex_pool": "mean"})"));
  try {
    mola::load_adapter(*other, dir);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("molex_pool"), std::string::npos) << e.what();
  }
}

TEST(MoLExModel, GenerateKeepsThePrefillChoice) {
  CausalLM m = tiny_model(12);
  m->attach(molex("{}"));
  perturb(m, 13);
  torch::manual_seed(5);
  const at::Tensor prompt = ids();
  mola::models::GenerateOptions o;
  o.max_new_tokens = 4;
  const at::Tensor out = m->generate(prompt, o);
  // The first new token is the prefill's argmax, which is the cache-free forward's.
  EXPECT_TRUE(torch::equal(out.select(1, 9), m->forward(prompt).logits.select(1, -1).argmax(-1)));
  // Each row alone generates the same tokens as in the batch (its own j, its own branch cache).
  for (int64_t b = 0; b < prompt.size(0); ++b)
    EXPECT_TRUE(torch::equal(m->generate(prompt.narrow(0, b, 1), o), out.narrow(0, b, 1))) << "row " << b;
  CausalLM tok = tiny_model(12);
  tok->attach(molex(R"({"molex_pool": "token"})"));
  EXPECT_THROW(tok->generate(prompt, o), std::invalid_argument);
}

}  // namespace
