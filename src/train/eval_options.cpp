// EvalOptions (mola/train/eval_options.h): the strict JSON of a recipe's
// "eval" section. Torch-free, like the rest of the recipe reader.
#include <mola/train/eval_options.h>

#include "detail/json_fields.h"
#include "detail/text.h"

#include <algorithm>
#include <set>

namespace mola::train {
namespace {

using mola::detail::cat;

const mola::detail::JsonFields fields("eval options: ");

template <class... Parts>
[[noreturn]] void fail_option(const Parts&... parts) {
  fields.fail(parts...);
}

using mola::detail::join;

}  // namespace

const std::vector<std::string>& EvalOptions::keys() {
  static const std::vector<std::string> k{"batch_size", "max_new_tokens", "max_examples", "methods"};
  return k;
}

const std::vector<std::string>& EvalOptions::method_names() {
  static const std::vector<std::string> m{"generate", "loglik"};
  return m;
}

EvalOptions EvalOptions::from_json(const nlohmann::json& j) {
  if (!j.is_object()) fail_option("expected a JSON object of settings; got ", j.dump());
  EvalOptions o;
  for (const auto& [key, v] : j.items()) {
    if (key == "batch_size") o.batch_size = fields.integer(v, key);
    else if (key == "max_new_tokens") o.max_new_tokens = fields.integer(v, key);
    else if (key == "max_examples") o.max_examples = fields.integer(v, key);
    else if (key == "methods") {
      if (v.is_string()) o.methods = {v.get<std::string>()};
      else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const auto& e) { return e.is_string(); }))
        o.methods = v.get<std::vector<std::string>>();
      else fail_option("methods must be a list of method names (", join(method_names()), "); got ", v.dump());
    } else {
      fail_option("unknown key \"", key, "\"; did you mean \"", mola::detail::nearest_name(key, keys()),
                  "\"? (valid keys: ", join(keys()), ")");
    }
  }
  o.validate();
  return o;
}

nlohmann::json EvalOptions::to_json() const {
  return {{"batch_size", batch_size}, {"max_new_tokens", max_new_tokens}, {"max_examples", max_examples},
          {"methods", methods}};
}

void EvalOptions::validate() const {
  if (batch_size < 1) fail_option("batch_size is ", batch_size, "; it must be >= 1 (the authors use 8)");
  if (max_new_tokens < 1) fail_option("max_new_tokens is ", max_new_tokens, "; it must be >= 1 (the authors use 128)");
  if (max_examples < 0) fail_option("max_examples is ", max_examples, "; it must be >= 0 (0 evaluates every row)");
  if (methods.empty()) fail_option("methods is empty; give one or both of ", join(method_names()));
  std::set<std::string> seen;
  for (const auto& m : methods) {
    if (std::find(method_names().begin(), method_names().end(), m) == method_names().end())
      fail_option("method \"", m, "\" is unknown; use ", join(method_names()), " (did you mean \"",
                  mola::detail::nearest_name(m, method_names()), "\"?)");
    if (!seen.insert(m).second) fail_option("method \"", m, "\" is listed twice in methods");
  }
}

bool EvalOptions::uses(const std::string& method) const {
  return std::find(methods.begin(), methods.end(), method) != methods.end();
}

}  // namespace mola::train
