// Recipes (mola/train/recipe.h): reading, overriding and validating the JSON
// file behind `mola train|eval|generate`. The adapter, train and eval
// sections are parsed by their own types (AdapterConfig, TrainOptions,
// EvalOptions); the model and data sections are small and parsed here.
#include "mola/train/recipe.h"

#include <mola/models/config.h>

#include "detail/text.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <type_traits>

namespace mola::train {
namespace {

using mola::detail::join;
using mola::detail::quote;

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  mola::detail::raise<ConfigError>(parts...);
}

bool exists(const std::string& p) {
  struct stat st {};
  return !p.empty() && ::stat(p.c_str(), &st) == 0;
}

std::string parent_dir(const std::string& p) {
  const auto slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

// Unknown keys of `j` (an object) are errors naming the nearest valid key.
void check_keys(const nlohmann::json& j, const std::string& section, const std::vector<std::string>& valid) {
  if (!j.is_object()) fail("recipe: ", quote(section), " must be a JSON object, got ", j.type_name());
  for (const auto& [key, value] : j.items()) {
    bool known = false;
    for (const auto& v : valid) known = known || v == key;
    if (!known)
      fail("recipe: unknown key ", quote(section.empty() ? key : section + "." + key), "; did you mean ",
           quote((section.empty() ? "" : section + ".") + mola::detail::nearest_name(key, valid)), "? (valid: ",
           join(valid), ")");
  }
}

template <class T>
T get(const nlohmann::json& j, const std::string& section, const std::string& key, const T& fallback) {
  if (!j.contains(key)) return fallback;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    // nlohmann converts a float to an integer with a plain cast, undefined
    // for 1e30 and silent for 2.5: an integer field takes integers only.
    const nlohmann::json& v = j.at(key);
    if (!v.is_number_integer() ||
        (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max()))) {
      fail("recipe: ", quote(section + "." + key), " must be a whole number (at most ",
           std::numeric_limits<T>::max(), "); got ", v.dump());
    }
  }
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    fail("recipe: ", quote(section + "." + key), " has the wrong type (", j.at(key).type_name(), "; got ",
         j.at(key).dump(), ")");
  }
}

ModelSection parse_model(const nlohmann::json& j) {
  check_keys(j, "model", ModelSection::keys());
  ModelSection m;
  m.path = get<std::string>(j, "model", "path", "");
  m.config = get<std::string>(j, "model", "config", "");
  m.dtype = get<std::string>(j, "model", "dtype", m.dtype);
  m.device = get<std::string>(j, "model", "device", m.device);
  m.quantize = get<std::string>(j, "model", "quantize", m.quantize);
  m.gradient_checkpointing = get<bool>(j, "model", "gradient_checkpointing", false);
  m.seed = get<int64_t>(j, "model", "seed", 0);
  if (m.path.empty() == m.config.empty())
    fail("recipe: give exactly one of 'model.path' (a checkpoint directory) and 'model.config' (an architecture "
         "file under configs/models, for random weights); got ",
         m.path.empty() ? "neither" : "both");
  if (m.dtype != "float32" && m.dtype != "bfloat16" && m.dtype != "float16")
    fail("recipe: 'model.dtype' must be float32, bfloat16 or float16, got ", quote(m.dtype));
  if (m.device != "cpu" && m.device.rfind("cuda", 0) != 0)
    fail("recipe: 'model.device' must be cpu, cuda or cuda:N, got ", quote(m.device));
  if (m.quantize != "none" && m.quantize != "nf4" && m.quantize != "int8")
    fail("recipe: 'model.quantize' must be none, nf4 or int8, got ", quote(m.quantize), "; did you mean ",
         quote(mola::detail::nearest_name(m.quantize, {"none", "nf4", "int8"})), "?");
  if (m.quantize != "none" && m.path.empty())
    fail("recipe: 'model.quantize' (", m.quantize, ") quantizes a checkpoint's weights as they load; it needs "
         "'model.path', not 'model.config'");
  return m;
}

DataSection parse_data(const nlohmann::json& j) {
  check_keys(j, "data", DataSection::keys());
  DataSection d;
  d.train = get<std::string>(j, "data", "train", "");
  d.validation = get<std::string>(j, "data", "validation", "");
  d.test = get<std::string>(j, "data", "test", "");
  d.task = get<std::string>(j, "data", "task", d.task);
  d.template_name = get<std::string>(j, "data", "template", d.template_name);
  d.options.cutoff_len = get<int64_t>(j, "data", "cutoff_len", d.options.cutoff_len);
  d.options.train_on_inputs = get<bool>(j, "data", "train_on_inputs", d.options.train_on_inputs);
  d.options.add_eos_token = get<bool>(j, "data", "add_eos_token", d.options.add_eos_token);
  d.max_train_examples = get<int64_t>(j, "data", "max_train_examples", 0);
  d.domains = get<std::vector<std::string>>(j, "data", "domains", {});
  d.domain_field = get<std::string>(j, "data", "domain_field", d.domain_field);
  if (!d.domains.empty() && d.domains.size() < 2)
    fail("recipe: 'data.domains' needs two or more domains for a continual-learning sequence, got 1");
  if (d.options.cutoff_len < 2) fail("recipe: 'data.cutoff_len' must be >= 2, got ", d.options.cutoff_len);
  if (d.max_train_examples < 0)
    fail("recipe: 'data.max_train_examples' must be >= 0 (0 = all), got ", d.max_train_examples);
  bool known_task = d.task == "auto" || d.task == "instruction";
  for (const auto& t : data::task_names()) known_task = known_task || t == d.task;
  if (!known_task) {
    std::vector<std::string> valid{"auto", "instruction"};
    for (const auto& t : data::task_names()) valid.push_back(t);
    fail("recipe: unknown 'data.task' ", quote(d.task), "; did you mean ", quote(mola::detail::nearest_name(d.task, valid)),
         "? (valid: ", join(valid), ")");
  }
  return d;
}

// A --set value is JSON text: numbers, true/false, null, lists, objects and
// "quoted" strings; anything that is not JSON is a string as written. Where
// the recipe has a string already, a bare number, true/false or null stays
// text too (output_dir=2024, experts=2468), while a list or an object is
// taken as JSON (experts=[2,2,4,6,8]).
nlohmann::json parse_override_value(const std::string& assignment, const std::string& text,
                                    const nlohmann::json* current) {
  nlohmann::json value;
  try {
    value = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception&) {
    // Python's spellings of the JSON literals: where a true/false (or nothing)
    // is expected, say how to write it instead of failing later on a string.
    const bool bool_field = current == nullptr || current->is_boolean();
    if (bool_field && (text == "True" || text == "False" || text == "TRUE" || text == "FALSE"))
      fail("--set ", quote(assignment), ": ", quote(text), " is not a JSON value; write ",
           text[0] == 'T' ? "true" : "false", " (JSON's lower case)");
    if (bool_field && text == "None")
      fail("--set ", quote(assignment), ": 'None' is not a JSON value; write null, or leave the key out");
    return text;
  }
  if (current != nullptr && current->is_string() && !value.is_array() && !value.is_object() && !value.is_string())
    return text;
  return value;
}

}  // namespace

const std::vector<std::string>& ModelSection::keys() {
  static const std::vector<std::string> k{"path",     "config", "dtype", "device", "quantize", "gradient_checkpointing",
                                          "seed"};
  return k;
}

const std::vector<std::string>& DataSection::keys() {
  static const std::vector<std::string> k{"train",      "validation",      "test",          "task",
                                          "template",   "cutoff_len",      "train_on_inputs", "add_eos_token",
                                          "max_train_examples", "domains", "domain_field"};
  return k;
}

const std::vector<std::string>& Recipe::keys() {
  static const std::vector<std::string> k{"comment", "model", "tokenizer", "adapter",
                                          "data",    "train", "eval",      "output_dir"};
  return k;
}

Recipe Recipe::from_json(const nlohmann::json& j, const std::string& source, const std::string& base_dir) {
  check_keys(j, "", keys());
  Recipe r;
  r.source = source;
  r.json = j;
  r.base_dir = base_dir;
  r.comment = get<std::string>(j, "", "comment", "");
  if (!j.contains("model")) fail("recipe ", source, ": the 'model' section is required");
  r.model = parse_model(j.at("model"));
  r.tokenizer = get<std::string>(j, "", "tokenizer", "");
  // Each section's own parser names the key; the prefix says where it was.
  auto section = [&](const char* name, auto&& parse) {
    try {
      parse(j.contains(name) ? j.at(name) : nlohmann::json::object());
    } catch (const ConfigError&) {
      throw;
    } catch (const std::invalid_argument& e) {
      fail("recipe: in '", name, "': ", e.what());
    }
  };
  section("adapter", [&](const nlohmann::json& s) {
    try {
      r.adapter = AdapterConfig::from_json(s);
    } catch (const ConfigError& e) {
      fail("recipe: in 'adapter': ", e.what());
    }
  });
  section("data", [&](const nlohmann::json& s) { r.data = parse_data(s); });
  section("train", [&](const nlohmann::json& s) {
    try {
      r.train = TrainOptions::from_json(s);
    } catch (const ConfigError& e) {
      fail("recipe: in 'train': ", e.what());
    }
  });
  section("eval", [&](const nlohmann::json& s) {
    // before_training is the run's, not EvalOptions': evaluate the test split
    // before training too (the untrained model's accuracy beside the trained).
    nlohmann::json options = s;
    if (options.is_object() && options.contains("before_training")) {
      r.eval_before_training = get<bool>(options, "eval", "before_training", false);
      options.erase("before_training");
    }
    // expert_load_examples is the run's too: how many rows the expert-load pass routes.
    if (options.is_object() && options.contains("expert_load_examples")) {
      r.expert_load_examples = get<int64_t>(options, "eval", "expert_load_examples", r.expert_load_examples);
      if (r.expert_load_examples < 0)
        fail("recipe: 'eval.expert_load_examples' must be >= 0 (0: every row), got ", r.expert_load_examples);
      options.erase("expert_load_examples");
    }
    try {
      r.eval = EvalOptions::from_json(options);
    } catch (const ConfigError& e) {
      fail("recipe: in 'eval': ", e.what());
    }
  });
  // With the architecture at hand (a bundled or downloaded checkpoint, or a
  // config file), the per-layer settings are checked too: top_k <= experts in
  // every layer, a preset that fits the layer count.
  const std::string arch = !r.model.config.empty() ? r.resolve_path(r.model.config)
                                                   : r.resolve_path(r.model.path) + "/config.json";
  if (exists(arch)) {
    const models::ModelConfig architecture = models::ModelConfig::from_json_file(arch);
    const int64_t layers = architecture.num_hidden_layers;
    if (r.data.options.cutoff_len > architecture.max_position_embeddings)
      fail("recipe: 'data.cutoff_len' ", r.data.options.cutoff_len, " is longer than the ",
           architecture.max_position_embeddings, " positions (max_position_embeddings) of ", arch,
           "; set data.cutoff_len to at most ", architecture.max_position_embeddings);
    try {
      r.adapter.resolve(layers);
    } catch (const ConfigError& e) {
      fail("recipe: in 'adapter' (for the ", layers, " layers of ", arch, "): ", e.what());
    }
  }
  r.output_dir = get<std::string>(j, "", "output_dir", r.output_dir);
  if (r.output_dir.empty()) fail("recipe: 'output_dir' must not be empty");
  return r;
}

Recipe Recipe::from_file(const std::string& path, const std::vector<std::string>& overrides) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    // Listed here rather than with train/checkpoint.h's list_dir: this file
    // stays free of torch headers (tests/fuzz builds it without them).
    std::vector<std::string> recipes;
    if (DIR* d = ::opendir(path.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() > 5 && name.compare(name.size() - 5, 5, ".json") == 0) recipes.push_back(name);
      }
      ::closedir(d);
    }
    std::sort(recipes.begin(), recipes.end());
    if (recipes.size() > 6) recipes.resize(6), recipes.push_back("...");
    fail("recipe: ", quote(path), " is a directory; give one recipe JSON file in it",
         recipes.empty() ? std::string(" (it holds none)") : mola::detail::cat(": ", join(recipes)));
  }
  std::ifstream in(path);
  if (!in) fail("recipe: cannot open ", quote(path), "; give the path of a recipe JSON file (see configs/recipes/)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    fail("recipe ", quote(path), " is not valid JSON: ", e.what());
  } catch (const nlohmann::json::out_of_range& e) {  // a number past double's range, such as 1e999
    fail("recipe ", quote(path), " holds a number out of range (", e.what(), "); write it within +-1.7e308");
  }
  for (const auto& o : overrides) apply_override(j, o);
  return from_json(j, path, parent_dir(path));
}

std::string Recipe::resolve_path(const std::string& p) const {
  if (p.empty() || p[0] == '/' || exists(p) || base_dir.empty()) return p;
  // The recipe's folder, then its parents: configs/recipes/tiny/x.json finds
  // data/ at the repository root.
  std::string dir = base_dir;
  for (int depth = 0; depth < 8; ++depth) {
    const std::string candidate = dir + "/" + p;
    if (exists(candidate)) return candidate;
    if (dir == "/" || dir == ".") break;
    const std::string up = parent_dir(dir);
    if (up == dir) break;
    dir = up;
  }
  return p;
}

std::string Recipe::template_path() const {
  if (data.template_name == "raw") return "";
  if (data.template_name.find('/') == std::string::npos && data.template_name.find(".json") == std::string::npos)
    return resolve_path("data/templates/" + data.template_name + ".json");
  return resolve_path(data.template_name);
}

std::string Recipe::tokenizer_path() const {
  if (!tokenizer.empty()) return resolve_path(tokenizer);
  if (!model.path.empty()) return resolve_path(model.path) + "/tokenizer.model";
  fail("recipe: 'tokenizer' is required when the model comes from 'model.config' (no checkpoint directory to find "
       "tokenizer.model in)");
}

void apply_override(nlohmann::json& recipe, const std::string& assignment) {
  // JSON text is UTF-8: a key or value that is not would make the recipe
  // impossible to write back (recipe.json) or to quote in a message.
  try {
    (void)nlohmann::json(assignment).dump();
  } catch (const nlohmann::json::type_error&) {
    fail("--set ", nlohmann::json(assignment).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
         ": not valid UTF-8 text; write the key and value in UTF-8");
  }
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    fail("--set ", quote(assignment), ": expected KEY=VALUE, for example train.lr=1e-4");
  const std::string key = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string part; std::getline(ss, part, '.');) {
    if (part.empty()) fail("--set ", quote(assignment), ": empty name in the key ", quote(key));
    parts.push_back(part);
  }
  bool known = false;
  for (const auto& k : Recipe::keys()) known = known || k == parts[0];
  if (!known)
    fail("--set ", quote(assignment), ": unknown section ", quote(parts[0]), "; did you mean ",
         quote(mola::detail::nearest_name(parts[0], Recipe::keys())), "? (valid: ", join(Recipe::keys()), ")");
  if (!recipe.is_object()) fail("--set ", quote(assignment), ": the recipe is not a JSON object");
  nlohmann::json* node = &recipe;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    nlohmann::json& next = (*node)[parts[i]];
    if (next.is_null()) next = nlohmann::json::object();
    if (!next.is_object())
      fail("--set ", quote(assignment), ": ", quote(parts[i]), " is a ", next.type_name(), ", not a section");
    node = &next;
  }
  const auto it = node->find(parts.back());
  (*node)[parts.back()] = parse_override_value(assignment, value, it == node->end() ? nullptr : &*it);
}

}  // namespace mola::train
