// The training loop (mola/train/trainer.h): set-up (adapter, optimizer,
// sampler, resume), the steps with gradient accumulation, the NaN guard,
// evaluation, logging and checkpoints. The files are in checkpoint.cpp and the
// output in progress.cpp.
#include <mola/train/trainer.h>

#include <mola/models/adapter.h>

#include "train/checkpoint.h"
#include "train/distributed.h"
#include "train/progress.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <chrono>
#include <cmath>
#include <sstream>

namespace mola::train {

namespace {

using Clock = std::chrono::steady_clock;

// "nan", "inf", "-inf" or the number: std::ostream writes glibc's "-nan".
std::string number_text(double v) {
  if (std::isnan(v)) return "nan";
  std::ostringstream os;
  os << v;
  return os.str();
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// bf16 autocast for the forward on CUDA (design.md 8); the backward runs
// outside it, as torch.autocast's documentation prescribes. On the CPU the
// model trains in its own dtype (fp32).
class CudaAutocast {
 public:
  explicit CudaAutocast(bool on) : on_(on) {
    if (!on_) return;
    prev_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
    prev_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~CudaAutocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled_);
    at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype_);
  }
  CudaAutocast(const CudaAutocast&) = delete;
  CudaAutocast& operator=(const CudaAutocast&) = delete;

 private:
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

// Every example must be trainable: tokens present, ids inside the
// vocabulary, labels aligned with input_ids (design.md 10: a bad input is an
// error naming it, not a crash inside an embedding lookup).
void check_examples(const std::vector<data::Example>& examples, const std::string& which, int64_t vocab) {
  for (size_t i = 0; i < examples.size(); ++i) {
    const auto& e = examples[i];
    const std::string where = which + " example " + std::to_string(i);
    if (e.input_ids.empty()) throw std::invalid_argument(where + " has no tokens; drop empty examples");
    if (e.labels.size() != e.input_ids.size())
      throw std::invalid_argument(where + " has " + std::to_string(e.input_ids.size()) + " input_ids but " +
                                  std::to_string(e.labels.size()) + " labels; they must have the same length");
    for (size_t t = 0; t < e.input_ids.size(); ++t) {
      const int64_t id = e.input_ids[t], label = e.labels[t];
      if (id < 0 || id >= vocab)
        throw std::invalid_argument(where + ": input_ids[" + std::to_string(t) + "] = " + std::to_string(id) +
                                    " is outside the model's vocabulary [0, " + std::to_string(vocab) +
                                    "); was it tokenised for another model?");
      if (label != -100 && (label < 0 || label >= vocab))
        throw std::invalid_argument(where + ": labels[" + std::to_string(t) + "] = " + std::to_string(label) +
                                    " must be -100 or a token id in [0, " + std::to_string(vocab) + ")");
    }
  }
}

std::vector<int64_t> lengths_of(const std::vector<data::Example>& examples) {
  std::vector<int64_t> lengths;
  lengths.reserve(examples.size());
  for (const auto& e : examples) lengths.push_back(static_cast<int64_t>(e.input_ids.size()));
  return lengths;
}

// The options that fix the data order and the optimizer's meaning: a resume
// with other values would not continue the same run.
void check_resumable(const TrainOptions& now, const TrainOptions& saved, const detail::TrainState& state,
                     int64_t num_examples, const std::string& dir) {
  auto mismatch = [&](const char* key, const std::string& a, const std::string& b) {
    throw ConfigError("resume: " + std::string(key) + " is " + a + " but the checkpoint " + dir + " was made with " +
                      b + "; a resumed run must keep it (set " + key + " to " + b +
                      ", or start a fresh run in another output directory)");
  };
  if (now.batch_size != saved.batch_size)
    mismatch("batch_size", std::to_string(now.batch_size), std::to_string(saved.batch_size));
  if (now.seed != saved.seed) mismatch("seed", std::to_string(now.seed), std::to_string(saved.seed));
  if (now.trainable != saved.trainable) mismatch("trainable", now.trainable, saved.trainable);
  if (now.group_by_length != saved.group_by_length)
    mismatch("group_by_length", now.group_by_length ? "true" : "false", saved.group_by_length ? "true" : "false");
  if (num_examples != state.num_examples)
    throw ConfigError("resume: the training set has " + std::to_string(num_examples) + " examples but the checkpoint " +
                      dir + " was made on " + std::to_string(state.num_examples) +
                      "; resume with the same data, or start a fresh run in another output directory");
}

}  // namespace

nlohmann::json TrainResult::to_json() const {
  return {{"steps", steps},
          {"train_loss", detail::json_number(train_loss)},
          {"eval_loss", eval_loss ? detail::json_number(*eval_loss) : nlohmann::json(nullptr)},
          {"checkpoint", checkpoint},
          {"tokens", tokens},
          {"wall_s", wall_s}};
}

Trainer::Trainer(std::shared_ptr<models::CausalLMImpl> model, TrainOptions options, std::string output_dir)
    : model_(std::move(model)), options_(std::move(options)), output_dir_(std::move(output_dir)) {
  if (!model_) throw std::invalid_argument("Trainer: model is null; give a loaded CausalLM");
  if (output_dir_.empty()) throw std::invalid_argument("Trainer: output_dir is empty; give a directory for the run");
  options_.validate();
  const bool adapter_comes_later =
      !options_.init_adapter.empty() || !std::holds_alternative<bool>(options_.resume) || std::get<bool>(options_.resume);
  if (!model_->has_adapter() && !adapter_comes_later)
    throw std::invalid_argument(
        "Trainer: the model has no adapter, so nothing would train; attach one first (model->attach(config), "
        "mola.CausalLM.attach in Python) or set init_adapter to an adapter directory");
}

double Trainer::evaluate(const std::vector<data::Example>& examples) {
  check_examples(examples, "validation", model_->config().vocab_size);
  const bool was_training = model_->is_training();
  model_->eval();
  at::NoGradGuard no_grad;
  const at::Device device = model_->parameters().front().device();
  const detail::Collective dist(group_, device);
  double loss_sum = 0.0;
  int64_t counted = 0;
  for (size_t begin = 0; begin < examples.size(); begin += static_cast<size_t>(options_.micro_batch_size)) {
    if (!dist.owns(static_cast<int64_t>(begin) / options_.micro_batch_size)) continue;  // another rank's
    std::vector<int64_t> idx;
    for (size_t i = begin; i < std::min(examples.size(), begin + options_.micro_batch_size); ++i)
      idx.push_back(static_cast<int64_t>(i));
    const data::Batch b = data::collate(examples, idx);
    const at::Tensor labels = b.labels.to(device);
    // The model's loss is the mean over labels[:, 1:] != -100 (shifted):
    // weight each micro-batch by that count for a mean over all tokens.
    const int64_t n = labels.slice(1, 1).ne(-100).sum().item<int64_t>();
    if (n == 0) continue;
    CudaAutocast autocast(device.is_cuda());
    const auto out = model_->forward(b.input_ids.to(device), b.attention_mask.to(device), labels);
    loss_sum += out.loss.item<double>() * static_cast<double>(n);
    counted += n;
  }
  if (was_training) model_->train();
  if (dist.active()) {
    at::Tensor totals = at::tensor({loss_sum, static_cast<double>(counted)}, at::kDouble).to(device);
    dist.sum(totals);
    totals = totals.cpu();
    loss_sum = totals[0].item<double>();
    counted = static_cast<int64_t>(totals[1].item<double>());
  }
  if (counted == 0)
    throw std::invalid_argument("Trainer.evaluate: the " + std::to_string(examples.size()) +
                                " examples have no label tokens (all -100), so there is no loss to average");
  return loss_sum / static_cast<double>(counted);
}

TrainResult Trainer::fit(const std::vector<data::Example>& train, const std::vector<data::Example>& validation) {
  const auto session_start = Clock::now();
  if (train.empty()) throw std::invalid_argument("Trainer.fit: the training set is empty; give at least one example");
  check_examples(train, "training", model_->config().vocab_size);
  check_examples(validation, "validation", model_->config().vocab_size);
  // A fresh run never appends to another run's metrics.jsonl or checkpoints.
  if (!group_ || group_->getRank() == 0)
    detail::claim_output_dir(output_dir_, options_, {"metrics.jsonl", "checkpoints"}, "Trainer.fit: ",
                             "TrainOptions.resume = true", "TrainOptions.overwrite_output_dir = true");

  // Where to continue from: a given checkpoint, the newest one here, or none.
  std::string resume_dir;
  if (std::holds_alternative<std::string>(options_.resume)) {
    resume_dir = std::get<std::string>(options_.resume);
    detail::read_train_state(resume_dir);  // a clear error now for a path that is no checkpoint
  } else if (std::get<bool>(options_.resume)) {
    detail::remove_stale_temporaries(output_dir_);
    const auto all = list_checkpoints(output_dir_);
    if (!all.empty()) resume_dir = all.back().second;
  }

  // The adapter: the checkpoint's when resuming, else init_adapter's (a
  // two-stage run, design.md 8.1), else the one attached.
  const bool to_train = true;
  if (!resume_dir.empty()) models::load_adapter(*model_, resume_dir, to_train);
  else if (!options_.init_adapter.empty()) models::load_adapter(*model_, options_.init_adapter, to_train);
  if (!model_->has_adapter())
    throw std::invalid_argument("Trainer.fit: the model has no adapter and no checkpoint was found in " +
                                detail::checkpoints_dir(output_dir_) +
                                " to resume from; attach one first or set init_adapter");

  // What trains (options.trainable, design.md 8.1): only these adapter
  // tensors get requires_grad, so only they reach the optimizer.
  const bool routers = options_.trainable != "experts", experts = options_.trainable != "routers";
  for (const auto& a : model_->adapted_projections()) {
    a.module->mola->router.requires_grad_(routers);
    a.module->mola->lora_a.requires_grad_(experts);
    a.module->mola->lora_b.requires_grad_(experts);
  }
  // MoLEx's gates route between layers: they count as routers.
  for (auto& p : model_->named_parameters(/*recurse=*/true))
    if (p.key().find(".molex.") != std::string::npos) p.value().requires_grad_(routers);
  detail::Trainable trainable;
  for (const auto& p : model_->named_parameters(/*recurse=*/true)) {
    if (!p.value().requires_grad()) continue;
    trainable.names.push_back(p.key());
    trainable.params.push_back(p.value());
  }
  if (trainable.params.empty())
    throw std::invalid_argument("Trainer.fit: the model has no parameter with requires_grad; the adapter is frozen");
  const at::Device device = trainable.params.front().device();
  const detail::Collective dist(group_, device);
  dist.broadcast_from_main(trainable.params);  // one starting adapter on every rank

  // transformers' AdamW defaults, weight decay on every adapter parameter.
  torch::optim::AdamW optimizer(trainable.params,
                                torch::optim::AdamWOptions(options_.lr)
                                    .betas({options_.adam_beta1, options_.adam_beta2})
                                    .eps(options_.adam_epsilon)
                                    .weight_decay(options_.weight_decay));

  data::BatchSampler sampler(lengths_of(train), options_.batch_size, options_.micro_batch_size,
                             static_cast<uint64_t>(options_.seed), options_.group_by_length);
  const int64_t per_epoch = sampler.batches_per_epoch();
  const int64_t total = options_.max_steps > 0 ? options_.max_steps : options_.epochs * per_epoch;

  detail::TrainState state;
  state.num_examples = static_cast<int64_t>(train.size());
  std::string last_checkpoint;
  if (!resume_dir.empty()) {
    state = detail::read_train_state(resume_dir);
    check_resumable(options_, detail::read_checkpoint_options(resume_dir), state,
                    static_cast<int64_t>(train.size()), resume_dir);
    detail::load_optimizer_state(resume_dir, optimizer, trainable);
    sampler.set_position(state.sampler);
    detail::restore_rng_state(resume_dir, device);
    last_checkpoint = resume_dir;
  } else {
    torch::manual_seed(static_cast<uint64_t>(options_.seed));  // dropout masks repeat per seed
  }
  state.total_steps = total;

  // Rank 0 writes the files and draws the progress; the other ranks are silent.
  if (dist.is_main()) detail::make_dirs(output_dir_);
  const detail::MetricsLog metrics(dist.is_main() ? detail::join_path(output_dir_, "metrics.jsonl") : "");
  // A resumed run drops what a killed one logged after its checkpoint.
  if (dist.is_main() && (!std::holds_alternative<bool>(options_.resume) || std::get<bool>(options_.resume)))
    detail::trim_metrics(metrics.path(), state.step);
  detail::ProgressBar bar(total, state.step, options_.log_every, dist.is_main() ? stderr : nullptr);
  if (!resume_dir.empty())
    bar.note("resuming from " + resume_dir + " at step " + std::to_string(state.step) + " of " +
             std::to_string(total));
  else if (std::holds_alternative<bool>(options_.resume) && std::get<bool>(options_.resume))
    bar.note("resume: no checkpoint in " + detail::checkpoints_dir(output_dir_) + " yet; starting a fresh run");
  const double elapsed_before = state.elapsed_s;
  auto elapsed = [&] { return elapsed_before + seconds_since(session_start); };

  auto run_evaluation = [&] {
    if (validation.empty() && !on_eval_) return;
    nlohmann::json line{{"step", state.step}, {"epoch", state.epoch}};
    if (!validation.empty()) {
      state.eval_loss = evaluate(validation);
      line["eval_loss"] = detail::json_number(*state.eval_loss);
    }
    if (on_eval_ && dist.is_main()) {
      model_->eval();
      nlohmann::json extra;
      {
        at::NoGradGuard no_grad;
        extra = on_eval_(state.step);
      }
      model_->train();
      if (!extra.is_null() && !extra.is_object())
        throw std::invalid_argument("Trainer: the evaluation callback must return a JSON object (or null); got " +
                                    extra.dump());
      if (extra.is_object()) line.update(extra);
    }
    metrics.write(line);
    bar.note("eval step " + std::to_string(state.step) + ": " + line.dump());
  };

  model_->train();
  int64_t interval_tokens = 0;
  auto interval_start = Clock::now();
  while (state.step < total) {
    const double lr = options_.lr * lr_multiplier(options_.schedule, state.step, options_.warmup_steps, total);
    for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);

    const auto micro = sampler.next();  // [micro-batches][indices]
    const auto n_micro = static_cast<double>(micro.size());
    optimizer.zero_grad();
    at::Tensor loss_acc = at::zeros({}, at::TensorOptions(at::kDouble).device(device));
    at::Tensor aux_acc = at::zeros({}, at::TensorOptions(at::kDouble).device(device));
    int64_t step_tokens = 0;
    for (size_t j = 0; j < micro.size(); ++j) {
      if (!dist.owns(static_cast<int64_t>(j))) continue;  // another rank's micro-batch
      if (dist.active())
        torch::manual_seed(detail::micro_batch_seed(options_.seed, state.step, static_cast<int64_t>(j)));
      const data::Batch b = data::collate(train, micro[j]);
      const at::Tensor mask = b.attention_mask.to(device);
      at::Tensor loss, aux;
      {
        CudaAutocast autocast(device.is_cuda());
        const auto out = model_->forward(b.input_ids.to(device), mask, b.labels.to(device));
        loss = out.loss;
        aux = model_->aux_loss(std::nullopt, mask);
      }
      // transformers' Trainer divides each micro-batch's loss by the number
      // of accumulation steps, so the summed gradient is the batch mean.
      ((loss + aux) / n_micro).backward();
      detail::fault_point("step", state.step + 1);
      loss_acc += loss.detach().to(at::kDouble) / n_micro;
      aux_acc += aux.detach().to(at::kDouble) / n_micro;
      step_tokens += b.num_tokens;
    }
    if (dist.active()) {
      // The ranks' partial sums add up to the one-process batch (distributed.h).
      dist.sum_gradients(trainable.params);
      at::Tensor totals = at::stack({loss_acc, aux_acc, at::scalar_tensor(static_cast<double>(step_tokens),
                                                                          loss_acc.options())});
      dist.sum(totals);
      totals = totals.cpu();
      loss_acc = totals[0];
      aux_acc = totals[1];
      step_tokens = static_cast<int64_t>(totals[2].item<double>());
    }
    // The norm before clipping, as transformers logs it; clip_grad_norm_
    // returns it. 0 turns clipping off but the norm is still reported.
    const double grad_norm = torch::nn::utils::clip_grad_norm_(
        trainable.params, options_.max_grad_norm > 0 ? options_.max_grad_norm : INFINITY);
    const double loss_v = loss_acc.item<double>(), aux_v = aux_acc.item<double>();

    ++state.step;
    state.tokens += step_tokens;
    interval_tokens += step_tokens;
    state.epoch = static_cast<double>(state.step) / static_cast<double>(per_epoch);
    state.train_loss = loss_v;
    const bool finite = std::isfinite(loss_v) && std::isfinite(aux_v) && std::isfinite(grad_norm);

    if (state.step % options_.log_every == 0 || state.step == total || !finite) {
      const double interval_s = seconds_since(interval_start);
      const double tok_s = interval_s > 0 ? static_cast<double>(interval_tokens) / interval_s : 0.0;
      nlohmann::json line{{"step", state.step},
                          {"epoch", state.epoch},
                          {"loss", detail::json_number(loss_v)},
                          {"aux_loss", detail::json_number(aux_v)},
                          {"lr", lr},
                          {"grad_norm", detail::json_number(grad_norm)},
                          {"tokens", state.tokens},
                          {"tokens_per_s", tok_s},
                          {"elapsed_s", elapsed()}};
      if (!finite)
        line["non_finite"] = "loss " + number_text(loss_v) + ", aux_loss " + number_text(aux_v) + ", grad_norm " +
                             number_text(grad_norm);
      metrics.write(line);
      bar.update(state.step, loss_v, lr, tok_s);
      interval_tokens = 0;
      interval_start = Clock::now();
    }

    if (!finite) {
      const double value = !std::isfinite(loss_v) ? loss_v : !std::isfinite(aux_v) ? aux_v : grad_norm;
      const char* what = !std::isfinite(loss_v) ? "loss" : !std::isfinite(aux_v) ? "aux_loss" : "gradient norm";
      std::ostringstream os;
      os << "training stopped at step " << state.step << " (epoch " << state.epoch << "): the " << what << " is "
         << number_text(value) << " (loss " << number_text(loss_v) << ", aux_loss " << number_text(aux_v)
         << ", grad norm " << number_text(grad_norm)
         << "); the parameters were not updated. Last good checkpoint: "
         << (last_checkpoint.empty() ? "none saved yet" : last_checkpoint)
         << ". Likely causes: the learning rate is too high (lr " << lr
         << " at this step: lower lr or raise warmup_steps); fp16 overflow (train in bf16 or fp32); bad data (an "
            "example with corrupt token ids, or a batch whose labels are all -100). This step's metrics are in "
         << metrics.path() << ".";
      bar.finish();
      throw NonFiniteLossError(os.str(), state.step, value, last_checkpoint);
    }
    optimizer.step();

    if (options_.eval_every > 0 && (state.step % options_.eval_every == 0 || state.step == total)) run_evaluation();
    if ((options_.save_every > 0 && state.step % options_.save_every == 0) || state.step == total) {
      state.sampler = sampler.position();
      state.elapsed_s = elapsed();
      if (dist.is_main()) {
        last_checkpoint = detail::save_checkpoint(output_dir_, *model_, optimizer, trainable, state, options_, device);
        detail::prune_checkpoints(output_dir_, options_.save_total_limit);
        bar.note("saved " + last_checkpoint);
      } else {
        last_checkpoint =
            detail::join_path(detail::checkpoints_dir(output_dir_), "step-" + std::to_string(state.step));
      }
      dist.barrier();  // the checkpoint is complete on disk for every rank
    }
  }
  bar.finish();

  TrainResult result;
  result.steps = state.step;
  result.train_loss = state.train_loss;
  result.eval_loss = state.eval_loss;
  result.checkpoint = last_checkpoint;
  result.tokens = state.tokens;
  result.wall_s = elapsed();
  return result;
}

}  // namespace mola::train
