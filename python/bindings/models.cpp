// pybind11 bindings for mola/models/decoder.h: mola.CausalLM, the C++
// decoder as a Python object, registered into mola._C by module.cpp through
// mola_bind_models(m). Thin on purpose: argument conversion and the mapping
// of mola's exceptions to Python's, nothing else.
//
// Errors: ModelConfigError and std::invalid_argument become ValueError
// (pybind11's default), ModelFileNotFoundError becomes FileNotFoundError,
// io::SafetensorsError (a std::runtime_error) RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "mola/models/decoder.h"

namespace py = pybind11;
using mola::models::CausalLMImpl;

namespace {

// Accepts "cpu", "cuda:0" or a torch.device.
at::Device to_device(const py::object& device) {
  if (py::isinstance<py::str>(device)) return at::Device(device.cast<std::string>());
  return device.cast<at::Device>();
}

py::tuple output_tuple(const mola::models::CausalLMOutput& out) {
  return py::make_tuple(out.logits, out.loss.defined() ? py::cast(out.loss) : py::none());
}

}  // namespace

void mola_bind_models(py::module_& m) {
  py::register_exception<mola::models::ModelFileNotFoundError>(m, "ModelFileNotFoundError", PyExc_FileNotFoundError);

  py::class_<CausalLMImpl, std::shared_ptr<CausalLMImpl>>(
      m, "CausalLM",
      "mola's C++ decoder (llama, mistral, gemma) with Hugging Face's parameter names. "
      "Load with CausalLM.from_pretrained(path); call with (input_ids, attention_mask=None, labels=None) "
      "to get (logits, loss or None).")
      .def_static(
          "from_pretrained",
          [](const std::string& path, at::ScalarType dtype, const py::object& device) {
            const at::Device dev = to_device(device);
            py::gil_scoped_release no_gil;
            return CausalLMImpl::from_pretrained(path, dtype, dev);
          },
          py::arg("path"), py::arg("dtype") = at::kFloat, py::arg("device") = py::str("cpu"),
          "Load a Hugging Face checkpoint directory (config.json and safetensors weights). Raises "
          "FileNotFoundError for a missing directory, config.json or weights, ValueError for a bad config or "
          "weights that do not match it (naming the key and both shapes).")
      .def(
          "forward",
          [](CausalLMImpl& self, const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
             const std::optional<at::Tensor>& labels) { return output_tuple(self.forward(input_ids, attention_mask, labels)); },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
          "(logits [batch, seq, vocab], loss or None). labels are unshifted, -100 where no loss is taken.")
      .def(
          "__call__",
          [](CausalLMImpl& self, const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
             const std::optional<at::Tensor>& labels) { return output_tuple(self.forward(input_ids, attention_mask, labels)); },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none())
      .def(
          "state_dict",
          [](CausalLMImpl& self) {
            py::dict d;
            for (const auto& p : self.named_parameters(/*recurse=*/true)) d[py::str(p.key())] = p.value();
            return d;
          },
          "The parameters by their Hugging Face names (shared with the model, not copies).")
      .def_property_readonly(
          "config",
          [](const CausalLMImpl& self) { return py::module_::import("json").attr("loads")(self.config().to_json().dump()); },
          "The parsed config.json as a dict, defaults filled in.")
      .def("train", [](CausalLMImpl& self, bool on) { self.train(on); }, py::arg("mode") = true)
      .def("eval", [](CausalLMImpl& self) { self.eval(); })
      .def("__repr__", [](const CausalLMImpl& self) {
        const auto& c = self.config();
        return "CausalLM(model_type=" + c.model_type + ", layers=" + std::to_string(c.num_hidden_layers) +
               ", hidden_size=" + std::to_string(c.hidden_size) + ")";
      });
}
