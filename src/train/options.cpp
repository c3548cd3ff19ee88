// TrainOptions (mola/train/options.h): strict JSON in and out, validation, and
// the learning-rate schedules. No torch here, like src/config.cpp.
#include <mola/train/options.h>

#include "detail/json_fields.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace mola::train {

namespace {

const mola::detail::JsonFields fields("train options: ");

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  fields.fail(parts...);
}

using mola::detail::join;

}  // namespace

const std::vector<std::string>& TrainOptions::keys() {
  static const std::vector<std::string> k{
      "epochs",       "max_steps",     "batch_size",      "micro_batch_size", "lr",         "warmup_steps",
      "schedule",     "weight_decay",  "max_grad_norm",   "adam_beta1",       "adam_beta2", "adam_epsilon",
      "seed",         "group_by_length", "log_every",     "eval_every",       "save_every", "save_total_limit",
      "resume",       "overwrite_output_dir", "init_adapter", "trainable"};
  return k;
}

const std::vector<std::string>& TrainOptions::trainables() {
  static const std::vector<std::string> t{"all", "experts", "routers"};
  return t;
}

const std::vector<std::string>& TrainOptions::schedules() {
  static const std::vector<std::string> s{"linear", "cosine", "constant"};
  return s;
}

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
  if (!j.is_object()) fail("expected a JSON object of settings; got ", j.dump());
  TrainOptions o;
  for (const auto& [key, v] : j.items()) {
    if (key == "epochs") o.epochs = fields.integer(v, key);
    else if (key == "max_steps") o.max_steps = fields.integer(v, key);
    else if (key == "batch_size") o.batch_size = fields.integer(v, key);
    else if (key == "micro_batch_size") o.micro_batch_size = fields.integer(v, key);
    else if (key == "lr") o.lr = fields.number(v, key);
    else if (key == "warmup_steps") o.warmup_steps = fields.integer(v, key);
    else if (key == "schedule") o.schedule = fields.string(v, key);
    else if (key == "weight_decay") o.weight_decay = fields.number(v, key);
    else if (key == "max_grad_norm") o.max_grad_norm = fields.number(v, key);
    else if (key == "adam_beta1") o.adam_beta1 = fields.number(v, key);
    else if (key == "adam_beta2") o.adam_beta2 = fields.number(v, key);
    else if (key == "adam_epsilon") o.adam_epsilon = fields.number(v, key);
    else if (key == "seed") o.seed = fields.integer(v, key);
    else if (key == "group_by_length") o.group_by_length = fields.boolean(v, key);
    else if (key == "log_every") o.log_every = fields.integer(v, key);
    else if (key == "eval_every") o.eval_every = fields.integer(v, key);
    else if (key == "save_every") o.save_every = fields.integer(v, key);
    else if (key == "save_total_limit") o.save_total_limit = fields.integer(v, key);
    else if (key == "resume") {
      if (v.is_boolean()) o.resume = v.get<bool>();
      else if (v.is_string()) o.resume = v.get<std::string>();
      else fail("resume must be false, true or the path of a checkpoint directory; got ", v.dump());
    } else if (key == "overwrite_output_dir") o.overwrite_output_dir = fields.boolean(v, key);
    else if (key == "init_adapter") o.init_adapter = fields.string(v, key);
    else if (key == "trainable") o.trainable = fields.string(v, key);
    else
      fail("unknown key \"", key, "\"; did you mean \"", mola::detail::nearest_name(key, keys()), "\"? (valid keys: ",
           join(keys()), ")");
  }
  o.validate();
  return o;
}

nlohmann::json TrainOptions::to_json() const {
  nlohmann::json j;
  j["epochs"] = epochs;
  j["max_steps"] = max_steps;
  j["batch_size"] = batch_size;
  j["micro_batch_size"] = micro_batch_size;
  j["lr"] = lr;
  j["warmup_steps"] = warmup_steps;
  j["schedule"] = schedule;
  j["weight_decay"] = weight_decay;
  j["max_grad_norm"] = max_grad_norm;
  j["adam_beta1"] = adam_beta1;
  j["adam_beta2"] = adam_beta2;
  j["adam_epsilon"] = adam_epsilon;
  j["seed"] = seed;
  j["group_by_length"] = group_by_length;
  j["log_every"] = log_every;
  j["eval_every"] = eval_every;
  j["save_every"] = save_every;
  j["save_total_limit"] = save_total_limit;
  if (std::holds_alternative<bool>(resume)) j["resume"] = std::get<bool>(resume);
  else j["resume"] = std::get<std::string>(resume);
  j["overwrite_output_dir"] = overwrite_output_dir;
  j["init_adapter"] = init_adapter;
  j["trainable"] = trainable;
  return j;
}

void TrainOptions::validate() const {
  if (epochs < 1) fail("epochs is ", epochs, "; it must be >= 1 (use max_steps for a run shorter than an epoch)");
  if (max_steps == 0 || max_steps < -1)
    fail("max_steps is ", max_steps, "; it must be -1 (steps from epochs) or >= 1");
  if (batch_size < 1) fail("batch_size is ", batch_size, "; it must be >= 1");
  if (micro_batch_size < 1) fail("micro_batch_size is ", micro_batch_size, "; it must be >= 1");
  if (batch_size % micro_batch_size != 0)
    fail("micro_batch_size (", micro_batch_size, ") must divide batch_size (", batch_size,
         ") so every batch is a whole number of micro-batches; e.g. micro_batch_size ",
         std::gcd(batch_size, micro_batch_size));
  if (!std::isfinite(lr) || lr < 0) fail("lr is ", lr, "; it must be a finite number >= 0 (e.g. 3e-4)");
  if (warmup_steps < 0) fail("warmup_steps is ", warmup_steps, "; it must be >= 0");
  bool known = false;
  for (const auto& s : schedules()) known = known || s == schedule;
  if (!known)
    fail("schedule \"", schedule, "\" is unknown; use one of ", join(schedules()), " (did you mean \"",
         mola::detail::nearest_name(schedule, schedules()), "\"?)");
  if (!std::isfinite(weight_decay) || weight_decay < 0) fail("weight_decay is ", weight_decay, "; it must be >= 0");
  if (!std::isfinite(max_grad_norm) || max_grad_norm < 0)
    fail("max_grad_norm is ", max_grad_norm, "; it must be >= 0 (0 turns clipping off)");
  if (!(adam_beta1 >= 0 && adam_beta1 < 1)) fail("adam_beta1 is ", adam_beta1, "; it must be in [0, 1)");
  if (!(adam_beta2 >= 0 && adam_beta2 < 1)) fail("adam_beta2 is ", adam_beta2, "; it must be in [0, 1)");
  if (!(adam_epsilon > 0) || !std::isfinite(adam_epsilon))
    fail("adam_epsilon is ", adam_epsilon, "; it must be > 0 (e.g. 1e-8)");
  if (seed < 0) fail("seed is ", seed, "; it must be >= 0");
  if (log_every < 1) fail("log_every is ", log_every, "; it must be >= 1");
  if (eval_every < 0) fail("eval_every is ", eval_every, "; it must be >= 0 (0: never evaluate)");
  if (save_every < 0) fail("save_every is ", save_every, "; it must be >= 0 (0: save only at the end)");
  if (save_total_limit < 0)
    fail("save_total_limit is ", save_total_limit, "; it must be >= 0 (0: keep every checkpoint)");
  if (std::find(trainables().begin(), trainables().end(), trainable) == trainables().end())
    fail("trainable \"", trainable, "\" is unknown; use one of ", join(trainables()),
         " (all: routers and experts; experts: routers frozen; routers: experts frozen; did you mean \"",
         mola::detail::nearest_name(trainable, trainables()), "\"?)");
  if (std::holds_alternative<std::string>(resume) && std::get<std::string>(resume).empty())
    fail("resume is an empty path; give false, true (the newest checkpoint in the output directory) or a path");
}

bool operator==(const TrainOptions& a, const TrainOptions& b) { return a.to_json() == b.to_json(); }

double lr_multiplier(const std::string& schedule, int64_t step, int64_t warmup_steps, int64_t total_steps) {
  const auto s = static_cast<double>(step);
  if (step < warmup_steps) return s / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  const auto decay = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  if (schedule == "linear") return std::max(0.0, static_cast<double>(total_steps - step) / decay);
  if (schedule == "cosine") {
    const double progress = static_cast<double>(step - warmup_steps) / decay;
    // num_cycles = 0.5: cos(pi * 2 * 0.5 * progress)
    return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  }
  if (schedule == "constant") return 1.0;
  fail("schedule \"", schedule, "\" is unknown; use one of ", join(TrainOptions::schedules()));
}

}  // namespace mola::train
