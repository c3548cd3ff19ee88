// The tiny random llama the C++ model tests share: 4 layers (so a 4-group
// preset puts one group on each), hidden 32, 4 query and 2 KV heads, vocab 61.
#pragma once

#include <mola/models/config.h>
#include <mola/models/decoder.h>

#include <nlohmann/json.hpp>

#include <cstdint>

namespace mola::testing {

// Its config.json.
inline nlohmann::json tiny_llama_json() {
  return nlohmann::json::parse(R"({
    "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "tie_word_embeddings": false})");
}

inline models::ModelConfig tiny_llama() { return models::ModelConfig::from_json(tiny_llama_json()); }

// tiny_llama() with weights drawn after torch::manual_seed(seed), in eval mode.
inline models::CausalLM tiny_model(uint64_t seed = 0) {
  torch::manual_seed(seed);
  models::CausalLM m(tiny_llama());
  m->eval();
  return m;
}

}  // namespace mola::testing
