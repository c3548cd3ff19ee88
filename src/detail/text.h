// src/detail/text.h: building error messages, shared by the library's sources
// (private: not part of the installed API). One copy of each: the message
// builder, the quoting of names, the throw, and the did-you-mean ranking.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mola::detail {

// The parts streamed into one string: cat("got ", n, " layers").
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream o;
  (o << ... << parts);
  return o.str();
}

// Throws E (an exception type taking a string) with the parts as its message.
template <class E, class... Parts>
[[noreturn]] void raise(const Parts&... parts) {
  throw E(cat(parts...));
}

// Throws std::invalid_argument with the parts as its message unless ok.
template <class... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) raise<std::invalid_argument>(parts...);
}

// A name or value inside a message: 'name'. (JSON values are shown as JSON,
// nlohmann::json(v).dump(), where the user wrote JSON.)
inline std::string quote(const std::string& s) { return "'" + s + "'"; }

// "a, b, c".
std::string join(const std::vector<std::string>& items, const std::string& sep = ", ");

// A shape as "[2, 3, 4]", for messages; sizes: anything with size() and [].
template <class Sizes>
std::string shape_str(const Sizes& sizes) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < sizes.size(); ++i) o << (i ? ", " : "") << sizes[i];
  o << ']';
  return o.str();
}

// Levenshtein distance (insert, delete, substitute each cost 1).
size_t edit_distance(const std::string& a, const std::string& b);
// The candidates ordered as a person would guess what `word` meant, nearest
// first: by how much of the two names' letters they share in order
// (2 * longest common subsequence / total length, case-insensitive), so that
// "sciqa" finds "scienceqa" before "cola"; then by edit distance; then in
// the given order. For "did you mean" messages.
std::vector<std::string> names_nearest_first(const std::string& word, const std::vector<std::string>& candidates);
// The first of names_nearest_first; "" when there are no candidates.
std::string nearest_name(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace mola::detail
