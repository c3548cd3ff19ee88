// mola/train/eval_options.h: the "eval" section of a recipe (docs/recipes.md)
// and its strict JSON form. Split from evaluate.h so that it needs no torch
// header: the recipe reader (and its fuzz target, tests/fuzz) parses it
// without compiling the model.
#pragma once

#include <mola/config.h>

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola::train {

// The "eval" section of a recipe. JSON keys equal the field names.
struct EvalOptions {
  int64_t batch_size = 8;        // rows per generation batch, sequences per scoring batch (docs/design.md, Fidelity to the papers and the authors' code)
  int64_t max_new_tokens = 128;  // generation length, as the authors'
  int64_t max_examples = 0;      // the first N rows only; 0: all
  std::vector<std::string> methods = {"generate", "loglik"};  // a non-empty subset of method_names()

  // Missing keys keep their defaults; an unknown key or a bad value throws
  // ConfigError naming the key (and the nearest valid one), the value and the
  // fix. The result is validated.
  static EvalOptions from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  // Throws ConfigError for the first bad value.
  void validate() const;
  bool uses(const std::string& method) const;

  static const std::vector<std::string>& keys();          // the JSON keys, in field order
  static const std::vector<std::string>& method_names();  // generate, loglik
};

}  // namespace mola::train
