// mola/train/run.h: what the `mola` command does with a recipe, as library
// functions, so that the C++ program (src/cli/main.cpp), `python -m mola` and
// mola.train(recipe, overrides) run the same code.
//   run_train     model + tokenizer + data from the recipe, attach the adapter,
//                 Trainer.fit, save the adapter, evaluate the test split
//                 before and after, the expert load per layer, summary.json
//   run_eval      accuracy of a model (with an adapter or without) on a split
//   run_generate  a completion of one prompt
//   run_command   the command line: subcommands, --set, exit statuses
#pragma once

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
// With a process group (design.md 11; `torchrun ... -m mola train`) every rank
// calls this: they train together (Trainer::set_process_group), rank 0 alone
// evaluates and writes the files and returns the summary; the other ranks
// return {recipe, output_dir, adapter, train, rank} once rank 0 is done.
nlohmann::json run_train(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group = {});

// The continual-learning metrics of the MoLA paper (methods.md, Tables 5
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

// One verb of the `mola` command: the table behind the usage text, each
// verb's --help, did-you-mean and the pointer to python -m mola for the verbs
// that live in the Python package (handler nullptr, python_only).
struct Verb {
  const char* name;      // "train", or "convert mola-authors" for a verb of two words
  const char* synopsis;  // its arguments, after the name
  const char* summary;   // one line
  const char* options;   // the option lines of its --help ("" when none)
  const char* example;   // a command line that works from the repository root
  int (*handler)(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group);
  bool python_only;
};
const std::vector<Verb>& verbs();
// `mola --help`, and `mola VERB --help` (std::invalid_argument for no such verb).
std::string usage();
std::string help(const std::string& verb);

// The `mola` command line (without the program name). Prints to stdout and
// stderr; returns the exit status: 0, 1 (the run failed), 2 (a user error:
// bad arguments, recipe, file; one line, no backtrace). `group`: the process
// group `mola train` joins (python -m mola passes torch.distributed's WORLD
// under torchrun); the other commands run in one process and refuse a group
// of more than one rank. Without a group, `mola train` under a launcher that
// set WORLD_SIZE > 1 is a user error that names python -m mola: this program
// does not create a group itself (the LibTorch wheel ships no Gloo headers).
// `mola VERB --help` prints the verb's usage, options and an example;
// `mola --version` the version, the LibTorch it was built against and
// whether its CUDA kernels are built in.
int run_command(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group = {});

}  // namespace mola::train
