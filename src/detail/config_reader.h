// src/detail/config_reader.h: what the readers of user-written settings share
// (src/config.cpp, the adapter config; src/presets.cpp, the expert presets
// and per-layer counts): the ConfigError throw, values shown as the JSON the
// user wrote, did-you-mean and the integer rule. Private, torch-free.
#pragma once

#include "mola/config.h"

#include "detail/text.h"

#include <cctype>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola::detail::config_reader {

using nlohmann::json;

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  raise<ConfigError>(parts...);
}

// A JSON value as text for a message; bytes that are not UTF-8 (a string from
// the command line or Python, never from a parsed file) print as U+FFFD rather
// than throwing.
inline std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// A config value in a message, spelled as JSON ("molx"): what the user wrote.
inline std::string json_string(const std::string& s) { return dump(json(s)); }

inline std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A JSON value short enough to quote in a message.
inline std::string show(const json& j) {
  std::string s = dump(j);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

inline std::string did_you_mean(const std::string& word, const std::vector<std::string>& valid) {
  return "did you mean " + json_string(nearest_name(word, valid)) + "?";
}

inline void check_num_layers(int64_t num_layers) {
  if (num_layers < 1)
    fail("num_layers ", num_layers, " must be >= 1; pass the model's number of transformer layers (32 for LLaMA-2-7B)");
}

// JSON integers only: 8.0, true and "8" are rejected rather than guessed at.
inline bool json_int(const json& j, int64_t* out) {
  if (j.is_number_unsigned()) {
    if (j.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(j.get<uint64_t>());
    return true;
  }
  if (!j.is_number_integer()) return false;
  *out = j.get<int64_t>();
  return true;
}

}  // namespace mola::detail::config_reader
