// mola/train/options.h: the "train" section of a recipe (docs/recipes.md) as a
// struct, its strict JSON form, and the learning-rate schedules.
//
// Defaults follow the authors' scripts (docs/design.md, Fidelity to the papers and the authors' code): batch 128 = micro 8 x
// 16 accumulation steps, lr 3e-4, 100 warmup steps then linear decay, AdamW
// with transformers' defaults (weight decay 0, betas 0.9/0.999, eps 1e-8),
// gradients clipped at 1.0, a checkpoint every 200 steps.
//
// Like config.h this header needs no torch, so the command and the recipe
// loader parse options cheaply.
#pragma once

#include <mola/config.h>

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola::train {

struct TrainOptions {
  int64_t epochs = 3;
  int64_t max_steps = -1;        // optimizer steps; -1: epochs * ceil(N / batch_size)
  int64_t batch_size = 128;      // examples per optimizer step
  int64_t micro_batch_size = 8;  // examples per forward; must divide batch_size
  double lr = 3e-4;
  int64_t warmup_steps = 100;
  std::string schedule = "linear";  // one of schedules()
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;  // 0: no clipping (the norm is still logged)
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  int64_t seed = 0;             // torch's generator (dropout) and the data order
  bool group_by_length = false;  // transformers' LengthGroupedSampler
  int64_t log_every = 1;        // steps between metrics lines
  int64_t eval_every = 200;     // steps between evaluations (and one at the end); 0: never
  int64_t save_every = 200;     // steps between checkpoints; 0: only at the end
  int64_t save_total_limit = 3;  // checkpoints kept, oldest removed first; 0: all
  // false: a fresh run; true: continue from the newest complete checkpoint in
  // OUTPUT/checkpoints (a fresh run when there is none); a string: continue
  // from that checkpoint directory.
  std::variant<bool, std::string> resume = false;
  // A fresh run (resume false) refuses an output directory that holds a run
  // already (its metrics.jsonl would mix two runs); true removes that run's
  // files first (transformers' TrainingArguments.overwrite_output_dir).
  bool overwrite_output_dir = false;
  std::string init_adapter;  // "" or an adapter directory to start from (docs/recipes.md)
  // What trains (docs/recipes.md), one of trainables(): "all" (routers and
  // experts, the papers'), "experts" (A and B; routers frozen, the authors'
  // unused mark_only_lora_B_as_trainable) or "routers" (experts frozen). The
  // Trainer sets requires_grad on the adapter accordingly; the base is always
  // frozen. A fresh Kaiming or Gaussian adapter has B = 0, so its routers get
  // no gradient from the language-model loss: "routers" is for an adapter
  // whose experts already learned (init_adapter), or through aux_loss_coef.
  // MoLEx's layer gates count as routers.
  std::string trainable = "all";

  // Missing keys keep their defaults. Unknown keys and bad values throw
  // ConfigError naming the key, the value and the fix. The result is validated.
  static TrainOptions from_json(const nlohmann::json& j);
  // Every key, so from_json(to_json()) gives the same options.
  nlohmann::json to_json() const;
  // Throws ConfigError for the first bad value.
  void validate() const;

  static const std::vector<std::string>& keys();       // the JSON keys, in field order
  static const std::vector<std::string>& schedules();  // linear, cosine, constant
  static const std::vector<std::string>& trainables();  // all, experts, routers
};

bool operator==(const TrainOptions& a, const TrainOptions& b);
inline bool operator!=(const TrainOptions& a, const TrainOptions& b) { return !(a == b); }

inline void to_json(nlohmann::json& j, const TrainOptions& o) { j = o.to_json(); }
inline void from_json(const nlohmann::json& j, TrainOptions& o) { o = TrainOptions::from_json(j); }

// The learning-rate multiplier after `step` optimizer steps (so the first step
// uses step 0), as transformers' LambdaLR schedules (optimization.py):
//   warmup (step < warmup_steps): step / max(1, warmup_steps)
//   linear    max(0, (total - step) / max(1, total - warmup))
//   cosine    max(0, 0.5 * (1 + cos(pi * (step - warmup) / max(1, total - warmup))))
//   constant  1
// get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup (one half
// cycle) and get_constant_schedule_with_warmup. Throws ConfigError for an
// unknown schedule.
double lr_multiplier(const std::string& schedule, int64_t step, int64_t warmup_steps, int64_t total_steps);

}  // namespace mola::train
