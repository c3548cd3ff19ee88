// Conversions between Python values and what the C++ API takes, shared by the
// binding files: JSON values (nlohmann::json <-> the objects Python's json
// module reads and writes) and filesystem paths (str or os.PathLike).
#pragma once

#include <nlohmann/json.hpp>
#include <pybind11/pybind11.h>

#include <string>

namespace mola_bindings {

// A Python value (dict, list, str, number, bool, None) as JSON; TypeError from
// json.dumps for anything JSON cannot hold.
inline nlohmann::json to_json(const pybind11::handle& obj) {
  return nlohmann::json::parse(pybind11::module_::import("json").attr("dumps")(obj).cast<std::string>());
}

// A JSON value as the Python object json.loads would give.
inline pybind11::object to_python(const nlohmann::json& j) {
  return pybind11::module_::import("json").attr("loads")(j.dump());
}

// True for a str or an os.PathLike (pathlib.Path).
inline bool is_path(const pybind11::handle& obj) {
  return pybind11::isinstance<pybind11::str>(obj) || pybind11::hasattr(obj, "__fspath__");
}

// A str or os.PathLike as a path string (os.fspath).
inline std::string fspath(const pybind11::handle& obj) {
  return pybind11::module_::import("os").attr("fspath")(obj).cast<std::string>();
}

}  // namespace mola_bindings
