// libFuzzer target: the recipe reader (Recipe::from_json and apply_override,
// mola/train/recipe.h) on arbitrary text. The input is a recipe JSON, then
// optionally a NUL byte and `--set` assignments separated by newlines.
// Invariants:
//   - only ConfigError (and the model config's std::invalid_argument, for a
//     model path that holds a bad config.json) escape, never a JSON library
//     exception or anything else;
//   - an accepted recipe has exactly one of model.path / model.config, a
//     non-empty output_dir, validated train options (validate() passes again),
//     and its adapter, train and eval sections round-trip through JSON.
// Run from an empty directory (the Makefile does) so relative paths in the
// inputs find nothing.
#include "mola/models/config.h"
#include "mola/train/recipe.h"

#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using mola::fuzz::check;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mola::train;
  const std::string input(reinterpret_cast<const char*>(data), size);
  const auto nul = input.find('\0');
  const std::string text = input.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string::npos) {
    std::string rest = input.substr(nul + 1), line;
    for (size_t i = 0; i <= rest.size(); ++i) {
      if (i == rest.size() || rest[i] == '\n') {
        overrides.push_back(line);
        line.clear();
      } else {
        line += rest[i];
      }
    }
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error&) {
    return 0;  // Recipe::from_file turns this into a ConfigError naming the file
  } catch (const nlohmann::json::out_of_range&) {
    return 0;  // a number past double's range (1e999): from_file's ConfigError too
  }
  Recipe r;
  try {
    for (const auto& o : overrides) apply_override(j, o);
    r = Recipe::from_json(j, "fuzz.json", "");
  } catch (const mola::ConfigError&) {
    return 0;
  } catch (const mola::models::ModelConfigError&) {
    return 0;
  }
  check(r.model.path.empty() != r.model.config.empty(), "exactly one of model.path and model.config");
  check(!r.output_dir.empty(), "output_dir is not empty");
  r.train.validate();
  check(TrainOptions::from_json(r.train.to_json()) == r.train, "train options round-trip");
  check(mola::AdapterConfig::from_json(r.adapter.to_json()) == r.adapter, "adapter round-trips");
  check(EvalOptions::from_json(r.eval.to_json()).to_json() == r.eval.to_json(), "eval options round-trip");
  return 0;
}
