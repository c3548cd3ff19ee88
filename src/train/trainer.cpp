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

// bf16 autocast for the forward on CUDA (docs/recipes.md); the backward runs
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
// vocabulary, labels aligned with input_ids (docs/design.md, Reliability: a bad input is an
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

namespace {

// One call of Trainer::fit, in named steps as torchtune's recipes set up the
// model, the optimizer and the data separately: find where to resume, load
// the adapter, select what trains, build the optimizer and sampler, restore
// (or seed) the state, open the outputs, then the loop of train_step,
// log_step, stop_if_not_finite, the AdamW step, evaluate and save.
class FitRun {
 public:
  FitRun(Trainer& trainer, models::CausalLMImpl& model, const TrainOptions& options, const std::string& output_dir,
         const Trainer::EvalCallback& on_eval, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
         const std::vector<data::Example>& train, const std::vector<data::Example>& validation)
      : trainer_(trainer), model_(model), options_(options), output_dir_(output_dir), on_eval_(on_eval),
        group_(group), train_(train), validation_(validation) {}

  TrainResult run() {
    check_inputs();
    const std::string resume_dir = find_resume_point();
    load_adapter(resume_dir);
    select_trainable();
    make_optimizer_and_sampler();
    restore_or_seed(resume_dir);
    open_outputs(resume_dir);

    model_.train();
    interval_start_ = Clock::now();
    while (state_.step < total_) {
      const double lr = options_.lr * lr_multiplier(options_.schedule, state_.step, options_.warmup_steps, total_);
      for (auto& group : optimizer_->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      const StepFigures step = train_step();
      log_step(step, lr);
      stop_if_not_finite(step, lr);
      optimizer_->step();
      if (options_.eval_every > 0 && (state_.step % options_.eval_every == 0 || state_.step == total_)) evaluate();
      if ((options_.save_every > 0 && state_.step % options_.save_every == 0) || state_.step == total_) save();
    }
    bar_->finish();

    TrainResult result;
    result.steps = state_.step;
    result.train_loss = state_.train_loss;
    result.eval_loss = state_.eval_loss;
    result.checkpoint = last_checkpoint_;
    result.tokens = state_.tokens;
    result.wall_s = elapsed();
    return result;
  }

 private:
  // One optimizer step's figures, summed over the ranks.
  struct StepFigures {
    double loss = 0, aux = 0, grad_norm = 0;
    bool finite = true;
  };

  double elapsed() const { return elapsed_before_ + seconds_since(session_start_); }

  void check_inputs() {
    if (train_.empty()) throw std::invalid_argument("Trainer.fit: the training set is empty; give at least one example");
    check_examples(train_, "training", model_.config().vocab_size);
    check_examples(validation_, "validation", model_.config().vocab_size);
    // A fresh run never appends to another run's metrics.jsonl or checkpoints.
    if (!group_ || group_->getRank() == 0)
      detail::claim_output_dir(output_dir_, options_, {"metrics.jsonl", "checkpoints"}, "Trainer.fit: ",
                               "TrainOptions.resume = true", "TrainOptions.overwrite_output_dir = true");
  }

  // Where to continue from: a given checkpoint, the newest one here, or none ("").
  std::string find_resume_point() const {
    if (std::holds_alternative<std::string>(options_.resume)) {
      const std::string dir = std::get<std::string>(options_.resume);
      detail::read_train_state(dir);  // a clear error now for a path that is no checkpoint
      return dir;
    }
    if (!std::get<bool>(options_.resume)) return "";
    detail::remove_stale_temporaries(output_dir_);
    const auto all = list_checkpoints(output_dir_);
    return all.empty() ? "" : all.back().second;
  }

  // The adapter: the checkpoint's when resuming, else init_adapter's (a
  // two-stage run, docs/recipes.md), else the one attached.
  void load_adapter(const std::string& resume_dir) {
    const bool to_train = true;
    if (!resume_dir.empty()) models::load_adapter(model_, resume_dir, to_train);
    else if (!options_.init_adapter.empty()) models::load_adapter(model_, options_.init_adapter, to_train);
    if (!model_.has_adapter())
      throw std::invalid_argument("Trainer.fit: the model has no adapter and no checkpoint was found in " +
                                  detail::checkpoints_dir(output_dir_) +
                                  " to resume from; attach one first or set init_adapter");
  }

  // What trains (options.trainable, docs/recipes.md): only these adapter
  // tensors get requires_grad, so only they reach the optimizer. Every rank
  // starts from rank 0's adapter.
  void select_trainable() {
    model_.set_trainable(options_.trainable);
    for (const auto& p : model_.named_parameters(/*recurse=*/true)) {
      if (!p.value().requires_grad()) continue;
      trainable_.names.push_back(p.key());
      trainable_.params.push_back(p.value());
    }
    if (trainable_.params.empty())
      throw std::invalid_argument("Trainer.fit: the model has no parameter with requires_grad; the adapter is frozen");
    device_ = trainable_.params.front().device();
    dist_.emplace(group_, device_);
    dist_->broadcast_from_main(trainable_.params);
  }

  // transformers' AdamW defaults, weight decay on every adapter parameter; the
  // batches as transformers' sampler draws them.
  void make_optimizer_and_sampler() {
    optimizer_.emplace(trainable_.params, torch::optim::AdamWOptions(options_.lr)
                                              .betas({options_.adam_beta1, options_.adam_beta2})
                                              .eps(options_.adam_epsilon)
                                              .weight_decay(options_.weight_decay));
    sampler_.emplace(lengths_of(train_), options_.batch_size, options_.micro_batch_size,
                     static_cast<uint64_t>(options_.seed), options_.group_by_length);
    per_epoch_ = sampler_->batches_per_epoch();
    total_ = options_.max_steps > 0 ? options_.max_steps : options_.epochs * per_epoch_;
  }

  // A resumed run takes back its step, optimizer, sampler and generators; a
  // fresh one seeds the generators (dropout masks repeat per seed).
  void restore_or_seed(const std::string& resume_dir) {
    state_.num_examples = static_cast<int64_t>(train_.size());
    if (!resume_dir.empty()) {
      state_ = detail::read_train_state(resume_dir);
      check_resumable(options_, detail::read_checkpoint_options(resume_dir), state_,
                      static_cast<int64_t>(train_.size()), resume_dir);
      detail::load_optimizer_state(resume_dir, *optimizer_, trainable_);
      sampler_->set_position(state_.sampler);
      detail::restore_rng_state(resume_dir, device_);
      last_checkpoint_ = resume_dir;
    } else {
      torch::manual_seed(static_cast<uint64_t>(options_.seed));
    }
    state_.total_steps = total_;
    elapsed_before_ = state_.elapsed_s;
  }

  // Rank 0 writes the files and draws the progress; the other ranks are silent.
  void open_outputs(const std::string& resume_dir) {
    const bool main = dist_->is_main();
    if (main) detail::make_dirs(output_dir_);
    metrics_.emplace(main ? detail::join_path(output_dir_, "metrics.jsonl") : "");
    // A resumed run drops what a killed one logged after its checkpoint.
    if (main && (!std::holds_alternative<bool>(options_.resume) || std::get<bool>(options_.resume)))
      detail::trim_metrics(metrics_->path(), state_.step);
    bar_.emplace(total_, state_.step, options_.log_every, main ? stderr : nullptr);
    if (!resume_dir.empty())
      bar_->note("resuming from " + resume_dir + " at step " + std::to_string(state_.step) + " of " +
                 std::to_string(total_));
    else if (std::holds_alternative<bool>(options_.resume) && std::get<bool>(options_.resume))
      bar_->note("resume: no checkpoint in " + detail::checkpoints_dir(output_dir_) + " yet; starting a fresh run");
  }

  // The forward and backward of one batch's micro-batches (this rank's), the
  // gradients and figures summed over the ranks, then clipped.
  StepFigures train_step() {
    const auto micro = sampler_->next();  // [micro-batches][indices]
    const auto n_micro = static_cast<double>(micro.size());
    optimizer_->zero_grad();
    at::Tensor loss_acc = at::zeros({}, at::TensorOptions(at::kDouble).device(device_));
    at::Tensor aux_acc = at::zeros({}, at::TensorOptions(at::kDouble).device(device_));
    int64_t step_tokens = 0;
    for (size_t j = 0; j < micro.size(); ++j) {
      if (!dist_->owns(static_cast<int64_t>(j))) continue;  // another rank's micro-batch
      if (dist_->active())
        torch::manual_seed(detail::micro_batch_seed(options_.seed, state_.step, static_cast<int64_t>(j)));
      const data::Batch b = data::collate(train_, micro[j]);
      const at::Tensor mask = b.attention_mask.to(device_);
      at::Tensor loss, aux;
      {
        CudaAutocast autocast(device_.is_cuda());
        const auto out = model_.forward(b.input_ids.to(device_), mask, b.labels.to(device_));
        loss = out.loss;
        aux = model_.aux_loss(std::nullopt, mask);
      }
      // transformers' Trainer divides each micro-batch's loss by the number
      // of accumulation steps, so the summed gradient is the batch mean.
      ((loss + aux) / n_micro).backward();
      detail::fault_point("step", state_.step + 1);
      loss_acc += loss.detach().to(at::kDouble) / n_micro;
      aux_acc += aux.detach().to(at::kDouble) / n_micro;
      step_tokens += b.num_tokens;
    }
    if (dist_->active()) {
      // The ranks' partial sums add up to the one-process batch (distributed.h).
      dist_->sum_gradients(trainable_.params);
      at::Tensor totals = at::stack({loss_acc, aux_acc, at::scalar_tensor(static_cast<double>(step_tokens),
                                                                          loss_acc.options())});
      dist_->sum(totals);
      totals = totals.cpu();
      loss_acc = totals[0];
      aux_acc = totals[1];
      step_tokens = static_cast<int64_t>(totals[2].item<double>());
    }
    StepFigures f;
    // The norm before clipping, as transformers logs it; clip_grad_norm_
    // returns it. 0 turns clipping off but the norm is still reported.
    f.grad_norm = torch::nn::utils::clip_grad_norm_(trainable_.params,
                                                    options_.max_grad_norm > 0 ? options_.max_grad_norm : INFINITY);
    f.loss = loss_acc.item<double>();
    f.aux = aux_acc.item<double>();
    f.finite = std::isfinite(f.loss) && std::isfinite(f.aux) && std::isfinite(f.grad_norm);

    ++state_.step;
    state_.tokens += step_tokens;
    interval_tokens_ += step_tokens;
    state_.epoch = static_cast<double>(state_.step) / static_cast<double>(per_epoch_);
    state_.train_loss = f.loss;
    return f;
  }

  // metrics.jsonl and the progress bar, every log_every steps, at the end and
  // on a non-finite step.
  void log_step(const StepFigures& f, double lr) {
    if (state_.step % options_.log_every != 0 && state_.step != total_ && f.finite) return;
    const double interval_s = seconds_since(interval_start_);
    const double tok_s = interval_s > 0 ? static_cast<double>(interval_tokens_) / interval_s : 0.0;
    nlohmann::json line{{"step", state_.step},
                        {"epoch", state_.epoch},
                        {"loss", detail::json_number(f.loss)},
                        {"aux_loss", detail::json_number(f.aux)},
                        {"lr", lr},
                        {"grad_norm", detail::json_number(f.grad_norm)},
                        {"tokens", state_.tokens},
                        {"tokens_per_s", tok_s},
                        {"elapsed_s", elapsed()}};
    if (!f.finite)
      line["non_finite"] = "loss " + number_text(f.loss) + ", aux_loss " + number_text(f.aux) + ", grad_norm " +
                           number_text(f.grad_norm);
    metrics_->write(line);
    bar_->update(state_.step, f.loss, lr, tok_s);
    interval_tokens_ = 0;
    interval_start_ = Clock::now();
  }

  // The NaN guard: a non-finite loss, aux loss or gradient norm stops the run
  // before the update, naming the last good checkpoint and the likely causes.
  void stop_if_not_finite(const StepFigures& f, double lr) {
    if (f.finite) return;
    const double value = !std::isfinite(f.loss) ? f.loss : !std::isfinite(f.aux) ? f.aux : f.grad_norm;
    const char* what = !std::isfinite(f.loss) ? "loss" : !std::isfinite(f.aux) ? "aux_loss" : "gradient norm";
    std::ostringstream os;
    os << "training stopped at step " << state_.step << " (epoch " << state_.epoch << "): the " << what << " is "
       << number_text(value) << " (loss " << number_text(f.loss) << ", aux_loss " << number_text(f.aux)
       << ", grad norm " << number_text(f.grad_norm) << "); the parameters were not updated. Last good checkpoint: "
       << (last_checkpoint_.empty() ? "none saved yet" : last_checkpoint_) << ". Likely causes: the learning rate is "
       << "too high (lr " << lr
       << " at this step: lower lr or raise warmup_steps); fp16 overflow (train in bf16 or fp32); bad data (an "
          "example with corrupt token ids, or a batch whose labels are all -100). This step's metrics are in "
       << metrics_->path() << ".";
    bar_->finish();
    throw NonFiniteLossError(os.str(), state_.step, value, last_checkpoint_);
  }

  // The validation loss and the callback's figures, one metrics line.
  void evaluate() {
    if (validation_.empty() && !on_eval_) return;
    nlohmann::json line{{"step", state_.step}, {"epoch", state_.epoch}};
    if (!validation_.empty()) {
      state_.eval_loss = trainer_.evaluate(validation_);
      line["eval_loss"] = detail::json_number(*state_.eval_loss);
    }
    if (on_eval_ && dist_->is_main()) {
      model_.eval();
      nlohmann::json extra;
      {
        at::NoGradGuard no_grad;
        extra = on_eval_(state_.step);
      }
      model_.train();
      if (!extra.is_null() && !extra.is_object())
        throw std::invalid_argument("Trainer: the evaluation callback must return a JSON object (or null); got " +
                                    extra.dump());
      if (extra.is_object()) line.update(extra);
    }
    metrics_->write(line);
    bar_->note("eval step " + std::to_string(state_.step) + ": " + line.dump());
  }

  // A checkpoint (rank 0 writes it; every rank waits until it is on disk).
  void save() {
    state_.sampler = sampler_->position();
    state_.elapsed_s = elapsed();
    if (dist_->is_main()) {
      last_checkpoint_ = detail::save_checkpoint(output_dir_, model_, *optimizer_, trainable_, state_, options_, device_);
      detail::prune_checkpoints(output_dir_, options_.save_total_limit);
      bar_->note("saved " + last_checkpoint_);
    } else {
      last_checkpoint_ = detail::join_path(detail::checkpoints_dir(output_dir_), "step-" + std::to_string(state_.step));
    }
    dist_->barrier();
  }

  Trainer& trainer_;
  models::CausalLMImpl& model_;
  const TrainOptions& options_;
  const std::string& output_dir_;
  const Trainer::EvalCallback& on_eval_;
  const c10::intrusive_ptr<c10d::ProcessGroup>& group_;
  const std::vector<data::Example>& train_;
  const std::vector<data::Example>& validation_;

  const Clock::time_point session_start_ = Clock::now();
  double elapsed_before_ = 0;
  detail::Trainable trainable_;
  at::Device device_ = at::kCPU;
  std::optional<detail::Collective> dist_;
  std::optional<torch::optim::AdamW> optimizer_;
  std::optional<data::BatchSampler> sampler_;
  int64_t per_epoch_ = 0, total_ = 0;
  detail::TrainState state_;
  std::string last_checkpoint_;
  std::optional<detail::MetricsLog> metrics_;
  std::optional<detail::ProgressBar> bar_;
  int64_t interval_tokens_ = 0;
  Clock::time_point interval_start_ = Clock::now();
};

}  // namespace

TrainResult Trainer::fit(const std::vector<data::Example>& train, const std::vector<data::Example>& validation) {
  return FitRun(*this, *model_, options_, output_dir_, on_eval_, group_, train, validation).run();
}

}  // namespace mola::train
