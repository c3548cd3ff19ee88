// run_train, run_eval, load_model (mola/train/run.h): a recipe from files on
// disk to a trained adapter, its evaluation and the numbers the report plots.
// The command line itself is in src/train/command.cpp.
#include "mola/train/run.h"

#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/train/evaluate.h>
#include <mola/train/trainer.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
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

// Writes `j` to path via a temporary name and a rename (design.md 10).
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

int64_t trainable_parameters(const models::CausalLMImpl& model) {
  int64_t n = 0;
  for (const auto& p : model.parameters())
    if (p.requires_grad()) n += p.numel();
  return n;
}

}  // namespace

std::shared_ptr<models::CausalLMImpl> load_model(const Recipe& recipe) {
  const at::Device device(recipe.model.device);
  std::shared_ptr<models::CausalLMImpl> model;
  if (!recipe.model.path.empty()) {
    model = models::CausalLMImpl::from_pretrained(recipe.resolve_path(recipe.model.path),
                                                  dtype_of(recipe.model.dtype), device);
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

nlohmann::json run_train(const Recipe& recipe) {
  if (recipe.data.train.empty())
    throw ConfigError("recipe " + recipe.source + ": 'data.train' is required to train (a JSON Lines file)");
  make_dirs(recipe.output_dir);
  write_json(recipe.output_dir + "/recipe.json", recipe.json);

  auto model = load_model(recipe);
  const data::Tokenizer tok = data::Tokenizer::from_file(recipe.tokenizer_path());
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
  if (recipe.train.init_adapter.empty()) model->attach(recipe.adapter);
  else models::load_adapter(*model, recipe.resolve_path(recipe.train.init_adapter));
  TrainOptions options = recipe.train;
  options.init_adapter.clear();  // loaded above, with the model's adapter config

  nlohmann::json eval = nlohmann::json::object();
  const bool scored = !test_rows.empty() && test_rows.front().options.size() > 0;
  if (scored && recipe.eval_before_training) {
    std::cerr << "mola: evaluating " << test_rows.size() << " rows before training\n";
    eval["before"] = evaluate(*model, tok, tmpl, test_rows, recipe.eval).to_json();
  }

  Trainer trainer(model, options, recipe.output_dir);
  if (!val_rows.empty() && val_rows.front().options.size() > 0)
    trainer.set_eval_callback([&](int64_t) { return evaluate(*model, tok, tmpl, val_rows, recipe.eval).to_json(); });
  const TrainResult result = trainer.fit(train, validation);

  const std::string adapter_dir = recipe.output_dir + "/adapter";
  models::save_adapter(*model, adapter_dir);
  if (scored) {
    std::cerr << "mola: evaluating " << test_rows.size() << " rows\n";
    const EvalResult after = evaluate(*model, tok, tmpl, test_rows, recipe.eval);
    eval["after"] = after.to_json();
    write_json(recipe.output_dir + "/eval.json", eval);
  }
  const std::vector<data::Example>& routed = validation.empty() ? train : validation;
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
  return summary;
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
