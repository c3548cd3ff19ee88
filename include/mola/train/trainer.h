// mola/train/trainer.h: fine-tuning a CausalLM's adapter (docs/cpp.md, docs/recipes.md,
// 10). One Trainer owns one run in one output directory:
//
//   OUTPUT/metrics.jsonl             one JSON object per logged step and per
//                                    evaluation, appended (a resume appends)
//   OUTPUT/checkpoints/step-<N>/     adapter_config.json, adapter_model.safetensors,
//                                    optimizer.safetensors, rng_state.safetensors,
//                                    trainer_state.json
//
// The loop follows transformers' Trainer with the authors' settings: AdamW on
// the adapter parameters only (routers and experts, or one of the two by
// TrainOptions::trainable: fit() sets requires_grad on them), a warmup + decay schedule per optimizer step,
// gradient accumulation over micro-batches (each micro-batch's loss divided by
// the number of micro-batches in its batch), gradient clipping, fp32 on the
// CPU and bf16 autocast on CUDA. Where it differs, on purpose: a non-finite
// loss or gradient norm stops the run (NonFiniteLossError) instead of
// stepping, and a resumed run continues the interrupted one exactly (data
// order, dropout RNG, optimizer and schedule state).
//
// Distributed (docs/distributed.md): set_process_group joins a torch.distributed
// process group (Gloo on the CPU, NCCL on CUDA); N ranks then train as one
// process on the same global batch, each running its share of the batch's
// micro-batches (see set_process_group).
//
// The loop is in src/train/trainer.cpp, the checkpoint files in
// src/train/checkpoint.cpp, the progress bar and metrics file in
// src/train/progress.cpp.
#pragma once

#include <mola/data/batch.h>
#include <mola/data/dataset.h>
#include <mola/models/decoder.h>
#include <mola/train/options.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace mola::train {

// A NaN or infinite loss or gradient norm. The message names the step, the
// epoch, the value, the last good checkpoint and the likely causes.
class NonFiniteLossError : public std::runtime_error {
 public:
  NonFiniteLossError(const std::string& message, int64_t step, double value, std::string checkpoint)
      : std::runtime_error(message), step(step), value(value), checkpoint(std::move(checkpoint)) {}
  int64_t step;            // the optimizer step (1-based) whose loss was bad
  double value;            // the non-finite value
  std::string checkpoint;  // the last complete checkpoint, "" when none was saved
};

struct TrainResult {
  int64_t steps = 0;                // optimizer steps done, resumed ones included
  double train_loss = 0.0;          // the last step's language-model loss
  std::optional<double> eval_loss;  // the last validation loss (none without validation data)
  std::string checkpoint;           // the last checkpoint directory written
  int64_t tokens = 0;               // real (non-padding) tokens trained on
  double wall_s = 0.0;              // seconds of training, resumed ones included
  nlohmann::json to_json() const;
};

// The complete checkpoints in OUTPUT/checkpoints (directories step-<N> holding
// trainer_state.json), as {N, path}, oldest first. Temporaries and partial
// directories are left out.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir);

class Trainer {
 public:
  // Called every eval_every steps and at the end, with the model in eval mode
  // and no gradients; its JSON object is merged into that evaluation's metrics
  // line. Exceptions it throws end fit().
  using EvalCallback = std::function<nlohmann::json(int64_t step)>;

  // The model must have an adapter attached (or options.init_adapter set).
  // The options are validated here (ConfigError).
  Trainer(std::shared_ptr<models::CausalLMImpl> model, TrainOptions options, std::string output_dir);
  // The same for the module holder: mola::Trainer trainer(model, options).
  Trainer(const models::CausalLM& model, TrainOptions options, std::string output_dir = "out/run")
      : Trainer(model.ptr(), std::move(options), std::move(output_dir)) {}

  void set_eval_callback(EvalCallback callback) { on_eval_ = std::move(callback); }

  // Trains as one rank of `group` (null: alone, the default). Every rank must
  // construct its Trainer with the same model files, options and data and call
  // fit() (and evaluate()) together; then:
  //  - the adapter starts as rank 0's (broadcast at the start of fit);
  //  - each global batch is the one a single process would draw; rank r runs
  //    its micro-batches j with j % world_size == r, and the gradients are
  //    summed across the ranks before clipping and the AdamW step, so N ranks
  //    make the update one process makes on that batch (to float rounding);
  //  - the logged loss, aux loss and token counts are reduced the same way,
  //    and evaluate() splits its micro-batches and reduces the loss;
  //  - dropout draws depend on (seed, step, micro-batch) only, so they do not
  //    depend on the number of ranks (they differ from a run without a group);
  //  - only rank 0 writes metrics.jsonl, checkpoints and progress and runs the
  //    evaluation callback; the others wait at a barrier after each checkpoint.
  // A resume reads the checkpoint on every rank: output_dir must be on a file
  // system all ranks see. Collectives wait as long as the group's timeout.
  // In Python: torch.distributed.init_process_group(...), then
  // mola.Trainer(..., process_group=torch.distributed.group.WORLD).
  void set_process_group(c10::intrusive_ptr<c10d::ProcessGroup> group) { group_ = std::move(group); }
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const { return group_; }

  // Trains on `train` (input_ids and labels per example; labels -100 where no
  // loss is taken) and evaluates on `validation` (when not empty). Throws
  // std::invalid_argument for bad examples (empty, token ids outside the
  // vocabulary, labels of another length), ConfigError for options that do
  // not fit the data or the checkpoint, NonFiniteLossError (see above).
  TrainResult fit(const std::vector<data::Example>& train, const std::vector<data::Example>& validation = {});

  // The mean token loss over `examples` (each token whose label is not -100
  // counts once), in eval mode without gradients, in micro-batches.
  double evaluate(const std::vector<data::Example>& examples);

  const TrainOptions& options() const { return options_; }
  const std::string& output_dir() const { return output_dir_; }
  std::shared_ptr<models::CausalLMImpl> model() const { return model_; }

 private:
  std::shared_ptr<models::CausalLMImpl> model_;
  TrainOptions options_;
  std::string output_dir_;
  EvalCallback on_eval_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
};

}  // namespace mola::train
