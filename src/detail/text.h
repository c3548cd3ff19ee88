// src/detail/text.h: building error messages, shared by the library's sources
// (private: not part of the installed API).
#pragma once

#include <sstream>
#include <string>

namespace mola::detail {

// The parts streamed into one string: cat("got ", n, " layers").
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream o;
  (o << ... << parts);
  return o.str();
}

// A shape as "[2, 3, 4]", for messages; sizes: anything with size() and [].
template <class Sizes>
std::string shape_str(const Sizes& sizes) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < sizes.size(); ++i) o << (i ? ", " : "") << sizes[i];
  o << ']';
  return o.str();
}

}  // namespace mola::detail
