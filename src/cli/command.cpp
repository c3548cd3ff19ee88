// The `mola` command line (mola/cli.h, run_command), in the library so
// that the C++ program (src/cli/main.cpp) and `python -m mola` (through the
// bindings) are one implementation. The verbs are one table (verb_table()
// below, verbs() in mola/cli.h): each has its usage, options, an example and a handler,
// or is the Python package's (report, analyze, convert mola-authors), and
// the table gives `mola --help`, `mola VERB --help`, did-you-mean for a
// mistyped verb and the pointer to python -m mola for the Python verbs.
// User errors (arguments, recipes, files) print one line and return 2; a run
// that fails (a NaN loss, an error inside torch) returns 1. `mola train` joins
// the process group it is given (python -m mola under torchrun, docs/distributed.md).
#include "mola/cli.h"

#include <mola/train/run.h>

#include <mola/data/tokenizer.h>
#include <mola/io/llama2c.h>
#include <mola/io/safetensors.h>
#include <mola/models/adapter.h>
#include <mola/train/trainer.h>

#include "detail/text.h"

#include <c10/util/Exception.h>
#include <torch/headeronly/version.h>
#include <sys/stat.h>

#include <cstdlib>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

namespace mola::cli {
namespace {

using namespace mola::train;

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
    if (a == "-h") continue;  // help: answered before parsing
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
      throw UsageError("unknown option --" + name + "; did you mean --" + mola::detail::nearest_name(name, valid) +
                       "? (mola " + args[0] + " --help lists them)");
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

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

int cmd_train(const std::vector<std::string>& args, const Group& group) {
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

int cmd_eval(const std::vector<std::string>& args, const Group&) {
  const Args a = parse(args, 1, {"adapter", "split"}, {});
  expect_positional(a, 1, "mola eval RECIPE");
  const Recipe recipe = Recipe::from_file(a.positional[0], a.overrides);
  const nlohmann::json out = run_eval(recipe, option(a, "adapter"), option(a, "split", "test"));
  std::cout << out.dump(2) << "\n";
  return 0;
}

// The tokenizer file, checked, with a message that names both ways to give it.
std::string tokenizer_for_generate(const std::string& given, const std::string& fallback, const std::string& from) {
  const std::string path = given.empty() ? fallback : given;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw UsageError("no tokenizer at " + path + " (" + (given.empty() ? from : "--tokenizer") +
                     "); give the model's tokenizer.model with --tokenizer FILE, or set the recipe key 'tokenizer'");
  return path;
}

int cmd_generate(const std::vector<std::string>& args, const Group&) {
  const Args a = parse(args, 1, {"adapter", "prompt", "max-new-tokens", "temperature", "top-p", "seed", "tokenizer"},
                       {"raw", "sample"});
  expect_positional(a, 1, "mola generate RECIPE|MODEL_DIR --prompt TEXT");
  if (!a.options.count("prompt")) throw UsageError("mola generate needs --prompt TEXT (mola generate --help)");
  const std::string& target = a.positional[0];
  std::shared_ptr<models::CausalLMImpl> model;
  std::string tokenizer, text = option(a, "prompt");
  if (is_model_dir(target)) {
    if (!a.overrides.empty()) throw UsageError("--set applies to recipes; " + target + " is a model directory");
    tokenizer = tokenizer_for_generate(option(a, "tokenizer"), target + "/tokenizer.model",
                                       "the model directory's tokenizer.model");
    model = models::CausalLMImpl::from_pretrained(target);
  } else {
    const Recipe recipe = Recipe::from_file(target, a.overrides);
    tokenizer = tokenizer_for_generate(option(a, "tokenizer"), recipe.tokenizer_path(),
                                       recipe.tokenizer.empty() ? "the model directory's tokenizer.model"
                                                                : "the recipe's 'tokenizer'");
    model = load_model(recipe);
    if (!a.flags.count("raw")) text = load_template(recipe).prompt(text, "");
  }
  if (a.options.count("adapter")) models::load_adapter(*model, option(a, "adapter"));
  model->eval();
  const data::Tokenizer tok = data::Tokenizer::from_file(tokenizer);
  if (tok.vocab_size() > model->config().vocab_size)
    throw UsageError("the tokenizer " + tokenizer + " has " + std::to_string(tok.vocab_size()) +
                     " pieces but the model's vocabulary has " + std::to_string(model->config().vocab_size) +
                     "; give the model's own tokenizer.model with --tokenizer FILE");
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

int cmd_convert(const std::vector<std::string>& args, const Group&) {
  const Args a = parse(args, 1, {"tokenizer"}, {});
  if (!a.positional.empty() && a.positional[0] == "mola-authors")
    throw UsageError("mola convert mola-authors is part of the Python package (the authors' adapter_model.bin is "
                     "read with torch.load(weights_only=True)): python -m mola convert mola-authors IN OUT");
  if (a.positional.empty() || a.positional[0] != "llama2c")
    throw UsageError("mola convert: the supported formats are llama2c (here) and mola-authors (python -m mola): mola convert "
                     "llama2c IN.bin OUT_DIR [--tokenizer TOKENIZER.model]");
  if (a.positional.size() != 3) throw UsageError("usage: mola convert llama2c IN.bin OUT_DIR [--tokenizer T.model]");
  const std::string tokenizer = option(a, "tokenizer");
  io::convert_llama2c(a.positional[1], tokenizer.empty() ? io::default_llama2c_tokenizer(a.positional[1]) : tokenizer,
                      a.positional[2]);
  std::cout << "wrote " << a.positional[2] << " (config.json, model.safetensors, tokenizer.model)\n";
  return 0;
}

const std::vector<Verb>& verb_table() {
  static const std::vector<Verb> table{
      {"train", "RECIPE [--set KEY=VALUE ...]", "fine-tune as the recipe says (configs/recipes/)",
       "  --set KEY=VALUE  change one recipe key before the run (repeatable); VALUE is JSON (1e-4, true,\n"
       "                   [2,4,6,8], {\"a\": 1}) or else plain text (bfloat16)\n"
       "A fresh run refuses an output directory that holds a run already: --set train.resume=true continues it,\n"
       "--set train.overwrite_output_dir=true replaces it. Writes recipe.json, metrics.jsonl, checkpoints/,\n"
       "adapter/, eval.json, expert_load.json and summary.json into output_dir. Under torchrun, python -m mola\n"
       "train runs as one rank of the group.\n",
       "mola train configs/recipes/tiny/scienceqa-2468.json --set train.epochs=1 --set output_dir=out/try",
       &cmd_train, false},
      {"eval", "RECIPE [--adapter DIR] [--split test|validation|FILE] [--set KEY=VALUE ...]",
       "accuracy by generation and by option log-likelihood",
       "  --adapter DIR    an adapter directory (save_adapter's, or a run's output_dir/adapter); none: the base model\n"
       "  --split S        test (default), validation, or a JSON Lines file in the recipe's task format\n"
       "  --set KEY=VALUE  change one recipe key (eval.max_examples=100, eval.methods=[\"loglik\"], ...)\n",
       "mola eval configs/recipes/tiny/scienceqa-2468.json --adapter out/tiny/scienceqa-2468/adapter", &cmd_eval,
       false},
      {"generate",
       "RECIPE|MODEL_DIR --prompt TEXT [--adapter DIR] [--tokenizer FILE] [--raw] [--max-new-tokens N]\n"
       "              [--sample] [--temperature T] [--top-p P] [--seed S] [--set KEY=VALUE ...]",
       "continue a prompt (greedy, or sampled)",
       "  --prompt TEXT       the prompt; with a recipe it is put in the recipe's template unless --raw\n"
       "  --adapter DIR       load this adapter first\n"
       "  --tokenizer FILE    the SentencePiece tokenizer.model (default: the recipe's 'tokenizer', else the\n"
       "                      model directory's tokenizer.model)\n"
       "  --raw               use the prompt as it is, without the recipe's template\n"
       "  --max-new-tokens N  at most N new tokens (128)\n"
       "  --sample            sample instead of greedy; --temperature T (1.0), --top-p P (1.0), --seed S\n"
       "  --set KEY=VALUE     change one recipe key (with a recipe)\n",
       "mola generate data/models/stories260K --prompt \"Once upon a time\" --raw --max-new-tokens 32", &cmd_generate,
       false},
      {"convert", "llama2c IN.bin OUT_DIR [--tokenizer TOKENIZER.model]",
       "a llama2.c checkpoint to a Hugging Face directory (mola-authors: see python -m mola)",
       "  --tokenizer FILE  the tokenizer.model to copy beside it (default: tokenizer.model beside IN.bin)\n",
       "mola convert llama2c stories260K.bin out/stories260K", &cmd_convert, false},
      {"convert mola-authors", "IN OUT [--top-k K | --top-k K1,K2,...]",
       "an adapter the MoLA authors' code wrote, into mola's format",
       "  --top-k K         experts per token, one value for every layer or one per layer (K1,K2,...); the\n"
       "                    authors' files do not store it (2)\n",
       "python -m mola convert mola-authors their_run/ out/adapter --top-k 2", nullptr, true},
      {"report", "OUT_DIR", "plots and a page for a training run (loss, expert load, evaluation)", "",
       "python -m mola report out/tiny/scienceqa-2468", nullptr, true},
      {"analyze", "ADAPTER [--data FILE] [--model DIR] [--recipe R] [--out DIR] [--max-examples N]\n"
       "              [--batch-size N] [--device D]",
       "expert redundancy and routing of an adapter",
       "  --data FILE         JSON Lines rows in the recipe's task format: measure the routing on them\n"
       "  --model DIR         the base model (default: the run's recipe.json, else base_model_name)\n"
       "  --recipe R          the recipe the adapter was trained with (default: recipe.json beside it)\n"
       "  --out DIR           output directory (default: analysis/ beside the adapter)\n"
       "  --max-examples N    rows of --data to route (256; 0: all)\n"
       "  --batch-size N      rows per forward (8)\n"
       "  --device D          cpu, cuda or cuda:N (cpu)\n",
       "python -m mola analyze out/tiny/scienceqa-2468/adapter --data data/tasks/scienceqa/test.jsonl", nullptr,
       true},
  };
  return table;
}

// The table's verb for args ("convert mola-authors" is a verb of its own); nullptr when none.
const Verb* find_verb(const std::vector<std::string>& args) {
  for (const auto& v : verb_table()) {
    const std::string name = v.name;
    const auto space = name.find(' ');
    if (space == std::string::npos) {
      if (args[0] == name && !(name == "convert" && args.size() > 1 && args[1] == "mola-authors")) return &v;
    } else if (args.size() > 1 && args[0] == name.substr(0, space) && args[1] == name.substr(space + 1)) {
      return &v;
    }
  }
  return nullptr;
}

// The command's name where a verb is the Python package's.
std::string prog(const Verb& v) { return std::string(v.python_only ? "python -m mola " : "mola ") + v.name; }

std::string verb_help(const Verb& v) {
  std::string out = "usage: " + prog(v) + " " + v.synopsis + "\n\n" + v.summary + "\n";
  if (*v.options) out += std::string("\noptions:\n") + v.options;
  out += std::string("\nexample:\n  ") + v.example + "\n";
  if (v.python_only) out += "\n(part of the Python package: run it with python -m mola)\n";
  return out;
}

std::string version_text() {
  std::string out = "mola " MOLA_VERSION_STRING "\n";
  out += "torch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH) + " (LibTorch mola was built against)\n";
#ifdef MOLA_WITH_CUDA
  out += "CUDA kernels: built in (sm_80, sm_90); ";
  out += at::hasCUDA() ? std::to_string(at::getNumGPUs()) + " GPU(s) visible\n" : "no GPU visible here\n";
#else
  out += "CUDA kernels: not built (CPU only)\n";
#endif
  return out;
}

bool wants_help(const std::vector<std::string>& args) {
  for (const auto& a : args)
    if (a == "-h" || a == "--help") return true;
  return false;
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

const std::vector<Verb>& verbs() { return verb_table(); }

const Verb* verb_of(const std::vector<std::string>& args) { return args.empty() ? nullptr : find_verb(args); }

std::string usage() {
  std::string out = "usage: mola <command> ...\n\ncommands:\n";
  for (const auto& v : verb_table()) {
    std::string head = "  " + std::string(v.name);
    head.resize(std::max<size_t>(head.size() + 2, 25), ' ');
    out += head + v.summary + (v.python_only ? " (python -m mola)" : "") + "\n";
  }
  out += "\nmola COMMAND --help shows its options and an example; mola --version the build.\n";
  return out;
}

std::string help(const std::string& verb) {
  for (const auto& v : verb_table())
    if (verb == v.name) return verb_help(v);
  throw std::invalid_argument("no mola command '" + verb + "'");
}

int run_command(const std::vector<std::string>& args, const Group& group) {
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    if (args.size() == 2 && args[0] == "help") {
      const Verb* v = find_verb({args[1]});
      if (v != nullptr) {
        std::cout << verb_help(*v);
        return 0;
      }
    }
    (args.empty() ? std::cerr : std::cout) << usage();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version" || args[0] == "-V") {
    std::cout << version_text();
    return 0;
  }
  const std::string& cmd = args[0];
  try {
    const Verb* verb = find_verb(args);
    if (verb == nullptr) {
      std::vector<std::string> names;
      for (const auto& v : verb_table())
        if (std::string(v.name).find(' ') == std::string::npos) names.push_back(v.name);
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      throw UsageError("unknown command '" + cmd + "'; did you mean '" + mola::detail::nearest_name(cmd, names) +
                       "'? (commands: " + list + "; mola --help)");
    }
    if (wants_help(args)) {
      std::cout << verb_help(*verb);
      return 0;
    }
    if (verb->handler == nullptr)
      throw UsageError(prog(*verb) + " is part of the Python package: " + prog(*verb) + " " + verb->synopsis);
    if (cmd == "train" && !group && launcher_world_size() > 1)
      throw UsageError("WORLD_SIZE is " + std::to_string(launcher_world_size()) +
                       " but this mola program cannot join a torch.distributed group (the LibTorch wheel ships no "
                       "Gloo headers to create one from C++): launch `torchrun --nproc_per_node=N -m mola train "
                       "RECIPE` (python -m mola creates the group), or from C++ pass your own c10d::ProcessGroup to "
                       "mola::Trainer::set_process_group");
    if (cmd != "train" && group && group->getSize() > 1)
      throw UsageError("mola " + cmd + " runs in one process; only mola train joins a process group (run it "
                       "without torchrun)");
    return verb->handler(args, group);
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

}  // namespace mola::cli
