// pybind11 bindings for mola/config.h, registered into mola._C by
// module.cpp through mola_bind_config(m).
//
// Configs cross the boundary as JSON strings rather than bound classes: the
// Python side (mola/config.py) is a dataclass that round-trips through the
// `json` module, and one C++ parser means one set of rules and messages.
// mola::ConfigError derives from std::invalid_argument, which pybind11 raises
// as ValueError with the C++ message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "mola/config.h"

namespace py = pybind11;

void mola_bind_config(py::module_& m) {
  m.def(
      "config_normalize",
      [](const std::string& json_str) { return mola::AdapterConfig::from_json_string(json_str).to_json().dump(); },
      py::arg("json_str"),
      "Parse and validate an adapter config given as a JSON object string; return it as JSON with every key "
      "present (defaults filled in) and per-layer settings spelled as given. Raises ValueError on bad input.");

  m.def(
      "config_default_json", [] { return mola::AdapterConfig().to_json().dump(); },
      "The default adapter config as a JSON string: the defaults mola.MoLAConfig mirrors.");

  m.def(
      "config_resolve",
      [](const std::string& json_str, int64_t num_layers) {
        return mola::AdapterConfig::from_json_string(json_str).resolve(num_layers).to_json().dump();
      },
      py::arg("json_str"), py::arg("num_layers"),
      "Expand an adapter config for a model with num_layers layers; returns JSON with experts, top_k, rank and "
      "scaling as per-layer lists, plus num_layers and the scalar settings (what adapter_config.json holds).");

  m.def(
      "config_num_parameters",
      [](const std::string& json_str, int64_t num_layers,
         const std::vector<std::tuple<std::string, int64_t, int64_t>>& shapes) {
        std::vector<mola::LinearShape> linear;
        linear.reserve(shapes.size());
        for (const auto& [name, in_features, out_features] : shapes)
          linear.push_back({name, in_features, out_features});
        return mola::AdapterConfig::from_json_string(json_str).num_parameters(linear, num_layers);
      },
      py::arg("json_str"), py::arg("num_layers"), py::arg("shapes"),
      "Trainable parameters as the MoLA papers count them: sum over layers of E_l * sum over targets of "
      "(r_l * (in + out) + in). shapes: a list of (name, in_features, out_features), one per target.");

  m.def("preset_names", &mola::preset_names, "The named expert-allocation presets, in the papers' order.");

  m.def("expand_preset", &mola::expand_preset, py::arg("spec"), py::arg("num_layers"),
        "Experts per layer for a preset string (a name, 4 digits, or 4 counts joined by '-' or ',').");
}
