// mola/models/config.h: ModelConfig, the architecture of a base model as read
// from a Hugging Face checkpoint's config.json, for the three families the
// decoder implements (docs/design.md, Models and loading): llama, mistral, gemma.
//
// No torch header here or in src/models/config.cpp, like mola/config.h: the
// command and the recipe loader read model configs too, and the parse rules
// (defaults per family, every error naming the file and the field) are plain
// JSON work. The decoder that consumes a ModelConfig lives in decoder.h.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola::models {

// Every user error in a model config: unknown model_type, a missing or
// mistyped field, sizes that do not fit together. Derived from
// std::invalid_argument so that pybind11 raises it as ValueError. The message
// starts with the source (the file's path, or "<json>").
class ModelConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A checkpoint directory without config.json or without weights. Separate
// from ModelConfigError so that Python can raise FileNotFoundError for it.
class ModelFileNotFoundError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class ModelFamily { kLlama, kMistral, kGemma };

// The MLP's gate activation. Gemma's "gelu" means the tanh approximation
// (transformers maps the legacy value so; GemmaConfig), elsewhere exact GELU.
enum class Activation { kSiLU, kGELU, kGELUTanh };

struct ModelConfig {
  std::string model_type;  // "llama" | "mistral" | "gemma"
  ModelFamily family = ModelFamily::kLlama;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // default: num_attention_heads (no GQA)
  int64_t head_dim = 0;             // default: hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;

  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;  // top-level or rope_parameters.rope_theta (transformers 5)
  // Mistral only: a token sees at most this many positions, itself included.
  std::optional<int64_t> sliding_window;

  std::string hidden_act;  // as written: "silu", "gelu", "gelu_pytorch_tanh"
  Activation activation = Activation::kSiLU;
  bool tie_word_embeddings = false;  // gemma: true by default
  // What sets a family apart, filled in by the reader from model_type so the
  // decoder asks these, never the family (a new family touches the reader
  // and its tests only). Not config.json keys: to_json leaves them out.
  bool scale_embeddings = false;  // gemma: embeddings times sqrt(hidden_size), rounded to the dtype
  bool norm_unit_offset = false;  // gemma: RMSNorm scales by (1 + weight), not weight
  bool attention_bias = false;       // bias on q/k/v/o_proj
  bool mlp_bias = false;             // bias on gate/up/down_proj (llama)

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // config.json allows an int or a list
  std::optional<int64_t> pad_token_id;

  // Where this config came from, for messages: a path or "<json>".
  std::string source = "<json>";

  // Parses and validates; throws ModelConfigError naming `source` and the field.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source = "<json>");
  static ModelConfig from_json_string(const std::string& text, const std::string& source = "<json>");
  // Throws ModelFileNotFoundError when `path` does not exist.
  static ModelConfig from_json_file(const std::string& path);

  // Every field, defaults filled in, under transformers' key names; from_json
  // of the result gives back an equal config.
  nlohmann::json to_json() const;

  // The families this parser accepts, for messages and the bindings.
  static const std::vector<std::string>& supported_model_types();
};

}  // namespace mola::models
