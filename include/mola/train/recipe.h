// mola/train/recipe.h: a recipe, the one JSON file that says everything about
// a run (docs/recipes.md): the base model, its tokenizer, the adapter, the data,
// the training and evaluation settings and where the outputs go. The `mola`
// command, `python -m mola` and `mola.recipes.train(recipe, overrides)` all read
// recipes through Recipe::from_file, so they accept and refuse the same files.
//
//   {"comment": "mola train configs/recipes/tiny/scienceqa-2468.json",
//    "model": {"path": "data/models/stories260K", "dtype": "float32", "device": "cpu"},
//    "tokenizer": "data/models/stories260K/tokenizer.model",
//    "adapter": {...AdapterConfig...},
//    "data": {"train": "...jsonl", "validation": "...", "test": "...", "template": "alpaca", ...},
//    "train": {...TrainOptions...}, "eval": {...EvalOptions...},
//    "output_dir": "out/tiny-scienceqa-2468"}
//
// Every section is strict: an unknown key is a ConfigError naming the key and
// the nearest valid one. Relative paths are taken from the working directory
// and, when nothing is there, from the recipe file's folder and its parents
// (so a bundled recipe finds data/ from anywhere inside the repository).
#pragma once

#include <mola/config.h>
#include <mola/data/dataset.h>
#include <mola/train/eval_options.h>
#include <mola/train/options.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace mola::train {

// The base model: a checkpoint directory (config.json + safetensors), or an
// architecture file (configs/models/*.json) for a randomly initialised model.
struct ModelSection {
  std::string path;    // checkpoint directory
  std::string config;  // architecture only (random weights, seeded by seed)
  std::string dtype = "float32";  // float32 | bfloat16 | float16
  std::string device = "cpu";     // cpu | cuda | cuda:N
  std::string quantize = "none";  // none | nf4 | int8: the projection weights held quantized (path only)
  bool gradient_checkpointing = false;
  int64_t seed = 0;  // random initialisation (config) only

  static const std::vector<std::string>& keys();
};

// The data files and how rows become training examples (docs/recipes.md).
struct DataSection {
  std::string train;       // JSON Lines (required for `mola train`)
  std::string validation;  // optional: validation loss and accuracy during training
  std::string test;        // optional: evaluated after training
  std::string task = "auto";        // data::load_rows' task
  std::string template_name = "alpaca";  // "alpaca", "raw" or a template file (JSON key "template")
  data::DataOptions options;        // cutoff_len, train_on_inputs, add_eos_token
  int64_t max_train_examples = 0;   // 0 = all
  // Continual learning (docs/recipes.md): train on the rows of each domain in
  // turn, the value of domain_field in the data files, and evaluate every
  // domain after each stage (run_continual). Empty: one ordinary run.
  std::vector<std::string> domains;
  std::string domain_field = "topic";

  static const std::vector<std::string>& keys();
};

struct Recipe {
  std::string source;      // the recipe file, or "<json>"
  nlohmann::json json;     // the recipe after overrides, as written
  std::string comment;
  ModelSection model;
  std::string tokenizer;   // SentencePiece model; default: <model.path>/tokenizer.model
  AdapterConfig adapter;
  DataSection data;
  TrainOptions train;
  EvalOptions eval;
  bool eval_before_training = false;  // eval.before_training: the test split before training too
  // eval.expert_load_examples: rows the expert-load pass after training
  // routes (the validation split, else the training rows); 0: all of them.
  int64_t expert_load_examples = 256;
  std::string output_dir = "out/run";

  // Parses and validates every section. base_dir: where relative paths are
  // looked up when they are not found from the working directory ("" = only
  // the working directory). Throws ConfigError naming the key.
  static Recipe from_json(const nlohmann::json& j, const std::string& source = "<json>",
                          const std::string& base_dir = "");
  // Reads a recipe file, applies `overrides` ("train.lr=1e-4", see
  // apply_override) in order, then parses it. A missing file or malformed
  // JSON is a ConfigError naming the file (and the line).
  static Recipe from_file(const std::string& path, const std::vector<std::string>& overrides = {});

  // The top-level keys.
  static const std::vector<std::string>& keys();

  // `p` as an existing path when it can be found (see the file comment),
  // else `p` unchanged (the caller's open reports it).
  std::string resolve_path(const std::string& p) const;
  // The template file for data.template ("alpaca" is data/templates/alpaca.json).
  std::string template_path() const;
  std::string tokenizer_path() const;

  std::string base_dir;
};

// Applies "a.b.c=value" to a recipe JSON. The value keeps the type of the
// value it replaces when that is a string ("adapter.experts=2468" stays the
// preset "2468"); otherwise it is read as JSON when it parses (1e-4, true,
// [2,4], "text") and as a string when it does not. The path must name a known
// section; the keys inside are checked when the recipe is parsed. Throws
// ConfigError naming the assignment.
void apply_override(nlohmann::json& recipe, const std::string& assignment);

}  // namespace mola::train
