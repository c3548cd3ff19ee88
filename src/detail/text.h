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

}  // namespace mola::detail
