// libFuzzer target: the two config.json readers, the adapter's
// (AdapterConfig::from_json_string, ResolvedAdapter::from_json) and the
// model's (ModelConfig::from_json_string), on arbitrary text. Invariants:
//   - only the documented exception types escape (ConfigError for adapters,
//     std::invalid_argument, whose subclass ModelConfigError is, for models);
//   - an accepted adapter config round-trips: from_json(to_json()) == itself,
//     and when it resolves for a layer count, every layer has 1 <= top_k <= experts
//     and rank >= 1, and the resolved JSON reads back to the same lists;
//   - an accepted model config round-trips through its own to_json().
#include "mola/config.h"
#include "mola/models/config.h"

#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

using mola::fuzz::check;

void adapter(const std::string& text, int64_t layers) {
  mola::AdapterConfig c;
  try {
    c = mola::AdapterConfig::from_json_string(text);
  } catch (const mola::ConfigError&) {
    return;
  }
  check(mola::AdapterConfig::from_json(c.to_json()) == c, "adapter config round-trips through JSON");
  mola::ResolvedAdapter r;
  try {
    r = c.resolve(layers);
  } catch (const mola::ConfigError&) {
    return;
  }
  check(static_cast<int64_t>(r.experts.size()) == layers && r.top_k.size() == r.experts.size() &&
            r.rank.size() == r.experts.size() && r.scaling.size() == r.experts.size(),
        "one value per layer");
  for (int64_t l = 0; l < layers; ++l)
    check(r.top_k[l] >= 1 && r.top_k[l] <= r.experts[l] && r.rank[l] >= 1, "1 <= top_k <= experts, rank >= 1");
  const mola::ResolvedAdapter back = mola::ResolvedAdapter::from_json(r.to_json());
  check(back.experts == r.experts && back.top_k == r.top_k && back.rank == r.rank && back.targets == r.targets,
        "resolved adapter round-trips through JSON");
}

void model(const std::string& text) {
  mola::models::ModelConfig m;
  try {
    m = mola::models::ModelConfig::from_json_string(text, "fuzz/config.json");
  } catch (const std::invalid_argument&) {
    return;
  }
  check(m.num_hidden_layers >= 1 && m.hidden_size >= 1 && m.vocab_size >= 1, "positive sizes");
  const auto again = mola::models::ModelConfig::from_json(m.to_json(), "round-trip");
  check(again.to_json() == m.to_json(), "model config round-trips through JSON");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int64_t layers = 1 + data[0] % 40;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  adapter(text, layers);
  model(text);
  return 0;
}
