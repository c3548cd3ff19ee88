// libFuzzer target: the preset parser (expand_preset, detail::parse_group_spec,
// PerLayerSpec, mola/config.h) on arbitrary strings and layer counts. The
// first byte picks the layer count (1..64), the rest is the preset text.
// Invariants checked against an independent reading of the rule in config.h:
//   - only ConfigError escapes;
//   - an accepted preset gives num_layers counts, each >= 1, in 4 contiguous
//     groups of L / 4 layers where the first L mod 4 groups get one more layer,
//     each group's layers all holding that group's count from parse_group_spec;
//   - the same text as a PerLayerSpec resolves to the same counts.
#include "mola/config.h"

#include <algorithm>
#include <array>
#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using mola::fuzz::check;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int64_t layers = 1 + data[0] % 64;
  const std::string spec(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::vector<int64_t> counts;
  try {
    counts = mola::expand_preset(spec, layers);
  } catch (const mola::ConfigError&) {
    try {
      mola::PerLayerSpec(spec).resolve("experts", layers, true);
    } catch (const mola::ConfigError&) {
      return 0;
    }
    check(false, "PerLayerSpec accepts a preset that expand_preset refuses");
  }
  check(static_cast<int64_t>(counts.size()) == layers, "one count per layer");
  // parse_group_spec reads every form expand_preset accepts (names included).
  const std::array<int64_t, 4> groups = mola::detail::parse_group_spec("experts", spec);
  // An independent reading of the 4-digit form: the digits themselves.
  const char* space = " \t\n\r";  // what config.h's preset strings may be padded with
  const auto first = spec.find_first_not_of(space);
  const std::string trimmed =
      first == std::string::npos ? "" : spec.substr(first, spec.find_last_not_of(space) - first + 1);
  if (trimmed.size() == 4 && std::all_of(trimmed.begin(), trimmed.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    for (size_t g = 0; g < 4; ++g) check(groups[g] == trimmed[g] - '0', "a 4-digit preset's groups are its digits");
  size_t l = 0;
  for (int64_t g = 0; g < 4; ++g) {
    const int64_t n = layers / 4 + (g < layers % 4 ? 1 : 0);
    for (int64_t i = 0; i < n; ++i, ++l) {
      check(counts[l] >= 1, "every count >= 1");
      check(counts[l] == groups[g], "each layer holds its group's count");
    }
  }
  check(l == counts.size(), "the groups cover every layer");
  check(mola::PerLayerSpec(spec).resolve("experts", layers, true) == counts, "PerLayerSpec agrees");
  return 0;
}
