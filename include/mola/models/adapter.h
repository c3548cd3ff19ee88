// mola/models/adapter.h: a CausalLM's adapter on disk (docs/design.md, The adapter files), the two
// files any mola adapter is, whichever path (C++ model or mola.inject on a
// transformers model) trained it:
//   adapter_config.json        the ResolvedAdapter (method, per-layer experts,
//                              top_k, rank, scaling, alpha, dropout, targets,
//                              base_model_name)
//   adapter_model.safetensors  model.layers.{i}.{self_attn|mlp}.{target}.mola.router [E, in],
//                              .mola.lora_a [E, r, in], .mola.lora_b [E, out, r],
//                              in the parameters' dtype; MoLEx adds per layer t
//                              model.layers.{t}.molex.gate.weight [L, hidden],
//                              .molex.gate.bias [L] and, when learned, .molex.alpha [1]
// Attaching and the balance loss are CausalLM members (decoder.h); both live
// in src/models/adapter.cpp.
#pragma once

#include <mola/models/decoder.h>

#include <map>
#include <string>

namespace mola::models {

inline constexpr const char* kAdapterConfigFile = "adapter_config.json";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

// The adapter parameters by file key (the tensors themselves, not copies);
// empty without an adapter.
std::map<std::string, at::Tensor> adapter_state_dict(const CausalLMImpl& model);

// Writes both files into `dir`, created with its parents when missing; each
// file is written under a temporary name and renamed, so a crash never leaves
// half a file. Throws std::logic_error without an adapter, std::runtime_error
// when the directory cannot be made or written.
void save_adapter(const CausalLMImpl& model, const std::string& dir);

// Reads both files from `dir` and loads them into `model`, attaching the
// adapter first when the model has none. `dir` is an adapter directory, or a
// directory whose "mola_adapter" folder is one (a whole-model save of an
// injected transformers model, a Trainer checkpoint). As PEFT's
// from_pretrained: by default the adapter is for inference, frozen
// (requires_grad false) and the model put in eval mode; is_trainable leaves
// the mode alone and makes the adapter trainable. Every check runs before
// anything changes: ModelFileNotFoundError for a missing file; ConfigError
// for a bad config, another layer count or, when an adapter is attached
// already, another per-layer experts / top_k / rank (naming the layer and
// both values) or other targets; std::invalid_argument for missing,
// unexpected or misshapen tensors (naming the key and both shapes).
void load_adapter(CausalLMImpl& model, const std::string& dir, bool is_trainable = false);

}  // namespace mola::models

namespace mola {
// As the C++ API is spelled in docs/cpp.md: mola::save_adapter(*model, "out/").
using models::load_adapter;
using models::save_adapter;
}  // namespace mola
