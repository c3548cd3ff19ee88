// The expert presets and per-layer counts of an adapter config (docs/design.md,
// The MoLA layer): preset names, digit presets and group lists expanded over
// the layers, and PerLayerSpec, a count given once, per group or per layer.
// Torch-free, as src/config.cpp; every error names the value and the fix.
#include "mola/config.h"

#include "detail/config_reader.h"
#include "detail/text.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <string>
#include <vector>

namespace mola {
namespace {

using nlohmann::json;
using namespace detail::config_reader;
using mola::detail::cat;
using mola::detail::join;

struct NamedPreset {
  const char* name;
  std::array<int64_t, 4> groups;  // bottom group (first layers) first
};
// The papers' shapes; the triangle has MORE experts in the LOWER layers.
constexpr NamedPreset kPresets[] = {
    {"rectangle", {5, 5, 5, 5}}, {"triangle", {8, 6, 4, 2}}, {"inverted", {2, 4, 6, 8}},
    {"hourglass", {8, 2, 2, 8}}, {"diamond", {2, 8, 8, 2}},
};
const char* const kGroupListRule =
    "a group list is 4 positive whole numbers separated by '-' or ',' (e.g. \"10-2-2-2\")";

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n\r");
  return b == std::string::npos ? "" : s.substr(b, s.find_last_not_of(" \t\n\r") - b + 1);
}

bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c) != 0; });
}

// `subject` names the count: "experts", "rank[3]", "experts: group 2 of \"2048\"".
void check_count(const std::string& field, int64_t v, const std::string& subject) {
  if (v >= 1) return;
  const char* why = field == "experts" ? "every layer needs at least one expert"
                    : field == "top_k" ? "each token must be routed to at least one expert"
                                       : "a LoRA expert needs rank >= 1";
  fail(subject, " is ", v, ", but every count must be >= 1; ", why);
}

}  // namespace

namespace detail {

std::array<int64_t, 4> parse_group_spec(const std::string& field, const std::string& spec) {
  const std::string forms = cat("give a preset name (", join(preset_names()),
                                "), 4 digits such as \"2468\", or 4 group counts such as \"10-2-2-2\"");
  const std::string s = trim(spec);
  if (s.empty()) fail(field, ": an empty string is not a preset; ", forms);
  for (const auto& p : kPresets)
    if (lower(s) == p.name) return p.groups;

  std::array<int64_t, 4> groups{};
  if (all_digits(s)) {
    if (s.size() != 4)
      fail(field, ": ", json_string(spec), " has ", s.size(), " digits, so it is not a preset; ",
           "a digit preset has exactly 4, one per quarter of the layers (e.g. \"2468\"); ",
           "write counts above 9 with dashes (\"10-2-2-2\")");
    for (size_t g = 0; g < 4; ++g) {
      groups[g] = s[g] - '0';
      check_count(field, groups[g], cat(field, ": group ", g + 1, " of ", json_string(spec)));
    }
    return groups;
  }
  if (s.find_first_of("-,") == std::string::npos)
    fail(field, ": unknown preset ", json_string(spec), "; ", did_you_mean(s, preset_names()), " Or ", forms);

  std::vector<std::string> pieces;
  std::string piece;
  for (char c : s + ",") {
    if (c != '-' && c != ',') piece += c;
    else pieces.push_back(trim(piece)), piece.clear();
  }
  if (pieces.size() != 4)
    fail(field, ": ", json_string(spec), " has ", pieces.size(), " group counts; a group list needs exactly 4, one per ",
         "quarter of the layers (e.g. \"2-4-6-8\"); for one count per layer use a JSON list");
  for (size_t g = 0; g < 4; ++g) {
    const std::string where = cat(field, ": group ", g + 1, " of ", json_string(spec));
    if (pieces[g].empty()) fail(where, " is empty; ", kGroupListRule);
    if (!all_digits(pieces[g])) fail(where, " (", json_string(pieces[g]), ") is not a whole number; ", kGroupListRule);
    if (pieces[g].size() > 9) fail(where, " (", pieces[g], ") is too large; give at most 999999999");
    groups[g] = std::stoll(pieces[g]);
    check_count(field, groups[g], where);
  }
  return groups;
}

std::vector<int64_t> expand_groups(const std::array<int64_t, 4>& groups, int64_t num_layers) {
  check_num_layers(num_layers);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(num_layers));
  const int64_t base = num_layers / 4, extra = num_layers % 4;
  for (size_t g = 0; g < 4; ++g)
    out.insert(out.end(), static_cast<size_t>(base + (static_cast<int64_t>(g) < extra ? 1 : 0)), groups[g]);
  return out;
}

}  // namespace detail

std::vector<int64_t> expand_preset(const std::string& spec, int64_t num_layers) {
  check_num_layers(num_layers);
  return detail::expand_groups(detail::parse_group_spec("experts", spec), num_layers);
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  return names;
}

// ---------------------------------------------------------------- PerLayerSpec

void PerLayerSpec::validate(const std::string& field, bool allow_preset) const {
  if (const auto* v = std::get_if<int64_t>(&value)) {
    check_count(field, *v, field);
  } else if (const auto* list = std::get_if<std::vector<int64_t>>(&value)) {
    if (list->empty()) fail(field, ": an empty list gives no counts; give 4 group counts or one count per layer");
    for (size_t i = 0; i < list->size(); ++i) check_count(field, (*list)[i], cat(field, "[", i, "]"));
  } else if (!allow_preset) {
    fail(field, ": ", json_string(std::get<std::string>(value)), " is a string, but presets apply to experts only; give ",
         field, " as an int (e.g. 2) or a list (4 group counts or one per layer)");
  } else {
    detail::parse_group_spec(field, std::get<std::string>(value));
  }
}

std::vector<int64_t> PerLayerSpec::resolve(const std::string& field, int64_t num_layers, bool allow_preset) const {
  check_num_layers(num_layers);
  validate(field, allow_preset);
  if (const auto* v = std::get_if<int64_t>(&value)) return std::vector<int64_t>(static_cast<size_t>(num_layers), *v);
  if (const auto* list = std::get_if<std::vector<int64_t>>(&value)) {
    const auto n = static_cast<int64_t>(list->size());
    if (n == num_layers) return *list;  // per layer; wins over groups when num_layers == 4 (same result)
    if (n == 4) return detail::expand_groups({(*list)[0], (*list)[1], (*list)[2], (*list)[3]}, num_layers);
    fail(field, ": a list of ", n, " entries fits neither 4 groups nor the model's ", num_layers,
         " layers; give 4 group counts or one count per layer");
  }
  return detail::expand_groups(detail::parse_group_spec(field, std::get<std::string>(value)), num_layers);
}

PerLayerSpec PerLayerSpec::from_json(const json& j, const std::string& field) {
  int64_t v = 0;
  if (json_int(j, &v)) return PerLayerSpec(v);
  if (j.is_string()) return PerLayerSpec(j.get<std::string>());
  if (!j.is_array())
    fail(field, " must be an integer, a list of integers",
         field == "experts" ? " or a preset string such as \"triangle\"" : "", "; got ", show(j));
  std::vector<int64_t> list;
  for (size_t i = 0; i < j.size(); ++i) {
    if (!json_int(j[i], &v))
      fail(field, "[", i, "] is ", show(j[i]), ", not a whole number; every count must be an integer >= 1");
    list.push_back(v);
  }
  return PerLayerSpec(std::move(list));
}

nlohmann::json PerLayerSpec::to_json() const {
  return std::visit([](const auto& v) { return json(v); }, value);
}

}  // namespace mola
