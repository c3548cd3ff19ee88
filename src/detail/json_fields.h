// src/detail/json_fields.h: reading the value of one key of a JSON settings
// object (the train and eval sections of a recipe), with the error every
// reader gives (private). A wrong type throws ConfigError naming the key,
// what it must be and what it got.
#pragma once

#include <mola/config.h>

#include "detail/config_reader.h"
#include "detail/text.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>

namespace mola::detail {

class JsonFields {
 public:
  // `what` prefixes every message: "train options: ".
  explicit JsonFields(std::string what) : what_(std::move(what)) {}

  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    raise<ConfigError>(what_, parts...);
  }
  int64_t integer(const nlohmann::json& v, const std::string& key) const {
    if (!v.is_number_integer())
      fail(key, " must be an integer; got ", config_reader::dump(v), " (write it without quotes or a decimal point)");
    return v.get<int64_t>();
  }
  double number(const nlohmann::json& v, const std::string& key) const {
    if (!v.is_number()) fail(key, " must be a number; got ", config_reader::dump(v));
    return v.get<double>();
  }
  bool boolean(const nlohmann::json& v, const std::string& key) const {
    if (!v.is_boolean())
      fail(key, " must be true or false; got ", config_reader::dump(v),
           v.is_string() ? " (a string: write true or false without quotes)" : "");
    return v.get<bool>();
  }
  std::string string(const nlohmann::json& v, const std::string& key) const {
    if (!v.is_string()) fail(key, " must be a string; got ", config_reader::dump(v));
    return v.get<std::string>();
  }

 private:
  std::string what_;
};

}  // namespace mola::detail
