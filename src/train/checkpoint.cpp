// Training checkpoints: writing, finding, loading and pruning them (see
// checkpoint.h for the files). Also list_checkpoints from mola/train/trainer.h.
#include "train/checkpoint.h"

#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/train/trainer.h>

#include <ATen/Context.h>

#include <dirent.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <mutex>
#include <regex>
#include <sstream>

namespace mola::train {

namespace {

constexpr int kFormatVersion = 1;

// "step-<N>" exactly: temporaries ("step-8.tmp-123") and anything else are not checkpoints.
std::optional<int64_t> checkpoint_step(const std::string& name) {
  static const std::regex pattern("step-([0-9]{1,18})");
  std::smatch m;
  if (!std::regex_match(name, m, pattern)) return std::nullopt;
  return std::stoll(m[1].str());
}

at::Generator default_generator(const at::Device& device) {
  if (device.is_cuda()) return at::globalContext().defaultGenerator(at::Device(at::kCUDA, device.has_index() ? device.index() : 0));
  return at::globalContext().defaultGenerator(at::kCPU);
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) throw std::runtime_error("checkpoint: cannot write " + path + "; is the disk full or read-only?");
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw std::runtime_error("checkpoint: cannot rename " + from + " to " + to + ": " + std::strerror(errno));
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}


nlohmann::json read_state_json(const std::string& dir) {
  const std::string path = detail::join_path(dir, detail::kTrainerStateFile);
  std::ifstream in(path);
  if (!in)
    throw ConfigError("resume: " + path +
                      " is missing, so " + dir + " is not a complete training checkpoint; give a step-<N> "
                      "directory written by the trainer, or resume=true for the newest one in the output directory");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("step") || !j.contains("sampler") || !j.contains("options"))
    throw ConfigError("resume: " + path + " is malformed (not a JSON object with step, sampler and "
                      "options); the checkpoint is damaged, resume from an earlier one");
  return j;
}

}  // namespace

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  const std::string dir = detail::checkpoints_dir(output_dir);
  for (const auto& name : detail::list_dir(dir)) {
    const std::string path = detail::join_path(dir, name);
    const auto step = checkpoint_step(name);
    // trainer_state.json is written last: without it a step-<N> was not made
    // by save_checkpoint (a partial copy, say) and is not resumable.
    if (step && is_directory(path) && detail::path_exists(detail::join_path(path, detail::kTrainerStateFile)))
      out.emplace_back(*step, path);
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace detail {

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void make_dirs(const std::string& path) {
  for (size_t pos = path.find('/', 1);; pos = path.find('/', pos + 1)) {
    const std::string prefix = path.substr(0, pos);
    if (!prefix.empty() && ::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST)
      throw std::runtime_error("cannot create the directory " + prefix + ": " + std::strerror(errno));
    if (pos == std::string::npos) break;
  }
  if (!is_directory(path)) throw std::runtime_error("cannot create the directory " + path + ": a file is in the way");
}

void remove_tree(const std::string& path) {
  if (!path_exists(path)) return;
  // Depth first, not following symlinks: files and links go before their directory.
  const int rc = ::nftw(
      path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
  if (rc != 0) throw std::runtime_error("cannot remove " + path + ": " + std::strerror(errno));
}

std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> out;
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

void claim_output_dir(const std::string& output_dir, const TrainOptions& options,
                      const std::vector<std::string>& outputs, const std::string& where,
                      const std::string& resume_key, const std::string& overwrite_key, bool remove) {
  const bool resume = std::holds_alternative<std::string>(options.resume) || std::get<bool>(options.resume);
  if (resume) return;
  const auto is_output = [&](const std::string& name) {
    for (const auto& o : outputs) {
      if (!o.empty() && o.back() == '*' ? name.rfind(o.substr(0, o.size() - 1), 0) == 0 : name == o) return true;
    }
    return false;
  };
  std::vector<std::string> found;
  for (const auto& name : list_dir(output_dir))
    if (is_output(name)) found.push_back(name);
  if (found.empty()) return;
  if (options.overwrite_output_dir) {
    if (remove)
      for (const auto& name : found) remove_tree(join_path(output_dir, name));
    return;
  }
  std::string names;
  for (size_t i = 0; i < found.size() && i < 4; ++i) names += (i ? ", " : "") + found[i];
  if (found.size() > 4) names += ", ...";
  throw std::invalid_argument(where + "the output directory " + output_dir + " holds a run already (" + names +
                              "), which a fresh run would mix with its own; continue that run with " + resume_key +
                              ", replace it with " + overwrite_key + ", or write elsewhere");
}

std::string checkpoints_dir(const std::string& output_dir) { return join_path(output_dir, "checkpoints"); }

std::string save_checkpoint(const std::string& output_dir, const models::CausalLMImpl& model,
                            torch::optim::AdamW& optimizer, const Trainable& trainable, const TrainState& state,
                            const TrainOptions& options, const at::Device& device) {
  const std::string root = checkpoints_dir(output_dir);
  const std::string name = "step-" + std::to_string(state.step);
  const std::string final_dir = join_path(root, name);
  const std::string tmp = join_path(root, name + ".tmp-" + std::to_string(::getpid()));
  remove_tree(tmp);
  make_dirs(tmp);

  models::save_adapter(model, tmp);

  std::map<std::string, at::Tensor> opt;
  for (size_t i = 0; i < trainable.params.size(); ++i) {
    auto it = optimizer.state().find(trainable.params[i].unsafeGetTensorImpl());
    if (it == optimizer.state().end()) continue;  // never stepped (no gradient yet)
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    const std::string& n = trainable.names[i];
    opt[n + ".exp_avg"] = s.exp_avg();
    opt[n + ".exp_avg_sq"] = s.exp_avg_sq();
    opt[n + ".step"] = at::scalar_tensor(s.step(), at::kLong);
  }
  io::save_safetensors(join_path(tmp, kOptimizerFile), opt, {{"format", "mola.adamw"}});

  std::map<std::string, at::Tensor> rng;
  {
    at::Generator cpu = default_generator(at::kCPU);
    std::lock_guard<std::mutex> lock(cpu.mutex());
    rng["cpu"] = cpu.get_state();
  }
  if (device.is_cuda()) {
    at::Generator cuda = default_generator(device);
    std::lock_guard<std::mutex> lock(cuda.mutex());
    rng["cuda"] = cuda.get_state();
  }
  io::save_safetensors(join_path(tmp, kRngFile), rng);
  fault_point("checkpoint-write", state.step);

  nlohmann::json j;
  j["format"] = kFormatVersion;
  j["step"] = state.step;
  j["epoch"] = state.epoch;
  j["sampler"] = {{"epoch", state.sampler.epoch}, {"step", state.sampler.step}};
  j["total_steps"] = state.total_steps;
  // The schedule is LambdaLR's: its whole state is the step count; the
  // multiplier the next step uses is recorded for readers.
  j["scheduler"] = {{"last_step", state.step},
                    {"base_lr", options.lr},
                    {"next_multiplier",
                     lr_multiplier(options.schedule, state.step, options.warmup_steps, state.total_steps)}};
  j["num_examples"] = state.num_examples;
  j["tokens"] = state.tokens;
  j["elapsed_s"] = state.elapsed_s;
  j["train_loss"] = std::isfinite(state.train_loss) ? nlohmann::json(state.train_loss) : nlohmann::json(nullptr);
  j["eval_loss"] = state.eval_loss ? nlohmann::json(*state.eval_loss) : nlohmann::json(nullptr);
  j["rng"] = {{"file", kRngFile}, {"cuda", device.is_cuda()}};
  j["options"] = options.to_json();
  write_text(join_path(tmp, kTrainerStateFile), j.dump(2));

  // The rename is the commit. An older checkpoint of the same step (a run
  // resumed from before it) is moved aside first: rename() cannot replace a
  // non-empty directory.
  if (path_exists(final_dir)) {
    const std::string old = join_path(root, name + ".old-" + std::to_string(::getpid()));
    remove_tree(old);
    rename_path(final_dir, old);
    rename_path(tmp, final_dir);
    remove_tree(old);
  } else {
    rename_path(tmp, final_dir);
  }
  return final_dir;
}

TrainState read_train_state(const std::string& checkpoint_dir) {
  const nlohmann::json j = read_state_json(checkpoint_dir);
  TrainState s;
  try {
    s.step = j.at("step").get<int64_t>();
    s.epoch = j.at("epoch").get<double>();
    s.sampler = {j.at("sampler").at("epoch").get<int64_t>(), j.at("sampler").at("step").get<int64_t>()};
    s.total_steps = j.at("total_steps").get<int64_t>();
    s.num_examples = j.at("num_examples").get<int64_t>();
    s.tokens = j.at("tokens").get<int64_t>();
    s.elapsed_s = j.at("elapsed_s").get<double>();
    if (j.at("train_loss").is_number()) s.train_loss = j.at("train_loss").get<double>();
    if (j.at("eval_loss").is_number()) s.eval_loss = j.at("eval_loss").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("resume: " + join_path(checkpoint_dir, kTrainerStateFile) + " is malformed (" +
                      e.what() + "); resume from an earlier checkpoint");
  }
  return s;
}

TrainOptions read_checkpoint_options(const std::string& checkpoint_dir) {
  return TrainOptions::from_json(read_state_json(checkpoint_dir).at("options"));
}

void load_optimizer_state(const std::string& checkpoint_dir, torch::optim::AdamW& optimizer,
                          const Trainable& trainable) {
  const std::string path = join_path(checkpoint_dir, kOptimizerFile);
  const auto file = io::SafetensorsFile::open(path);
  size_t used = 0;
  for (size_t i = 0; i < trainable.params.size(); ++i) {
    const std::string& n = trainable.names[i];
    const at::Tensor& p = trainable.params[i];
    if (!file.contains(n + ".exp_avg")) continue;  // no state saved: the parameter had not been stepped
    auto state = std::make_unique<torch::optim::AdamWParamState>();
    for (const char* part : {".exp_avg", ".exp_avg_sq"}) {
      const auto& info = file.info(n + part);
      if (at::IntArrayRef(info.shape) != p.sizes())
        throw std::invalid_argument("resume: " + path + ": " + n + part + " has shape " +
                                    c10::str(at::IntArrayRef(info.shape)) + " but the parameter has " +
                                    c10::str(p.sizes()) + "; the checkpoint was made for another adapter");
    }
    state->exp_avg(file.get(n + ".exp_avg", p.scalar_type(), p.device()));
    state->exp_avg_sq(file.get(n + ".exp_avg_sq", p.scalar_type(), p.device()));
    state->step(file.get(n + ".step").item<int64_t>());
    optimizer.state()[p.unsafeGetTensorImpl()] = std::move(state);
    used += 3;
  }
  if (used != file.names().size())
    throw std::invalid_argument("resume: " + path + " holds " + std::to_string(file.names().size()) +
                                " tensors but only " + std::to_string(used) +
                                " belong to the model's trainable parameters; the checkpoint was made for another "
                                "adapter (other targets or layers)");
}

void restore_rng_state(const std::string& checkpoint_dir, const at::Device& device) {
  const auto file = io::SafetensorsFile::open(join_path(checkpoint_dir, kRngFile));
  {
    at::Generator cpu = default_generator(at::kCPU);
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(file.get("cpu"));
  }
  if (device.is_cuda() && file.contains("cuda")) {
    at::Generator cuda = default_generator(device);
    std::lock_guard<std::mutex> lock(cuda.mutex());
    cuda.set_state(file.get("cuda"));
  }
}

void trim_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    // A line cut short by a kill does not parse (or has no newline and no
    // step); either way it is not a complete record.
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (in.eof() || !j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  in.close();
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  write_text(tmp, kept);
  rename_path(tmp, path);
}

void remove_stale_temporaries(const std::string& output_dir) {
  static const std::regex pattern("(step-[0-9]{1,18})\\.(tmp|old)-([0-9]{1,9})");
  const std::string root = checkpoints_dir(output_dir);
  for (const auto& name : list_dir(root)) {
    std::smatch m;
    if (!std::regex_match(name, m, pattern)) continue;
    const pid_t pid = static_cast<pid_t>(std::stoll(m[3].str()));
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // its writer may still be running
    const std::string path = join_path(root, name), final_dir = join_path(root, m[1].str());
    if (m[2].str() == "old" && !path_exists(final_dir) && path_exists(join_path(path, kTrainerStateFile)))
      rename_path(path, final_dir);
    else
      remove_tree(path);
  }
}

void fault_point(const char* point, int64_t step) {
  const char* spec = std::getenv("MOLA_FAULT_INJECT");
  if (spec == nullptr || *spec == '\0') return;
  static const std::regex pattern("kill:(step|checkpoint-write):step=([0-9]{1,18})");
  std::cmatch m;
  if (!std::regex_match(spec, m, pattern))
    throw std::invalid_argument(std::string("MOLA_FAULT_INJECT is '") + spec +
                                "'; the testing hook expects kill:step:step=N or kill:checkpoint-write:step=N "
                                "(unset it outside tests)");
  if (m[1].str() == point && std::stoll(m[2].str()) == step) ::kill(::getpid(), SIGKILL);
}

void prune_checkpoints(const std::string& output_dir, int64_t limit) {
  if (limit <= 0) return;
  auto all = list_checkpoints(output_dir);
  for (size_t i = 0; i + static_cast<size_t>(limit) < all.size(); ++i) remove_tree(all[i].second);
}

}  // namespace detail
}  // namespace mola::train
