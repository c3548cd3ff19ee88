// Training checkpoints (docs/design.md, The adapter files, 10), private to the trainer. A
// checkpoint is a directory OUTPUT/checkpoints/step-<N> holding
//   adapter_config.json, adapter_model.safetensors   the adapter (models::save_adapter)
//   optimizer.safetensors   "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step"
//                           per trainable parameter (AdamW's state, by name)
//   rng_state.safetensors   "cpu" (and "cuda" when training on CUDA): torch's
//                           default generators' states as uint8 tensors
//   trainer_state.json      TrainState, the options, the format version
// It is written into a temporary sibling directory and renamed to step-<N> as
// the last act, so a directory with that name is always complete. Only
// safetensors and JSON: loading a checkpoint never unpickles anything.
#pragma once

#include <mola/data/batch.h>
#include <mola/models/decoder.h>
#include <mola/train/options.h>

#include <torch/optim/adamw.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace mola::train::detail {

inline constexpr const char* kTrainerStateFile = "trainer_state.json";
inline constexpr const char* kOptimizerFile = "optimizer.safetensors";
inline constexpr const char* kRngFile = "rng_state.safetensors";

// What the loop needs, beyond the tensors, to continue a run.
struct TrainState {
  int64_t step = 0;                // optimizer steps done
  double epoch = 0.0;              // step / batches per epoch, as transformers logs it
  data::SamplerPosition sampler;   // the next batch
  int64_t total_steps = 0;         // the schedule's length when saved
  int64_t num_examples = 0;        // the training set's size (a resume must use the same data)
  int64_t tokens = 0;              // real tokens trained on so far
  double elapsed_s = 0.0;          // training seconds so far
  double train_loss = std::numeric_limits<double>::quiet_NaN();  // the last step's loss
  std::optional<double> eval_loss;  // the last evaluation's loss
};

// The trainable parameters, by their names in the model, in optimizer order.
struct Trainable {
  std::vector<std::string> names;
  std::vector<at::Tensor> params;
};

std::string checkpoints_dir(const std::string& output_dir);

// Writes OUTPUT/checkpoints/step-<state.step> (replacing one of that name) and
// returns its path. `device` is where the model trains (its CUDA generator is
// saved too when it is a CUDA device).
std::string save_checkpoint(const std::string& output_dir, const models::CausalLMImpl& model,
                            torch::optim::AdamW& optimizer, const Trainable& trainable, const TrainState& state,
                            const TrainOptions& options, const at::Device& device);

// Reads trainer_state.json; throws ConfigError naming the file when it is
// missing or malformed (not a complete checkpoint).
TrainState read_train_state(const std::string& checkpoint_dir);
// The options a checkpoint was made with.
TrainOptions read_checkpoint_options(const std::string& checkpoint_dir);

// Fills `optimizer`'s AdamW state from optimizer.safetensors. Every trainable
// parameter with saved state must be there with its shape; throws
// std::invalid_argument naming the key otherwise.
void load_optimizer_state(const std::string& checkpoint_dir, torch::optim::AdamW& optimizer,
                          const Trainable& trainable);

// Sets torch's default CPU generator (and `device`'s CUDA one, when saved and
// training on CUDA) to the saved state.
void restore_rng_state(const std::string& checkpoint_dir, const at::Device& device);

// Removes the oldest complete checkpoints until `limit` remain (0: keep all).
void prune_checkpoints(const std::string& output_dir, int64_t limit);

// Crash recovery, run by a resumed fit() before it continues:
// metrics.jsonl keeps only the lines of steps <= `step` (the checkpoint it
// continues from; 0 when there is none) and drops a partial last line, so
// after any number of crashes and resumes the file reads as one uninterrupted
// run. Rewritten through a temporary file and rename(); nothing to do when the
// file does not exist.
void trim_metrics(const std::string& path, int64_t step);
// Checkpoint temporaries left by a process that was killed (their pid is not
// alive): "step-<N>.tmp-<pid>" (an unfinished write) is removed;
// "step-<N>.old-<pid>" (a complete checkpoint moved aside while being
// replaced) is renamed back to step-<N> when that is missing, else removed.
void remove_stale_temporaries(const std::string& output_dir);

// A testing hook, for the crash-safety test (tests/python/train/test_crash_safety.py):
// when the environment variable MOLA_FAULT_INJECT is "kill:<point>:step=<N>"
// and the trainer reaches `point` ("step": after the first micro-batch's
// backward of step N; "checkpoint-write": inside the write of checkpoint N,
// after its adapter and optimizer files, before trainer_state.json and the
// rename), the process sends itself SIGKILL. Unset (always, outside tests):
// nothing happens. A malformed value throws std::invalid_argument naming it.
void fault_point(const char* point, int64_t step);

// POSIX file helpers. No <filesystem> in the trainer: the PyPI libtorch exports
// its own statically linked std::filesystem (pytorch/pytorch#133437), whose
// copies win symbol lookup, and remove_all crashes (as src/config.cpp notes).
std::string join_path(const std::string& dir, const std::string& name);
bool path_exists(const std::string& path);
// mkdir -p; throws std::runtime_error naming the directory and the reason.
void make_dirs(const std::string& path);
// rm -rf; nothing to do when `path` does not exist.
void remove_tree(const std::string& path);
// The names in directory `path` ("." and ".." left out), sorted; empty when it does not exist.
std::vector<std::string> list_dir(const std::string& path);

// A fresh run (options.resume false) must not write into a directory that
// holds another run's files (`outputs`, names in output_dir; a trailing '*'
// matches a prefix): without overwrite_output_dir it throws
// std::invalid_argument naming what is there and both fixes (`where`
// prefixes the message, `resume_key` / `overwrite_key` spell the settings as
// the caller's user writes them); with it, `remove` removes those files
// (a caller checks first with remove false and removes once its inputs are
// known to be good, so a bad input loses nothing).
void claim_output_dir(const std::string& output_dir, const TrainOptions& options,
                      const std::vector<std::string>& outputs, const std::string& where,
                      const std::string& resume_key, const std::string& overwrite_key, bool remove = true);

}  // namespace mola::train::detail
