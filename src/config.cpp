// AdapterConfig and ResolvedAdapter: JSON parsing, validation, resolution per
// layer and the papers' parameter count (docs/design.md, The MoLA layer; the
// presets and per-layer counts are src/presets.cpp). Deliberately free of torch (see config.h):
// every check here is about numbers a user typed, so each error names the
// value, the rule it broke and how to fix it.
#include "mola/config.h"

#include "detail/config_reader.h"
#include "detail/text.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

// No <filesystem>: the PyPI libtorch exports its own statically linked copies
// of std::filesystem (pytorch/pytorch#133437), which win symbol lookup in
// anything linked against it, and some crash (remove_all). stat() is enough here.

namespace mola {
namespace {

using nlohmann::json;
using namespace detail::config_reader;
using mola::detail::join;

std::string get_string(const json& j, const std::string& key, const char* example) {
  if (!j.at(key).is_string()) fail(key, " must be a string such as \"", example, "\"; got ", show(j.at(key)));
  return j.at(key).get<std::string>();
}

double get_number(const json& j, const std::string& key) {
  if (!j.at(key).is_number()) fail(key, " must be a number; got ", show(j.at(key)));
  return j.at(key).get<double>();
}

std::vector<std::string> get_string_list(const json& j, const std::string& key) {
  const json& v = j.at(key);
  if (!v.is_array()) fail(key, " must be a list of module names such as [\"q_proj\", \"v_proj\"]; got ", show(v));
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) fail(key, ": ", show(e), " is not a string; give module names such as \"q_proj\"");
    out.push_back(e.get<std::string>());
  }
  return out;
}

void check_one_of(const std::string& key, const std::string& value, const std::vector<std::string>& valid) {
  if (std::find(valid.begin(), valid.end(), value) == valid.end())
    fail(key, " ", json_string(value), " is not one of ", join(valid), "; ", did_you_mean(value, valid));
}

// Method "lora" is one expert routed with k = 1 in every layer: any other count
// in `field` is a contradiction the user has to resolve, not a value to override.
void check_single_expert(const std::string& field, const PerLayerSpec& spec, bool molex = false) {
  bool ok = false;
  if (const auto* v = std::get_if<int64_t>(&spec.value)) ok = *v == 1;
  if (const auto* list = std::get_if<std::vector<int64_t>>(&spec.value))
    ok = std::all_of(list->begin(), list->end(), [](int64_t n) { return n == 1; });
  if (!ok && molex)
    fail(field, " ", dump(spec.to_json()), " is not allowed with method \"molex\" over base_method \"lora\": a plain",
         " LoRA has one expert (", field, " 1); drop ", field, " or set base_method \"mola\"");
  if (!ok)
    fail(field, " ", dump(spec.to_json()), " is not allowed with method \"lora\": a plain LoRA has one expert",
         " and routes every token to it (", field, " 1); drop ", field, " or use method \"mola\"");
}

bool get_bool(const json& j, const std::string& key) {
  if (!j.at(key).is_boolean()) fail(key, " must be true or false; got ", show(j.at(key)));
  return j.at(key).get<bool>();
}

void check_keys(const json& j, const std::vector<std::string>& valid, const std::string& what) {
  if (!j.is_object()) fail(what, " must be a JSON object such as {\"experts\": 8}; got ", show(j));
  for (const auto& item : j.items())
    if (std::find(valid.begin(), valid.end(), item.key()) == valid.end())
      fail(what, ": unknown key ", json_string(item.key()), "; ", did_you_mean(item.key(), valid),
           " Valid keys: ", join(valid));
}

}  // namespace

// --------------------------------------------------------------- AdapterConfig

std::vector<std::string> AdapterConfig::default_targets() {
  return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
}

const std::vector<std::string>& AdapterConfig::keys() {
  // The keys of every config; MoLEx configs add molex_keys().
  static const std::vector<std::string> k = {"method",  "experts", "top_k",         "rank",   "alpha",
                                             "dropout", "dropout_masks", "targets", "aux_loss_coef", "compute",
                                             "init"};
  return k;
}

const std::vector<std::string>& AdapterConfig::dropout_masks_modes() {
  static const std::vector<std::string> m = {"per_expert", "shared"};
  return m;
}

const std::vector<std::string>& AdapterConfig::molex_keys() {
  static const std::vector<std::string> k = {"base_method",     "molex_pool",         "molex_alpha",
                                             "molex_alpha_learned", "molex_gate_grad", "molex_exclude_self",
                                             "molex_aux_loss_coef"};
  return k;
}

const std::vector<std::string>& AdapterConfig::molex_base_methods() {
  static const std::vector<std::string> m = {"lora", "mola"};
  return m;
}

const std::vector<std::string>& AdapterConfig::molex_pools() {
  static const std::vector<std::string> m = {"mean", "last", "token"};
  return m;
}

const std::vector<std::string>& AdapterConfig::molex_gate_grads() {
  static const std::vector<std::string> m = {"straight_through", "prob", "none"};
  return m;
}

const std::vector<std::string>& AdapterConfig::methods() {
  // "lora" is the same layer with one expert and k = 1 (docs/recipes.md);
  // "molex" mixes each layer with a gated second layer over either (docs/design.md, MoLEx).
  static const std::vector<std::string> m = {"mola", "lora", "molex"};
  return m;
}

const std::vector<std::string>& AdapterConfig::compute_modes() {
  static const std::vector<std::string> m = {"auto", "dense", "grouped"};
  return m;
}

const std::vector<std::string>& AdapterConfig::inits() {
  static const std::vector<std::string> m = {"kaiming", "gaussian", "pissa"};
  return m;
}

AdapterConfig AdapterConfig::for_method(const std::string& method, const std::string& base_method) {
  AdapterConfig c;
  c.method = method;
  if (method == "molex") c.base_method = base_method;
  if (method == "lora" || (method == "molex" && base_method == "lora")) c.experts = 1, c.top_k = 1;
  return c;
}

AdapterConfig AdapterConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) check_keys(j, keys(), "adapter config");  // names the expected form
  // The method (and MoLEx's base_method) pick the defaults of the other keys,
  // so they are read first. Only MoLEx configs take (and are offered) the MoLEx keys.
  const std::string method = j.contains("method") ? get_string(j, "method", "mola") : "mola";
  std::vector<std::string> valid = keys();
  if (method == "molex") valid.insert(valid.end(), molex_keys().begin(), molex_keys().end());
  else
    for (const auto& key : molex_keys())
      if (j.contains(key))
        fail(key, " is a MoLEx setting, but method is ", json_string(method), "; drop ", key,
             " or set method \"molex\" (with base_method ", json_string(method == "mola" ? "mola" : "lora"), ")");
  check_keys(j, valid, "adapter config");
  AdapterConfig c = for_method(method, j.contains("base_method") ? get_string(j, "base_method", "lora") : "lora");
  if (j.contains("experts")) c.experts = PerLayerSpec::from_json(j.at("experts"), "experts");
  if (j.contains("top_k")) c.top_k = PerLayerSpec::from_json(j.at("top_k"), "top_k");
  if (j.contains("rank")) c.rank = PerLayerSpec::from_json(j.at("rank"), "rank");
  if (j.contains("alpha")) c.alpha = get_number(j, "alpha");
  if (j.contains("dropout")) c.dropout = get_number(j, "dropout");
  if (j.contains("dropout_masks")) c.dropout_masks = get_string(j, "dropout_masks", "per_expert");
  if (j.contains("targets")) c.targets = get_string_list(j, "targets");
  if (j.contains("aux_loss_coef")) c.aux_loss_coef = get_number(j, "aux_loss_coef");
  if (j.contains("compute")) c.compute = get_string(j, "compute", "auto");
  if (j.contains("init")) c.init = get_string(j, "init", "kaiming");
  if (j.contains("molex_pool")) c.molex_pool = get_string(j, "molex_pool", "mean");
  if (j.contains("molex_alpha")) c.molex_alpha = get_number(j, "molex_alpha");
  if (j.contains("molex_alpha_learned")) c.molex_alpha_learned = get_bool(j, "molex_alpha_learned");
  if (j.contains("molex_gate_grad")) c.molex_gate_grad = get_string(j, "molex_gate_grad", "straight_through");
  if (j.contains("molex_exclude_self")) c.molex_exclude_self = get_bool(j, "molex_exclude_self");
  if (j.contains("molex_aux_loss_coef")) c.molex_aux_loss_coef = get_number(j, "molex_aux_loss_coef");
  c.validate();
  return c;
}

AdapterConfig AdapterConfig::from_json_string(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("adapter config is not valid JSON (byte ", e.byte, "): ", e.what(),
         "; check for a missing comma, quote or brace");
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    fail("adapter config holds a number out of range (", e.what(), "); write it within +-1.7e308");
  }
  return from_json(j);
}

AdapterConfig AdapterConfig::from_json_file(const std::string& path) {
  const std::string name = "adapter config file " + json_string(path);
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    char cwd[4096] = "?";
    if (::getcwd(cwd, sizeof(cwd)) == nullptr) cwd[0] = '?', cwd[1] = '\0';
    fail(name, " does not exist; check the path (a relative path starts at the working directory ", json_string(cwd), ")");
  }
  if (S_ISDIR(info.st_mode)) fail(name, " is a directory; give the JSON file inside it");
  std::ifstream in(path);
  if (!in) fail(name, " cannot be opened for reading; check its permissions");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    fail(name, " is not valid JSON (byte ", e.byte, "): ", e.what(), "; check for a missing comma, quote or brace");
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    fail(name, " holds a number out of range (", e.what(), "); write it within +-1.7e308");
  }
  try {
    return from_json(j);
  } catch (const ConfigError& e) {
    fail(path, ": ", e.what());
  }
}

nlohmann::json AdapterConfig::to_json() const {
  json j{{"method", method},   {"experts", experts.to_json()},   {"top_k", top_k.to_json()},
         {"rank", rank.to_json()}, {"alpha", alpha},             {"dropout", dropout},
         {"dropout_masks", dropout_masks},
         {"targets", targets}, {"aux_loss_coef", aux_loss_coef}, {"compute", compute},
         {"init", init}};
  // Only MoLEx configs carry the MoLEx keys: lora and mola JSON stays as it was.
  if (method == "molex") {
    j["base_method"] = base_method;
    j["molex_pool"] = molex_pool;
    j["molex_alpha"] = molex_alpha;
    j["molex_alpha_learned"] = molex_alpha_learned;
    j["molex_gate_grad"] = molex_gate_grad;
    j["molex_exclude_self"] = molex_exclude_self;
    j["molex_aux_loss_coef"] = molex_aux_loss_coef;
  }
  return j;
}

void AdapterConfig::validate() const {
  check_one_of("method", method, methods());
  experts.validate("experts", true);
  top_k.validate("top_k", false);
  if (method == "lora") {
    check_single_expert("experts", experts);
    check_single_expert("top_k", top_k);
  }
  validate_molex();
  rank.validate("rank", false);
  // Per-layer comparisons wait for resolve(); two plain ints can be compared now.
  if (top_k.is_int() && experts.is_int() && std::get<int64_t>(top_k.value) > std::get<int64_t>(experts.value))
    fail("top_k ", std::get<int64_t>(top_k.value), " exceeds experts ", std::get<int64_t>(experts.value),
         "; lower top_k or use more experts");
  if (!(std::isfinite(alpha) && alpha > 0))
    fail("alpha ", alpha, " must be a finite number > 0; the LoRA scaling is alpha / rank (default 16)");
  if (!(dropout >= 0 && dropout < 1))  // also rejects NaN
    fail("dropout ", dropout,
         " must satisfy 0 <= dropout < 1; it is the probability of zeroing a LoRA input (default 0.05)");
  if (targets.empty()) fail("targets is empty; list the linear layers to adapt, e.g. [\"q_proj\", \"v_proj\"]");
  for (auto it = targets.begin(); it != targets.end(); ++it) {
    if (it->empty())
      fail("targets[", it - targets.begin(), "] is an empty name; give module names such as \"q_proj\"");
    if (std::find(targets.begin(), it, *it) != it)
      fail("targets lists ", json_string(*it), " twice; give each module name once");
  }
  if (!(std::isfinite(aux_loss_coef) && aux_loss_coef >= 0))
    fail("aux_loss_coef ", aux_loss_coef,
         " must be a finite number >= 0; 0 turns the load-balancing loss off (default 0.001)");
  check_one_of("compute", compute, compute_modes());
  check_one_of("init", init, inits());
  check_one_of("dropout_masks", dropout_masks, dropout_masks_modes());
}

void AdapterConfig::validate_molex() const {
  if (method != "molex") {
    // The keys are refused by from_json; a C++ caller who set the fields gets the same answer here.
    const AdapterConfig d;
    const struct {
      const char* key;
      bool changed;
    } fields[] = {{"base_method", base_method != d.base_method},
                  {"molex_pool", molex_pool != d.molex_pool},
                  {"molex_alpha", molex_alpha != d.molex_alpha},
                  {"molex_alpha_learned", molex_alpha_learned != d.molex_alpha_learned},
                  {"molex_gate_grad", molex_gate_grad != d.molex_gate_grad},
                  {"molex_exclude_self", molex_exclude_self != d.molex_exclude_self},
                  {"molex_aux_loss_coef", molex_aux_loss_coef != d.molex_aux_loss_coef}};
    for (const auto& f : fields)
      if (f.changed)
        fail(f.key, " is a MoLEx setting, but method is ", json_string(method), "; leave ", f.key,
             " at its default or set method \"molex\"");
    return;
  }
  check_one_of("base_method", base_method, molex_base_methods());
  if (base_method == "lora") {
    check_single_expert("experts", experts, /*molex=*/true);
    check_single_expert("top_k", top_k, /*molex=*/true);
  }
  check_one_of("molex_pool", molex_pool, molex_pools());
  check_one_of("molex_gate_grad", molex_gate_grad, molex_gate_grads());
  if (molex_alpha_learned) {
    // sigmoid(a) never reaches 0 or 1, so a learned alpha must start inside.
    if (!(molex_alpha > 0 && molex_alpha < 1))
      fail("molex_alpha ", molex_alpha, " must satisfy 0 < molex_alpha < 1 when molex_alpha_learned is true (it ",
           "starts a sigmoid); give e.g. 0.5, or set molex_alpha_learned false for 0 or 1");
  } else if (!(molex_alpha >= 0 && molex_alpha <= 1)) {
    fail("molex_alpha ", molex_alpha, " must satisfy 0 <= molex_alpha <= 1; it weighs the layer's own block ",
         "against the chosen one (default 0.5; 1 is the base method)");
  }
  if (!(std::isfinite(molex_aux_loss_coef) && molex_aux_loss_coef >= 0))
    fail("molex_aux_loss_coef ", molex_aux_loss_coef,
         " must be a finite number >= 0; 0 turns the gates' balance loss off (default 0)");
}

ResolvedAdapter AdapterConfig::resolve(int64_t num_layers) const {
  check_num_layers(num_layers);
  validate();
  ResolvedAdapter r;
  r.method = method;
  r.num_layers = num_layers;
  r.experts = experts.resolve("experts", num_layers, true);
  r.top_k = top_k.resolve("top_k", num_layers, false);
  r.rank = rank.resolve("rank", num_layers, false);
  for (size_t l = 0; l < r.experts.size(); ++l) {
    if (r.top_k[l] > r.experts[l])
      fail("top_k ", r.top_k[l], " exceeds experts ", r.experts[l], " in layer ", l, " (model.layers.", l,
           "); lower top_k or give that layer more experts");
    r.scaling.push_back(alpha / static_cast<double>(r.rank[l]));
  }
  r.alpha = alpha;
  r.dropout = dropout;
  r.dropout_masks = dropout_masks;
  r.targets = targets;
  r.aux_loss_coef = aux_loss_coef;
  r.compute = compute;
  r.init = init;
  if (method == "molex") {
    if (molex_exclude_self && num_layers < 2)
      fail("molex_exclude_self is true but the model has ", num_layers,
           " layer, so no other layer is left to choose; set molex_exclude_self false");
    r.base_method = base_method;
    r.molex_pool = molex_pool;
    r.molex_alpha = molex_alpha;
    r.molex_alpha_learned = molex_alpha_learned;
    r.molex_gate_grad = molex_gate_grad;
    r.molex_exclude_self = molex_exclude_self;
    r.molex_aux_loss_coef = molex_aux_loss_coef;
  }
  return r;
}

int64_t AdapterConfig::num_parameters(const std::vector<LinearShape>& shapes, int64_t num_layers) const {
  return resolve(num_layers).num_parameters(shapes);
}

bool operator==(const AdapterConfig& a, const AdapterConfig& b) {
  return a.method == b.method && a.experts == b.experts && a.top_k == b.top_k && a.rank == b.rank &&
         a.alpha == b.alpha && a.dropout == b.dropout && a.dropout_masks == b.dropout_masks &&
         a.targets == b.targets &&
         a.aux_loss_coef == b.aux_loss_coef && a.compute == b.compute && a.init == b.init &&
         a.base_method == b.base_method && a.molex_pool == b.molex_pool && a.molex_alpha == b.molex_alpha &&
         a.molex_alpha_learned == b.molex_alpha_learned && a.molex_gate_grad == b.molex_gate_grad &&
         a.molex_exclude_self == b.molex_exclude_self && a.molex_aux_loss_coef == b.molex_aux_loss_coef;
}

// ------------------------------------------------------------- ResolvedAdapter

nlohmann::json ResolvedAdapter::to_json() const {
  json j{{"method", method}, {"num_layers", num_layers}, {"experts", experts},
         {"top_k", top_k},   {"rank", rank},             {"scaling", scaling},
         {"alpha", alpha},   {"dropout", dropout},       {"dropout_masks", dropout_masks},
         {"targets", targets}, {"aux_loss_coef", aux_loss_coef}, {"compute", compute}};
  if (!base_model_name.empty()) j["base_model_name"] = base_model_name;
  if (init != "kaiming") j["init"] = init;
  if (is_molex()) {  // as AdapterConfig::to_json: MoLEx keys for MoLEx adapters only
    j["base_method"] = base_method;
    j["molex_pool"] = molex_pool;
    j["molex_alpha"] = molex_alpha;
    j["molex_alpha_learned"] = molex_alpha_learned;
    j["molex_gate_grad"] = molex_gate_grad;
    j["molex_exclude_self"] = molex_exclude_self;
    j["molex_aux_loss_coef"] = molex_aux_loss_coef;
  }
  return j;
}

ResolvedAdapter ResolvedAdapter::from_json(const nlohmann::json& j) {
  std::vector<std::string> valid = AdapterConfig::keys();
  valid.insert(valid.begin() + 1, "num_layers");
  valid.insert(valid.begin() + 5, "scaling");
  valid.push_back("base_model_name");
  valid.insert(valid.end(), AdapterConfig::molex_keys().begin(), AdapterConfig::molex_keys().end());
  check_keys(j, valid, "resolved adapter config");
  int64_t num_layers = 0;
  if (!j.contains("num_layers") || !json_int(j.at("num_layers"), &num_layers))
    fail("resolved adapter config needs \"num_layers\", the model's number of transformer layers, as an integer; got ",
         j.contains("num_layers") ? show(j.at("num_layers")) : "no such key");
  json rest = j;
  for (const char* key : {"num_layers", "scaling", "base_model_name"}) rest.erase(key);
  ResolvedAdapter r = AdapterConfig::from_json(rest).resolve(num_layers);
  if (j.contains("base_model_name")) r.base_model_name = get_string(j, "base_model_name", "meta-llama/Llama-2-7b-hf");
  if (j.contains("scaling") && j.at("scaling") != json(r.scaling))
    fail("resolved adapter config: scaling ", show(j.at("scaling")), " is not alpha / rank ", show(json(r.scaling)),
         "; drop \"scaling\" or make it agree with alpha and rank");
  return r;
}

int64_t ResolvedAdapter::num_parameters(const std::vector<LinearShape>& shapes) const {
  // r is shared by every target of a layer, so the per-layer sum over targets of
  // r * (in + out) + in is r * sum_t (in + out) + sum_t in.
  int64_t in_plus_out = 0, in_only = 0;
  for (const auto& t : targets) {
    const LinearShape* found = nullptr;
    std::vector<std::string> given;
    for (const auto& s : shapes) {
      given.push_back(s.name);
      if (s.name != t) continue;
      if (found && (found->in_features != s.in_features || found->out_features != s.out_features))
        fail("num_parameters: two different shapes are given for ", json_string(t), "; give each target once");
      found = &s;
    }
    if (!found)
      fail("num_parameters: no shape is given for target ", json_string(t), "; pass a LinearShape for every name in targets",
           " (got: ", given.empty() ? "none" : join(given), ")");
    if (found->in_features < 1 || found->out_features < 1)
      fail("num_parameters: shape ", json_string(t), " is ", found->in_features, " -> ", found->out_features,
           "; in_features and out_features must be >= 1");
    in_plus_out += found->in_features + found->out_features;
    in_only += found->in_features;
  }
  int64_t total = 0;
  for (size_t l = 0; l < experts.size(); ++l) total += experts[l] * (rank[l] * in_plus_out + in_only);
  return total;
}

}  // namespace mola
