// run_train, run_eval, load_model (mola/train/run.h): a recipe from files on
// disk to a trained adapter, its evaluation and the numbers the report plots.
// The command line itself is in src/cli/command.cpp (mola/cli.h).
#include "mola/train/run.h"

#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/train/evaluate.h>
#include <mola/train/trainer.h>

#include "train/checkpoint.h"
#include "train/distributed.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <iostream>

namespace mola::train {
namespace {

void make_dirs(const std::string& dir) {
  std::string partial;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!partial.empty() && ::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
        throw std::runtime_error("cannot create the directory " + partial + ": " + std::strerror(errno));
    }
    if (i < dir.size()) partial += dir[i];
  }
}

// Writes `j` to path via a temporary name and a rename (docs/design.md, Reliability).
void write_json(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) throw std::runtime_error("cannot write " + tmp);
    out << j.dump(2) << "\n";
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

at::ScalarType dtype_of(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

std::vector<data::Row> load_split(const Recipe& recipe, const std::string& file) {
  return data::load_rows(recipe.resolve_path(file), recipe.data.task);
}

// The rows of an evaluation split: "test" and "validation" name the recipe's
// files, anything else is a JSON Lines path.
std::vector<data::Row> rows_of_split(const Recipe& recipe, const std::string& split) {
  const std::string file = split == "test" ? recipe.data.test : split == "validation" ? recipe.data.validation : split;
  if (file.empty())
    throw ConfigError("recipe " + recipe.source + ": no data." + split +
                      " file to evaluate; set it (--set data." + split + "=FILE.jsonl) or give another split");
  return load_split(recipe, file);
}

// A clear user error now, before hours of loading, when output_dir cannot be
// made: the nearest existing ancestor must be a writable directory. Creates
// nothing.
void check_output_dir(const Recipe& recipe) {
  std::string dir = recipe.output_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  for (std::string p = dir;;) {
    struct stat st {};
    if (::stat(p.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode))
        throw ConfigError("recipe " + recipe.source + ": 'output_dir' " + recipe.output_dir + " cannot be created: " +
                          p + " is a file, not a directory; choose another output_dir (--set output_dir=DIR)");
      if (::access(p.c_str(), W_OK | X_OK) != 0)
        throw ConfigError("recipe " + recipe.source + ": 'output_dir' " + recipe.output_dir + " cannot be written: " +
                          p + " is not writable (" + std::strerror(errno) +
                          "); choose another output_dir (--set output_dir=DIR) or fix its permissions");
      return;
    }
    const auto slash = p.find_last_of('/');
    if (slash == std::string::npos) return;  // relative: the working directory is the ancestor
    if (slash == 0) {
      if (p == "/") return;
      p = "/";
    } else {
      p = p.substr(0, slash);
    }
  }
}

// Everything a run of the mola command writes into its output directory
// (train, continual stages, report, analyze): a fresh run claims the
// directory only when none of these is there, or removes them when told to
// overwrite; other files are left alone.
const std::vector<std::string>& run_outputs() {
  static const std::vector<std::string> names{
      "recipe.json", "metrics.jsonl", "checkpoints", "adapter",     "eval.json",       "expert_load.json",
      "summary.json", "continual.json", "stage-*",   "report.html", "report.json",     "loss.png",
      "expert_load.png", "analysis"};
  return names;
}

void claim_output_dir(const Recipe& recipe, bool remove) {
  detail::claim_output_dir(recipe.output_dir, recipe.train, run_outputs(), "recipe " + recipe.source + ": ",
                           "--set train.resume=true", "--set train.overwrite_output_dir=true", remove);
}

// The tokenizer must number its pieces inside the model's vocabulary.
void check_tokenizer(const data::Tokenizer& tok, const models::CausalLMImpl& model, const Recipe& recipe) {
  if (tok.vocab_size() <= model.config().vocab_size) return;
  throw ConfigError("recipe " + recipe.source + ": the tokenizer " + recipe.tokenizer_path() + " has " +
                    std::to_string(tok.vocab_size()) + " pieces but the model's vocabulary has " +
                    std::to_string(model.config().vocab_size) +
                    " (vocab_size in config.json): they belong to different models; set 'tokenizer' to the "
                    "model's tokenizer.model (--set tokenizer=PATH)");
}

// Removes what a failed fresh run wrote (it claimed an empty directory, so
// nothing of anyone else's is there): the directory when the run made it,
// else the run's own files. A run that saved a checkpoint keeps everything,
// to be resumed.
void discard_failed_run(const std::string& dir, bool made_dir) {
  if (!detail::list_dir(detail::checkpoints_dir(dir)).empty()) return;
  try {
    if (made_dir) {
      detail::remove_tree(dir);
    } else {
      for (const auto& name : detail::list_dir(dir))
        for (const auto& o : run_outputs())
          if (name == o || (o.back() == '*' && name.rfind(o.substr(0, o.size() - 1), 0) == 0))
            detail::remove_tree(detail::join_path(dir, name));
    }
  } catch (const std::exception&) {
    // best effort: the run's own error is the one to report
  }
}

int64_t trainable_parameters(const models::CausalLMImpl& model) {
  int64_t n = 0;
  for (const auto& p : model.parameters())
    if (p.requires_grad()) n += p.numel();
  return n;
}

// "16 of 1221 test rows (eval.max_examples 16)" or "1221 test rows".
std::string eval_count(const Recipe& recipe, const std::vector<data::Row>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size()), m = recipe.eval.max_examples;
  if (m > 0 && m < n)
    return std::to_string(m) + " of " + std::to_string(n) + " test rows (eval.max_examples " + std::to_string(m) + ")";
  return std::to_string(n) + " test rows";
}

// run_train after its inputs are read and output_dir is claimed: the
// recipe.json, the evaluations, the Trainer, the adapter and the summary.
nlohmann::json train_and_report(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                std::shared_ptr<models::CausalLMImpl> model, const data::Tokenizer& tok,
                                const data::PromptTemplate& tmpl, const std::vector<data::Example>& train,
                                const std::vector<data::Example>& validation, const std::vector<data::Row>& val_rows,
                                const std::vector<data::Row>& test_rows, const TrainOptions& options) {
  const bool main = !group || group->getRank() == 0;
  if (main) write_json(recipe.output_dir + "/recipe.json", recipe.json);

  nlohmann::json eval = nlohmann::json::object();
  const bool scored = !test_rows.empty() && test_rows.front().options.size() > 0;
  if (scored && recipe.eval_before_training && main) {
    std::cerr << "mola: evaluating " << eval_count(recipe, test_rows) << " before training\n";
    eval["before"] = evaluate(*model, tok, tmpl, test_rows, recipe.eval).to_json();
  }

  Trainer trainer(model, options, recipe.output_dir);
  trainer.set_process_group(group);
  if (main && !val_rows.empty() && val_rows.front().options.size() > 0)
    trainer.set_eval_callback(
        [&](int64_t) { return evaluate(*model, tok, tmpl, val_rows, recipe.eval, /*progress=*/nullptr).to_json(); });
  const TrainResult result = trainer.fit(train, validation);

  const std::string adapter_dir = recipe.output_dir + "/adapter";
  const detail::Collective dist(group, model->model->embed_tokens->weight.device());
  if (!main) {
    dist.barrier();  // returns once rank 0 has written everything below
    return {{"recipe", recipe.source}, {"output_dir", recipe.output_dir}, {"adapter", adapter_dir},
            {"train", result.to_json()}, {"rank", dist.rank()}};
  }
  models::save_adapter(*model, adapter_dir);
  if (scored) {
    std::cerr << "mola: evaluating " << eval_count(recipe, test_rows) << "\n";
    const EvalResult after = evaluate(*model, tok, tmpl, test_rows, recipe.eval);
    eval["after"] = after.to_json();
    write_json(recipe.output_dir + "/eval.json", eval);
  }
  // Which experts the routers pick, on the validation rows (else the training
  // rows), at most eval.expert_load_examples of them.
  std::vector<data::Example> routed = validation.empty() ? train : validation;
  if (recipe.expert_load_examples > 0 && static_cast<int64_t>(routed.size()) > recipe.expert_load_examples)
    routed.resize(static_cast<size_t>(recipe.expert_load_examples));
  std::cerr << "mola: expert load on " << routed.size() << " " << (validation.empty() ? "training" : "validation")
            << " rows (eval.expert_load_examples " << recipe.expert_load_examples << ")\n";
  const nlohmann::json load = expert_load(*model, routed, recipe.train.micro_batch_size);
  write_json(recipe.output_dir + "/expert_load.json", load);

  nlohmann::json summary{{"recipe", recipe.source},
                         {"output_dir", recipe.output_dir},
                         {"adapter", adapter_dir},
                         {"train", result.to_json()},
                         {"train_examples", train.size()},
                         {"trainable_parameters", trainable_parameters(*model)}};
  if (!eval.empty()) summary["eval"] = eval;
  write_json(recipe.output_dir + "/summary.json", summary);
  dist.barrier();
  return summary;
}

}  // namespace

std::shared_ptr<models::CausalLMImpl> load_model(const Recipe& recipe) {
  const at::Device device(recipe.model.device);
  models::check_device(device, "recipe " + recipe.source + " asks for it in 'model.device'; run on the CPU with "
                               "--set model.device=cpu");
  std::shared_ptr<models::CausalLMImpl> model;
  if (!recipe.model.path.empty()) {
    model = models::CausalLMImpl::from_pretrained(recipe.resolve_path(recipe.model.path),
                                                  dtype_of(recipe.model.dtype), device,
                                                  quant::parse_kind(recipe.model.quantize));
  } else {
    torch::manual_seed(recipe.model.seed);
    model = std::make_shared<models::CausalLMImpl>(
        models::ModelConfig::from_json_file(recipe.resolve_path(recipe.model.config)));
    model->to(device, dtype_of(recipe.model.dtype));
  }
  model->set_gradient_checkpointing(recipe.model.gradient_checkpointing);
  return model;
}

data::PromptTemplate load_template(const Recipe& recipe) {
  const std::string path = recipe.template_path();
  return path.empty() ? data::PromptTemplate::raw() : data::PromptTemplate::from_json_file(path);
}

nlohmann::json run_train(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  if (recipe.data.train.empty())
    throw ConfigError("recipe " + recipe.source + ": 'data.train' is required to train (a JSON Lines file)");
  if (!recipe.data.domains.empty()) return run_continual(recipe, group);
  const bool main = !group || group->getRank() == 0;  // the rank that evaluates and writes
  // Every input is read and checked before anything is written, so a bad one
  // leaves no output directory behind (docs/design.md, Reliability), and a fresh run never
  // mixes with another one in the same directory.
  if (main) {
    check_output_dir(recipe);
    claim_output_dir(recipe, /*remove=*/false);
  }

  auto model = load_model(recipe);
  const data::Tokenizer tok = data::Tokenizer::from_file(recipe.tokenizer_path());
  check_tokenizer(tok, *model, recipe);
  const data::PromptTemplate tmpl = load_template(recipe);

  std::vector<data::Row> train_rows = load_split(recipe, recipe.data.train);
  if (recipe.data.max_train_examples > 0 && static_cast<int64_t>(train_rows.size()) > recipe.data.max_train_examples)
    train_rows.resize(static_cast<size_t>(recipe.data.max_train_examples));
  const std::vector<data::Example> train = data::tokenize_rows(train_rows, tmpl, tok, recipe.data.options);
  std::vector<data::Row> val_rows;
  std::vector<data::Example> validation;
  if (!recipe.data.validation.empty()) {
    val_rows = load_split(recipe, recipe.data.validation);
    validation = data::tokenize_rows(val_rows, tmpl, tok, recipe.data.options);
  }
  std::vector<data::Row> test_rows;
  if (!recipe.data.test.empty()) test_rows = load_split(recipe, recipe.data.test);

  // A fresh adapter leaves the model's outputs unchanged (B = 0), so the
  // "before" evaluation is the base model's (or init_adapter's) accuracy.
  // The adapter's random initialisation follows train.seed, whatever drew from
  // torch's generator before (torch.distributed's set-up does), so two runs of
  // one recipe are the same run (and a resumed one equals an uninterrupted one).
  torch::manual_seed(static_cast<uint64_t>(recipe.train.seed));
  if (recipe.train.init_adapter.empty()) model->attach(recipe.adapter);
  else models::load_adapter(*model, recipe.resolve_path(recipe.train.init_adapter), /*is_trainable=*/true);
  TrainOptions options = recipe.train;
  options.init_adapter.clear();      // loaded above, with the model's adapter config
  options.overwrite_output_dir = false;  // done here, for the whole run
  const bool fresh = std::holds_alternative<bool>(options.resume) && !std::get<bool>(options.resume);
  const bool made_dir = main && !detail::path_exists(recipe.output_dir);
  if (main) {
    claim_output_dir(recipe, /*remove=*/true);
    make_dirs(recipe.output_dir);
  }
  try {
    return train_and_report(recipe, group, model, tok, tmpl, train, validation, val_rows, test_rows, options);
  } catch (...) {
    // A fresh run that failed before its first checkpoint leaves nothing behind.
    if (main && fresh) discard_failed_run(recipe.output_dir, made_dir);
    throw;
  }
}

nlohmann::json run_eval(const Recipe& recipe, const std::string& adapter_dir, const std::string& split, bool write) {
  auto model = load_model(recipe);
  if (!adapter_dir.empty()) models::load_adapter(*model, recipe.resolve_path(adapter_dir));
  const data::Tokenizer tok = data::Tokenizer::from_file(recipe.tokenizer_path());
  const data::PromptTemplate tmpl = load_template(recipe);
  const std::vector<data::Row> rows = rows_of_split(recipe, split);
  nlohmann::json out = evaluate(*model, tok, tmpl, rows, recipe.eval).to_json();
  out["adapter"] = adapter_dir.empty() ? nlohmann::json(nullptr) : nlohmann::json(adapter_dir);
  out["split"] = split;
  if (write) {
    make_dirs(recipe.output_dir);
    const std::string name = split.find('/') == std::string::npos ? split : "file";
    write_json(recipe.output_dir + "/eval-" + name + ".json", out);
  }
  return out;
}

}  // namespace mola::train

namespace mola::train {

ContinualMetrics continual_metrics(const std::vector<std::vector<double>>& r) {
  const size_t T = r.size();
  if (T < 2) throw std::invalid_argument("continual_metrics: needs two or more stages, got " + std::to_string(T));
  for (const auto& row : r)
    if (row.size() != T)
      throw std::invalid_argument("continual_metrics: the accuracy matrix must be T x T (T = " + std::to_string(T) +
                                  "), a row has " + std::to_string(row.size()));
  ContinualMetrics m;
  for (size_t i = 0; i < T; ++i) m.op += r[T - 1][i] / static_cast<double>(T);
  double change = 0.0;
  for (size_t k = 1; k < T; ++k)
    for (size_t i = 0; i < k; ++i) change += r[k][i] - r[k - 1][i];
  m.pd = 2.0 * change / static_cast<double>(T * (T - 1));
  return m;
}

namespace {

// The rows of `file` whose domain_field is `domain`.
std::vector<data::Row> domain_rows(const Recipe& recipe, const std::string& file, const std::string& domain) {
  const std::string path = recipe.resolve_path(file);
  const std::vector<data::Row> rows = data::load_rows(path, recipe.data.task);
  const std::vector<std::string> domains = data::load_field(path, recipe.data.domain_field);
  std::vector<data::Row> out;
  for (size_t i = 0; i < rows.size(); ++i)
    if (domains[i] == domain) out.push_back(rows[i]);
  if (out.empty())
    throw ConfigError("recipe " + recipe.source + ": no rows of " + path + " have " + recipe.data.domain_field +
                      " = '" + domain + "'; check data.domains against the values of that field");
  return out;
}

}  // namespace

nlohmann::json run_continual(const Recipe& recipe, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  if (recipe.data.test.empty())
    throw ConfigError("recipe " + recipe.source + ": continual learning evaluates every domain after each stage; "
                      "set data.test");
  const bool main = !group || group->getRank() == 0;  // the rank that evaluates and writes
  if (main) {
    check_output_dir(recipe);
    claim_output_dir(recipe, /*remove=*/false);
  }
  auto model = load_model(recipe);
  const data::Tokenizer tok = data::Tokenizer::from_file(recipe.tokenizer_path());
  check_tokenizer(tok, *model, recipe);
  const data::PromptTemplate tmpl = load_template(recipe);
  const auto& domains = recipe.data.domains;
  std::vector<std::vector<data::Row>> test;
  for (const auto& d : domains) test.push_back(domain_rows(recipe, recipe.data.test, d));
  if (main) {
    claim_output_dir(recipe, /*remove=*/true);
    make_dirs(recipe.output_dir);
    write_json(recipe.output_dir + "/recipe.json", recipe.json);
  }

  // The adapter's random initialisation follows train.seed too, so two runs of
  // one recipe are the same run (and a resumed one equals an uninterrupted one).
  torch::manual_seed(static_cast<uint64_t>(recipe.train.seed));
  if (recipe.train.init_adapter.empty()) model->attach(recipe.adapter);
  else models::load_adapter(*model, recipe.resolve_path(recipe.train.init_adapter), /*is_trainable=*/true);
  TrainOptions options = recipe.train;
  options.init_adapter.clear();
  options.overwrite_output_dir = false;  // done above, for the whole run

  const size_t T = domains.size();
  std::map<std::string, std::vector<std::vector<double>>> accuracy;  // method -> R[t][i]
  nlohmann::json stages = nlohmann::json::array();
  for (size_t t = 0; t < T; ++t) {
    std::vector<data::Row> rows = domain_rows(recipe, recipe.data.train, domains[t]);
    if (recipe.data.max_train_examples > 0 && static_cast<int64_t>(rows.size()) > recipe.data.max_train_examples)
      rows.resize(static_cast<size_t>(recipe.data.max_train_examples));
    std::cerr << "mola: stage " << t + 1 << "/" << T << ": " << domains[t] << " (" << rows.size() << " rows)\n";
    // A fresh optimiser and schedule per domain, over the same adapter.
    std::string slug = domains[t];  // a folder name: letters and digits, the rest '-'
    for (char& c : slug)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '-';
    Trainer trainer(model, options, recipe.output_dir + "/stage-" + std::to_string(t + 1) + "-" + slug);
    trainer.set_process_group(group);
    const TrainResult result = trainer.fit(data::tokenize_rows(rows, tmpl, tok, recipe.data.options));
    nlohmann::json evals = nlohmann::json::object();
    for (size_t i = 0; main && i < T; ++i) {
      const EvalResult e = evaluate(*model, tok, tmpl, test[i], recipe.eval);
      evals[domains[i]] = e.to_json();
      for (const auto& method : e.methods) {
        auto& r = accuracy[method];
        r.resize(T, std::vector<double>(T, 0.0));
        r[t][i] = method == "generate" ? e.generate_accuracy : e.loglik_accuracy;
      }
    }
    stages.push_back({{"domain", domains[t]}, {"train", result.to_json()}, {"eval", evals}});
  }
  const detail::Collective dist(group, model->model->embed_tokens->weight.device());
  if (!main) {
    dist.barrier();  // returns once rank 0 has written everything below
    return {{"recipe", recipe.source}, {"output_dir", recipe.output_dir}, {"adapter", recipe.output_dir + "/adapter"},
            {"stages", stages}, {"rank", dist.rank()}};
  }
  models::save_adapter(*model, recipe.output_dir + "/adapter");
  nlohmann::json out{{"domains", domains}, {"domain_field", recipe.data.domain_field}, {"stages", stages}};
  for (const auto& [method, r] : accuracy) {
    const ContinualMetrics m = continual_metrics(r);
    out[method] = {{"accuracy", r}, {"OP", m.op}, {"PD", m.pd}};
  }
  write_json(recipe.output_dir + "/continual.json", out);
  dist.barrier();
  return {{"recipe", recipe.source}, {"output_dir", recipe.output_dir}, {"adapter", recipe.output_dir + "/adapter"},
          {"continual", out}};
}

}  // namespace mola::train
