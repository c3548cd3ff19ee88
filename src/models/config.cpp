// ModelConfig: parsing a checkpoint's config.json with transformers' defaults
// per family (LlamaConfig, MistralConfig, GemmaConfig) and checks that the
// sizes fit together. Every error names the source file, the field, what it
// got and what it must be, because a bad config otherwise surfaces much later
// as a shape error deep in the decoder.
#include "mola/models/config.h"

#include "detail/text.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

// No <filesystem>: the PyPI libtorch exports broken std::filesystem symbols
// (pytorch/pytorch#133437); stat() is enough here.

namespace mola::models {
namespace {

using nlohmann::json;

using mola::detail::cat;

// Reads fields of one config object; every message starts with the source.
class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& msg) const { throw ModelConfigError(cat(source_, ": ", msg)); }

  // A present, non-null field.
  bool has(const char* field) const { return j_.contains(field) && !j_.at(field).is_null(); }

  int64_t integer(const char* field, std::optional<int64_t> fallback = std::nullopt) const {
    if (!has(field)) {
      if (fallback) return *fallback;
      fail(cat("missing required field \"", field, "\" (an integer); the checkpoint's config.json must set it"));
    }
    const json& v = j_.at(field);
    if (!v.is_number_integer())
      fail(cat("field \"", field, "\" must be an integer, got ", v.dump()));
    return v.get<int64_t>();
  }

  int64_t positive(const char* field, std::optional<int64_t> fallback = std::nullopt) const {
    const int64_t v = integer(field, fallback);
    if (v <= 0) fail(cat("field \"", field, "\" must be a positive integer, got ", v));
    return v;
  }

  std::optional<int64_t> optional_integer(const char* field) const {
    if (!has(field)) return std::nullopt;
    return integer(field);
  }

  double number(const json& v, const std::string& field, double fallback) const {
    if (v.is_null()) return fallback;
    if (!v.is_number()) fail(cat("field \"", field, "\" must be a number, got ", v.dump()));
    return v.get<double>();
  }
  double number(const char* field, double fallback) const {
    return has(field) ? number(j_.at(field), field, fallback) : fallback;
  }

  bool boolean(const char* field, bool fallback) const {
    if (!has(field)) return fallback;
    const json& v = j_.at(field);
    if (!v.is_boolean()) fail(cat("field \"", field, "\" must be true or false, got ", v.dump()));
    return v.get<bool>();
  }

  std::string string(const char* field, const std::string& fallback) const {
    if (!has(field)) return fallback;
    const json& v = j_.at(field);
    if (!v.is_string()) fail(cat("field \"", field, "\" must be a string, got ", v.dump()));
    return v.get<std::string>();
  }

  const json& at(const char* field) const { return j_.at(field); }

 private:
  const json& j_;
  std::string source_;
};

ModelFamily family_of(const Reader& r, const std::string& model_type) {
  if (model_type == "llama") return ModelFamily::kLlama;
  if (model_type == "mistral") return ModelFamily::kMistral;
  if (model_type == "gemma") return ModelFamily::kGemma;
  std::string names;
  for (const auto& n : ModelConfig::supported_model_types()) names += (names.empty() ? "" : ", ") + n;
  r.fail(cat("unknown model_type \"", model_type, "\"; supported: ", names,
             " (gemma2, qwen2 and others need their own decoder variant)"));
}

// rope_theta lives at the top level (transformers 4) or inside
// rope_parameters (transformers 5). Only the plain rotary embedding is
// implemented; a scaled one (linear, dynamic, llama3, yarn) would silently
// give other logits, so it is an error.
double read_rope_theta(const Reader& r) {
  double theta = r.number("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!r.has(key)) continue;
    const json& p = r.at(key);
    if (!p.is_object()) r.fail(cat("field \"", key, "\" must be an object, got ", p.dump()));
    for (const char* type_key : {"rope_type", "type"}) {
      if (p.contains(type_key) && !p.at(type_key).is_null() && p.at(type_key) != "default")
        r.fail(cat("field \"", key, ".", type_key, "\" is ", p.at(type_key).dump(),
                   "; only the default rotary embedding is implemented (remove the scaling or use a model without it)"));
    }
    if (p.contains("rope_theta")) theta = r.number(p.at("rope_theta"), cat(key, ".rope_theta"), theta);
  }
  if (!(theta > 0.0) || !std::isfinite(theta)) r.fail(cat("field \"rope_theta\" must be positive, got ", theta));
  return theta;
}

Activation activation_of(const Reader& r, const std::string& name, const char* field, ModelFamily family) {
  if (name == "silu" || name == "swish") return Activation::kSiLU;
  if (name == "gelu_pytorch_tanh") return Activation::kGELUTanh;
  // Gemma's released configs say "gelu" but were trained with the tanh
  // approximation; transformers' GemmaConfig maps it the same way.
  if (name == "gelu") return family == ModelFamily::kGemma ? Activation::kGELUTanh : Activation::kGELU;
  r.fail(cat("field \"", field, "\" is \"", name, "\"; supported: silu, gelu, gelu_pytorch_tanh"));
}

}  // namespace

const std::vector<std::string>& ModelConfig::supported_model_types() {
  static const std::vector<std::string> names = {"llama", "mistral", "gemma"};
  return names;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw ModelConfigError(cat(source, ": a model config must be a JSON object, got ", j.dump()));
  const Reader r(j, source);
  ModelConfig c;
  c.source = source;
  if (!r.has("model_type")) {
    r.fail("missing required field \"model_type\"; supported: llama, mistral, gemma");
  }
  c.model_type = r.string("model_type", "");
  c.family = family_of(r, c.model_type);
  const bool gemma = c.family == ModelFamily::kGemma;

  c.vocab_size = r.positive("vocab_size");
  c.hidden_size = r.positive("hidden_size");
  c.intermediate_size = r.positive("intermediate_size");
  c.num_hidden_layers = r.positive("num_hidden_layers");
  c.num_attention_heads = r.positive("num_attention_heads");
  c.num_key_value_heads = r.positive("num_key_value_heads", c.num_attention_heads);
  if (r.has("head_dim")) {
    c.head_dim = r.positive("head_dim");
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      r.fail(cat("num_attention_heads (", c.num_attention_heads, ") must divide hidden_size (", c.hidden_size,
                 ") when head_dim is absent; set head_dim or fix the head count"));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail(cat("num_key_value_heads (", c.num_key_value_heads, ") must divide num_attention_heads (",
               c.num_attention_heads, "): each key/value head serves a whole group of query heads"));
  if (c.head_dim % 2 != 0)
    r.fail(cat("head_dim (", c.head_dim, ") must be even: the rotary embedding rotates pairs of halves"));
  // transformers' defaults per family.
  const int64_t default_positions = gemma ? 8192 : c.family == ModelFamily::kMistral ? 4096 * 32 : 2048;
  c.max_position_embeddings = r.positive("max_position_embeddings", default_positions);

  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0.0)) r.fail(cat("field \"rms_norm_eps\" must be positive, got ", c.rms_norm_eps));
  c.rope_theta = read_rope_theta(r);

  if (c.family == ModelFamily::kMistral && r.has("sliding_window")) c.sliding_window = r.positive("sliding_window");
  if (gemma && r.boolean("use_bidirectional_attention", false))
    r.fail("field \"use_bidirectional_attention\" is true; only causal decoding is implemented");

  // Gemma checkpoints may carry both keys; hidden_activation is the one its
  // modelling code read, so it wins when set.
  const char* act_field = gemma && r.has("hidden_activation") ? "hidden_activation" : "hidden_act";
  c.hidden_act = r.string(act_field, gemma ? "gelu_pytorch_tanh" : "silu");
  c.activation = activation_of(r, c.hidden_act, act_field, c.family);

  c.tie_word_embeddings = r.boolean("tie_word_embeddings", gemma);
  c.scale_embeddings = gemma;
  c.norm_unit_offset = gemma;
  c.attention_bias = r.boolean("attention_bias", false);
  c.mlp_bias = r.boolean("mlp_bias", false);

  c.bos_token_id = r.optional_integer("bos_token_id");
  c.pad_token_id = r.optional_integer("pad_token_id");
  if (r.has("eos_token_id")) {
    const json& e = r.at("eos_token_id");
    if (e.is_array()) {
      for (const auto& id : e) {
        if (!id.is_number_integer())
          r.fail(cat("field \"eos_token_id\" must be an integer or a list of integers, got ", e.dump()));
        c.eos_token_ids.push_back(id.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(r.integer("eos_token_id"));
    }
  }
  return c;
}

ModelConfig ModelConfig::from_json_string(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw ModelConfigError(cat(source, ": not valid JSON (", e.what(), ")"));
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    throw ModelConfigError(cat(source, ": a number out of range (", e.what(), "); write it within +-1.7e308"));
  }
  return from_json(j, source);
}

ModelConfig ModelConfig::from_json_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw ModelFileNotFoundError(cat(path, ": no such file; a Hugging Face checkpoint directory holds config.json "
                                           "beside its model.safetensors"));
  std::ifstream in(path);
  if (!in) throw ModelConfigError(cat(path, ": cannot be read (check its permissions)"));
  std::ostringstream text;
  text << in.rdbuf();
  return from_json_string(text.str(), path);
}

json ModelConfig::to_json() const {
  json j = {
      {"model_type", model_type},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"hidden_act", hidden_act},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"mlp_bias", mlp_bias},
  };
  j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  j["pad_token_id"] = pad_token_id ? json(*pad_token_id) : json(nullptr);
  if (eos_token_ids.empty()) j["eos_token_id"] = nullptr;
  else if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  else j["eos_token_id"] = eos_token_ids;
  return j;
}

}  // namespace mola::models
