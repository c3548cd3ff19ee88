// mola/train/run.h: what the `mola` command does with a recipe, as library
// functions, so that the C++ program (src/cli/main.cpp), `python -m mola` and
// mola.recipes.train(recipe, overrides) run the same code.
//   run_train     model + tokenizer + data from the recipe, attach the adapter,
//                 Trainer.fit, save the adapter, evaluate the test split
//                 before and after, the expert load per layer, summary.json
//   run_eval      accuracy of a model (with an adapter or without) on a split
//   run_generate  a completion of one prompt
// The command line over them is mola/cli.h (run_command).
#pragma once

#include <mola/cli.h>
#include <mola/data/dataset.h>
#include <mola/models/decoder.h>
#include <mola/train/recipe.h>

#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace mola::train {

// The recipe's base model: from_pretrained(model.path) or, with model.config,
// random weights (seeded) of that architecture; dtype, device and gradient
// checkpointing as the recipe says.
std::shared_ptr<models::CausalLMImpl> load_model(const Recipe& recipe);

// The template of data.template (alpaca.json by default; raw for "raw").
data::PromptTemplate load_template(const Recipe& recipe);

// Trains as the recipe says and writes into output_dir: recipe.json (after
// overrides), metrics.jsonl and checkpoints/ (the Trainer), adapter/ (the
// final adapter), eval.json (test split, before and after training, with the
// majority baseline), expert_load.json and summary.json (returned).
// With a process group (docs/distributed.md; `torchrun ... -m mola train`) every rank
// calls this: they train together (Trainer::set_process_group), rank 0 alone
// evaluates and writes the files and returns the summary; the other ranks
// return {recipe, output_dir, adapter, train, rank} once rank 0 is done.
nlohmann::json run_train(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group = {});

// The continual-learning metrics of the MoLA paper (docs/design.md, Fidelity to the papers and the authors' code, Tables 5
// and 6) from R[t][i], the accuracy on domain i after training through
// domain t (T x T): OP = mean_i R[T-1][i]; PD = 2 / (T (T-1)) *
// sum_{k=1..T-1} sum_{i<k} (R[k][i] - R[k-1][i]), the mean change on the
// earlier domains each new one brings (negative: forgetting).
struct ContinualMetrics {
  double op = 0.0, pd = 0.0;
};
ContinualMetrics continual_metrics(const std::vector<std::vector<double>>& accuracy);

// run_train for a recipe with data.domains: one stage per domain, in order,
// each a fresh optimiser over the same adapter (output_dir/stage-<t>-<domain>),
// then every domain's test rows evaluated; writes continual.json with the
// accuracy matrices and OP / PD (by generation and by log-likelihood, as the
// recipe's eval.methods), and returns it.
// With a process group, the stages train on every rank and rank 0 alone
// evaluates and writes, as run_train.
nlohmann::json run_continual(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group = {});

// Evaluates the recipe's model with `adapter_dir` loaded ("" = the base
// model) on `split` ("test", "validation" or a JSON Lines path); returns the
// evaluation JSON (also written to output_dir/eval-<split>.json when write).
nlohmann::json run_eval(const Recipe& recipe, const std::string& adapter_dir, const std::string& split,
                        bool write = true);

// The selection share of every expert of every adapted projection on
// `examples` (no grad, eval mode): per layer, the top-k choices counted over
// the non-padding tokens, summed over the layer's projections, as fractions.
// {"layers": [{"layer": i, "experts": E, "share": [...], "per_target": {...}}], "tokens": n}
// A pass longer than a few seconds reports its progress on `progress` (nullptr: silent).
nlohmann::json expert_load(models::CausalLMImpl& model, const std::vector<data::Example>& examples,
                           int64_t batch_size, std::FILE* progress = stderr);

// The command line itself (run_command, the verb table) is mola/cli.h; these
// names stay here for code written against them.
using cli::help;
using cli::run_command;
using cli::usage;
using cli::Verb;
using cli::verbs;

}  // namespace mola::train
