// Tests for mola/models/config.h: each family's config.json as transformers
// 5 writes it (and the older spellings: top-level rope_theta, Gemma's
// hidden_activation), the per-family defaults, every error with the field its
// message must name, plus the decoder's parameter names for a config (the
// contract that lets checkpoints load by name). Numerical parity with
// transformers is tested from Python (tests/python/models/test_models_parity.py).
#include "mola/models/config.h"
#include "mola/models/decoder.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

namespace {

using mola::models::Activation;
using mola::models::ModelConfig;
using mola::models::ModelConfigError;
using mola::models::ModelFamily;
using mola::models::ModelFileNotFoundError;
using nlohmann::json;

// What LlamaConfig(vocab_size=97, hidden_size=64, ...).save_pretrained writes.
json llama_json() {
  return json::parse(R"({
    "model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 112,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": null})");
}

// Runs f, expects a ModelConfigError whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected a ModelConfigError containing \"" << *parts.begin() << "\"";
  } catch (const ModelConfigError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

// llama_json() with `field` replaced (or removed when value is discarded).
void expect_field_error(const std::string& field, const json& value, std::initializer_list<std::string> parts) {
  json j = llama_json();
  if (value.is_discarded()) j.erase(field);
  else j[field] = value;
  expect_error([&] { ModelConfig::from_json(j, "ckpt/config.json"); }, parts);
}

TEST(ModelConfigParse, Llama) {
  const ModelConfig c = ModelConfig::from_json(llama_json());
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_FALSE(c.scale_embeddings);
  EXPECT_FALSE(c.norm_unit_offset);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.vocab_size, 97);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 112);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.activation, Activation::kSiLU);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_FALSE(c.pad_token_id.has_value());
}

TEST(ModelConfigParse, MistralWithSlidingWindowAndTopLevelRopeTheta) {
  const ModelConfig c = ModelConfig::from_json(json::parse(R"({
    "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rope_theta": 1000000.0, "sliding_window": 4096, "eos_token_id": [2, 3]})"));
  EXPECT_EQ(c.family, ModelFamily::kMistral);
  EXPECT_FALSE(c.scale_embeddings);
  EXPECT_FALSE(c.norm_unit_offset);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(c.max_position_embeddings, 4096 * 32);
  EXPECT_FALSE(c.tie_word_embeddings);

  json null_window = c.to_json();
  null_window["sliding_window"] = nullptr;
  EXPECT_FALSE(ModelConfig::from_json(null_window).sliding_window.has_value());
}

TEST(ModelConfigParse, GemmaDefaultsAndLegacyActivation) {
  // Gemma-7B's released config: head_dim given (256 != 3072 / 16) and the
  // activation under both keys.
  const ModelConfig c = ModelConfig::from_json(json::parse(R"({
    "model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
    "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0})"));
  EXPECT_EQ(c.family, ModelFamily::kGemma);
  // What the decoder reads instead of the family.
  EXPECT_TRUE(c.scale_embeddings);
  EXPECT_TRUE(c.norm_unit_offset);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.activation, Activation::kGELUTanh);
  EXPECT_EQ(c.max_position_embeddings, 8192);

  // Plain "gelu" in a gemma config means the tanh approximation; elsewhere exact.
  json g = c.to_json();
  g["hidden_act"] = "gelu";
  EXPECT_EQ(ModelConfig::from_json(g).activation, Activation::kGELUTanh);
  json l = llama_json();
  l["hidden_act"] = "gelu";
  EXPECT_EQ(ModelConfig::from_json(l).activation, Activation::kGELU);
}

TEST(ModelConfigDefaults, OptionalFieldsTakeTransformersDefaults) {
  json j = llama_json();
  for (const char* k : {"num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
                        "tie_word_embeddings", "attention_bias", "max_position_embeddings", "eos_token_id"})
    j.erase(k);
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.hidden_act, "silu");
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_TRUE(c.eos_token_ids.empty());
}

TEST(ModelConfigDefaults, JsonRoundTrip) {
  const ModelConfig a = ModelConfig::from_json(llama_json());
  const ModelConfig b = ModelConfig::from_json(a.to_json());
  EXPECT_EQ(a.to_json(), b.to_json());
}

TEST(ModelConfigErrors, UnknownModelTypeListsTheSupported) {
  expect_field_error("model_type", "qwen2", {"ckpt/config.json", "model_type", "qwen2", "llama, mistral, gemma"});
  expect_field_error("model_type", json::value_t::discarded, {"model_type", "missing"});
}

TEST(ModelConfigErrors, MissingRequiredFields) {
  for (const char* f : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"})
    expect_field_error(f, json::value_t::discarded, {"ckpt/config.json", "missing required field", f});
}

TEST(ModelConfigErrors, WrongTypes) {
  expect_field_error("hidden_size", "64", {"hidden_size", "must be an integer", "\"64\""});
  expect_field_error("num_hidden_layers", 2.5, {"num_hidden_layers", "must be an integer", "2.5"});
  expect_field_error("rms_norm_eps", "small", {"rms_norm_eps", "must be a number"});
  expect_field_error("tie_word_embeddings", 1, {"tie_word_embeddings", "true or false"});
  expect_field_error("hidden_act", 3, {"hidden_act", "must be a string"});
  expect_field_error("eos_token_id", json::array({2, "x"}), {"eos_token_id", "list of integers"});
  expect_error([] { ModelConfig::from_json(json::array({1})); }, {"<json>", "JSON object"});
  expect_error([] { ModelConfig::from_json_string("{not json", "c.json"); }, {"c.json", "not valid JSON"});
}

TEST(ModelConfigErrors, NonPositiveSizes) {
  for (const char* f : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim"})
    expect_field_error(f, 0, {f, "positive", "got 0"});
  expect_field_error("rms_norm_eps", -1e-6, {"rms_norm_eps", "positive"});
}

TEST(ModelConfigErrors, HeadsMustDivide) {
  json j = llama_json();
  j.erase("head_dim");
  j["num_attention_heads"] = 6;
  j["num_key_value_heads"] = 6;
  expect_error([&] { ModelConfig::from_json(j); }, {"num_attention_heads (6)", "hidden_size (64)", "head_dim"});
  expect_field_error("num_key_value_heads", 3, {"num_key_value_heads (3)", "num_attention_heads (4)"});
  expect_field_error("head_dim", 15, {"head_dim (15)", "even"});
}

TEST(ModelConfigErrors, UnsupportedFeaturesAreNamed) {
  expect_field_error("rope_parameters", json{{"rope_type", "llama3"}, {"rope_theta", 5e5}},
                     {"rope_parameters.rope_type", "llama3", "default"});
  expect_field_error("rope_scaling", json{{"type", "linear"}, {"factor", 2.0}}, {"rope_scaling.type", "linear"});
  expect_field_error("hidden_act", "relu", {"hidden_act", "relu", "silu"});
  json m = llama_json();
  m["model_type"] = "mistral";
  m["sliding_window"] = 0;
  expect_error([&] { ModelConfig::from_json(m); }, {"sliding_window", "positive"});
}

TEST(ModelConfigErrors, Files) {
  EXPECT_THROW(ModelConfig::from_json_file("/nonexistent/config.json"), ModelFileNotFoundError);
  char path[] = "/tmp/mola_model_config_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  {
    std::ofstream(path) << R"({"model_type": "gpt2"})";
  }
  expect_error([&] { ModelConfig::from_json_file(path); }, {path, "gpt2"});
  std::remove(path);
}

// The decoder built from a config carries transformers' parameter names and
// shapes; a tied model has no lm_head.
TEST(ModelConfigDecoder, ParameterNamesAndShapesMatchHuggingFace) {
  const ModelConfig c = ModelConfig::from_json(llama_json());
  mola::models::CausalLM model(c);
  const auto params = model->named_parameters();
  EXPECT_EQ(params.size(), 1 + 2 * 9 + 1 + 1u);
  EXPECT_EQ(params["model.embed_tokens.weight"].sizes(), (std::vector<int64_t>{97, 64}));
  EXPECT_EQ(params["model.layers.1.self_attn.k_proj.weight"].sizes(), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(params["model.layers.0.mlp.down_proj.weight"].sizes(), (std::vector<int64_t>{64, 112}));
  EXPECT_TRUE(params.contains("model.layers.1.post_attention_layernorm.weight"));
  EXPECT_TRUE(params.contains("lm_head.weight"));

  const auto out = model->forward(at::randint(97, {2, 7}), std::nullopt, at::randint(97, {2, 7}));
  EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 7, 97}));
  EXPECT_TRUE(out.loss.defined());

  json g = llama_json();
  g["model_type"] = "gemma";
  g.erase("tie_word_embeddings");
  mola::models::CausalLM tied(ModelConfig::from_json(g));
  EXPECT_FALSE(tied->named_parameters().contains("lm_head.weight"));
}

}  // namespace
