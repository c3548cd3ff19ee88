// The `mola` command line (mola/train/run.h, run_command), in the library so
// that the C++ program (src/cli/main.cpp) and `python -m mola` (through the
// bindings) are one implementation:
//   mola train RECIPE [--set KEY=VALUE ...]
//   mola eval RECIPE [--adapter DIR] [--split test|validation|FILE] [--set ...]
//   mola generate RECIPE|MODEL_DIR --prompt TEXT [--adapter DIR] [--raw] [--max-new-tokens N]
//                 [--sample] [--temperature T] [--top-p P] [--seed S] [--set ...]
//   mola convert llama2c IN.bin OUT_DIR [--tokenizer TOKENIZER.model]
// User errors (arguments, recipes, files) print one line and return 2; a run
// that fails (a NaN loss, an error inside torch) returns 1. `mola train` joins
// the process group it is given (python -m mola under torchrun, design.md 11).
#include "mola/train/run.h"

#include <mola/data/tokenizer.h>
#include <mola/io/llama2c.h>
#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/train/trainer.h>

#include <c10/util/Exception.h>
#include <sys/stat.h>

#include <cstdlib>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

namespace mola::train {
namespace {

constexpr const char* kUsage =
    "usage: mola <command> ...\n"
    "  mola train RECIPE [--set KEY=VALUE ...]          fine-tune as the recipe says (configs/recipes/)\n"
    "  mola eval RECIPE [--adapter DIR] [--split test|validation|FILE] [--set ...]\n"
    "                                                   accuracy by generation and by option log-likelihood\n"
    "  mola generate RECIPE|MODEL_DIR --prompt TEXT [--adapter DIR] [--raw] [--max-new-tokens N]\n"
    "                [--sample] [--temperature T] [--top-p P] [--seed S] [--set ...]\n"
    "  mola convert llama2c IN.bin OUT_DIR [--tokenizer TOKENIZER.model]\n"
    "                                                   a llama2.c checkpoint to a Hugging Face directory\n"
    "  mola convert mola-authors IN OUT [--top-k K]     (python -m mola only) the MoLA authors' adapter\n"
    "  mola report OUT_DIR                              (python -m mola only) plots and a page for a run\n"
    "  mola analyze ADAPTER [--data FILE] [--model DIR] [--out DIR] [--max-examples N]\n"
    "                                                   (python -m mola only) expert redundancy and routing\n";

// A user error: printed as one line, exit status 2.
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct Args {
  std::vector<std::string> positional;
  std::vector<std::string> overrides;
  std::map<std::string, std::string> options;  // --name value
  std::set<std::string> flags;                 // --name
};

// Parses `args` after the subcommand. value_options take a value; flag_options
// do not; anything else starting with -- is an error naming the valid ones.
Args parse(const std::vector<std::string>& args, size_t first, const std::set<std::string>& value_options,
           const std::set<std::string>& flag_options) {
  Args out;
  for (size_t i = first; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0 || a == "--") {
      out.positional.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    const auto eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (name == "set" || value_options.count(name)) {
      if (!inline_value) {
        if (i + 1 >= args.size()) throw UsageError("--" + name + " needs a value");
        value = args[++i];
      }
      if (name == "set") out.overrides.push_back(value);
      else out.options[name] = value;
    } else if (flag_options.count(name) && !inline_value) {
      out.flags.insert(name);
    } else {
      std::vector<std::string> valid{"set"};
      valid.insert(valid.end(), value_options.begin(), value_options.end());
      valid.insert(valid.end(), flag_options.begin(), flag_options.end());
      throw UsageError("unknown option --" + name + "; did you mean --" + detail::nearest_name(name, valid) + "?");
    }
  }
  return out;
}

std::string option(const Args& a, const std::string& name, const std::string& fallback = "") {
  const auto it = a.options.find(name);
  return it == a.options.end() ? fallback : it->second;
}

template <class T>
T number(const Args& a, const std::string& name, T fallback) {
  const auto it = a.options.find(name);
  if (it == a.options.end()) return fallback;
  std::istringstream in(it->second);
  T v{};
  if (!(in >> v) || !in.eof()) throw UsageError("--" + name + " must be a number, got '" + it->second + "'");
  return v;
}

void expect_positional(const Args& a, size_t n, const std::string& what) {
  if (a.positional.size() != n)
    throw UsageError("expected " + what + ", got " + std::to_string(a.positional.size()) +
                     " positional argument(s); see mola --help");
}

bool is_model_dir(const std::string& p) {
  struct stat st {};
  return ::stat((p + "/config.json").c_str(), &st) == 0;
}

int cmd_train(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  const Args a = parse(args, 1, {}, {});
  expect_positional(a, 1, "mola train RECIPE");
  const Recipe recipe = Recipe::from_file(a.positional[0], a.overrides);
  const nlohmann::json summary = run_train(recipe, group);
  if (group && group->getRank() != 0) return 0;  // rank 0 reports
  std::cout << "adapter: " << summary["adapter"].get<std::string>() << "\n";
  if (summary.contains("eval")) std::cout << "eval: " << summary["eval"].dump() << "\n";
  if (summary.contains("continual"))
    for (const char* method : {"generate", "loglik"})
      if (summary["continual"].contains(method))
        std::cout << "continual (" << method << "): OP " << summary["continual"][method]["OP"].get<double>()
                  << ", PD " << summary["continual"][method]["PD"].get<double>() << "\n";
  std::cout << "outputs: " << recipe.output_dir << "\n";
  return 0;
}

int cmd_eval(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"adapter", "split"}, {});
  expect_positional(a, 1, "mola eval RECIPE");
  const Recipe recipe = Recipe::from_file(a.positional[0], a.overrides);
  const nlohmann::json out = run_eval(recipe, option(a, "adapter"), option(a, "split", "test"));
  std::cout << out.dump(2) << "\n";
  return 0;
}

int cmd_generate(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"adapter", "prompt", "max-new-tokens", "temperature", "top-p", "seed"},
                       {"raw", "sample"});
  expect_positional(a, 1, "mola generate RECIPE|MODEL_DIR --prompt TEXT");
  if (!a.options.count("prompt")) throw UsageError("mola generate needs --prompt TEXT");
  const std::string& target = a.positional[0];
  std::shared_ptr<models::CausalLMImpl> model;
  std::string tokenizer, text = option(a, "prompt");
  if (is_model_dir(target)) {
    if (!a.overrides.empty()) throw UsageError("--set applies to recipes; " + target + " is a model directory");
    model = models::CausalLMImpl::from_pretrained(target);
    tokenizer = target + "/tokenizer.model";
  } else {
    const Recipe recipe = Recipe::from_file(target, a.overrides);
    model = load_model(recipe);
    tokenizer = recipe.tokenizer_path();
    if (!a.flags.count("raw")) text = load_template(recipe).prompt(text, "");
  }
  if (a.options.count("adapter")) models::load_adapter(*model, option(a, "adapter"));
  model->eval();
  const data::Tokenizer tok = data::Tokenizer::from_file(tokenizer);
  const std::vector<int64_t> ids = tok.encode(text, /*add_bos=*/true);
  models::GenerateOptions g;
  g.max_new_tokens = number<int64_t>(a, "max-new-tokens", 128);
  const int64_t positions = model->config().max_position_embeddings;
  if (static_cast<int64_t>(ids.size()) + g.max_new_tokens > positions)
    throw UsageError("the prompt is " + std::to_string(ids.size()) + " tokens and --max-new-tokens " +
                     std::to_string(g.max_new_tokens) + " more would pass the model's max_position_embeddings (" +
                     std::to_string(positions) + "); shorten the prompt or lower --max-new-tokens");
  g.do_sample = a.flags.count("sample") > 0;
  g.temperature = number<double>(a, "temperature", 1.0);
  g.top_p = number<double>(a, "top-p", 1.0);
  if (a.options.count("seed")) g.seed = number<uint64_t>(a, "seed", 0);
  const at::Device device = model->model->embed_tokens->weight.device();
  const at::Tensor input = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({1, -1}).to(device);
  const at::Tensor out = model->generate(input, g).cpu();  // [1, prompt + new]
  const int64_t* p = out.data_ptr<int64_t>();
  std::cout << tok.decode(std::vector<int64_t>(p + ids.size(), p + out.size(1))) << "\n";
  return 0;
}

int cmd_convert(const std::vector<std::string>& args) {
  const Args a = parse(args, 1, {"tokenizer"}, {});
  if (!a.positional.empty() && a.positional[0] == "mola-authors")
    throw UsageError("mola convert mola-authors is part of the Python package (the authors' adapter_model.bin is "
                     "read with torch.load(weights_only=True)): python -m mola convert mola-authors IN OUT");
  if (a.positional.empty() || a.positional[0] != "llama2c")
    throw UsageError("mola convert: the supported format is llama2c: mola convert llama2c IN.bin OUT_DIR "
                     "[--tokenizer TOKENIZER.model]");
  if (a.positional.size() != 3) throw UsageError("usage: mola convert llama2c IN.bin OUT_DIR [--tokenizer T.model]");
  const std::string tokenizer = option(a, "tokenizer");
  io::convert_llama2c(a.positional[1], tokenizer.empty() ? io::default_llama2c_tokenizer(a.positional[1]) : tokenizer,
                      a.positional[2]);
  std::cout << "wrote " << a.positional[2] << " (config.json, model.safetensors, tokenizer.model)\n";
  return 0;
}

// Bad arguments, recipes, configs and files (exit status 2), as opposed to a
// run that failed (1). ConfigError, DataError, UsageError, ModelConfigError
// and Llama2cError are std::invalid_argument.
bool is_user_error(const std::exception& e) {
  return dynamic_cast<const std::invalid_argument*>(&e) != nullptr ||
         dynamic_cast<const models::ModelFileNotFoundError*>(&e) != nullptr ||
         dynamic_cast<const data::DataFileNotFoundError*>(&e) != nullptr ||
         dynamic_cast<const io::Llama2cFileNotFoundError*>(&e) != nullptr ||
         dynamic_cast<const io::SafetensorsError*>(&e) != nullptr;
}

// The message as one line: the command's contract is one line on stderr.
std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (char& ch : s)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return s;
}

// The world size a launcher (torchrun) announced, or 1.
int launcher_world_size() {
  const char* v = std::getenv("WORLD_SIZE");
  if (v == nullptr) return 1;
  try {
    return std::stoi(v);
  } catch (const std::exception&) {
    return 1;
  }
}

}  // namespace

int run_command(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  const std::string& cmd = args[0];
  try {
    if (cmd == "train" && !group && launcher_world_size() > 1)
      throw UsageError("WORLD_SIZE is " + std::to_string(launcher_world_size()) +
                       " but this mola program cannot join a torch.distributed group (the LibTorch wheel ships no "
                       "Gloo headers to create one from C++): launch `torchrun --nproc_per_node=N -m mola train "
                       "RECIPE` (python -m mola creates the group), or from C++ pass your own c10d::ProcessGroup to "
                       "mola::Trainer::set_process_group");
    if (cmd != "train" && group && group->getSize() > 1)
      throw UsageError("mola " + cmd + " runs in one process; only mola train joins a process group (run it "
                       "without torchrun)");
    if (cmd == "train") return cmd_train(args, group);
    if (cmd == "eval") return cmd_eval(args);
    if (cmd == "generate") return cmd_generate(args);
    if (cmd == "convert") return cmd_convert(args);
    const std::vector<std::string> commands{"train", "eval", "generate", "convert", "report", "analyze"};
    if (cmd == "report") throw UsageError("mola report is part of the Python package: python -m mola report OUT_DIR");
    if (cmd == "analyze")
      throw UsageError("mola analyze is part of the Python package (its plots are matplotlib's): python -m mola "
                       "analyze ADAPTER [--data FILE] [--model DIR] [--out DIR] [--max-examples N]");
    throw UsageError("unknown command '" + cmd + "'; did you mean '" + detail::nearest_name(cmd, commands) +
                     "'? (commands: train, eval, generate, convert; mola --help)");
  } catch (const NonFiniteLossError& e) {
    std::cerr << "mola: " << one_line(e.what()) << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "mola: error: " << one_line(e.what_without_backtrace()) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mola: error: " << one_line(e.what()) << "\n";
    return is_user_error(e) ? 2 : 1;
  }
}

}  // namespace mola::train
