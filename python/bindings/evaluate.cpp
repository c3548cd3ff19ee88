// pybind11 bindings for mola/train/evaluate.h, registered into mola._C by
// module.cpp through mola_bind_evaluate(m): parse_answer, EvalOptions,
// majority_baseline and evaluate. Thin: argument conversion only. The
// tokenizer, template and rows may be the objects of mola._C (bound in
// data.cpp) or plain Python values (a path, a dict), so a script needs no
// extra wrapping.
//
// Errors: ConfigError (bad options) and std::invalid_argument (bad rows)
// become ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

#include "json.h"
#include "mola/train/evaluate.h"

namespace py = pybind11;
using mola::train::EvalOptions;

namespace {

using mola_bindings::fspath;
using mola_bindings::is_path;
using mola_bindings::to_json;
using mola_bindings::to_python;

// A mola._C.Tokenizer, or the path of a tokenizer.model (or its directory).
mola::data::Tokenizer tokenizer_from(const py::object& obj) {
  if (is_path(obj)) return mola::data::Tokenizer::from_file(fspath(obj));
  return obj.cast<mola::data::Tokenizer>();
}

// A mola._C.PromptTemplate, or the path of a template JSON file.
mola::data::PromptTemplate template_from(const py::object& obj) {
  if (is_path(obj)) return mola::data::PromptTemplate::from_json_file(fspath(obj));
  return obj.cast<mola::data::PromptTemplate>();
}

// mola._C.Row objects or dicts with Row's field names.
std::vector<mola::data::Row> rows_from(const py::iterable& rows) {
  std::vector<mola::data::Row> out;
  for (const py::handle& r : rows) {
    if (!py::isinstance<py::dict>(r)) {
      out.push_back(r.cast<mola::data::Row>());
      continue;
    }
    const py::dict d = py::reinterpret_borrow<py::dict>(r);
    mola::data::Row row;
    for (const auto& [key, value] : d) {
      const std::string k = key.cast<std::string>();
      if (k == "id") row.id = py::str(value).cast<std::string>();
      else if (k == "instruction") row.instruction = value.cast<std::string>();
      else if (k == "input") row.input = value.cast<std::string>();
      else if (k == "output") row.output = value.cast<std::string>();
      else if (k == "answer") row.answer = value.cast<std::string>();
      else if (k == "options") row.options = value.cast<std::vector<std::string>>();
    }
    out.push_back(std::move(row));
  }
  return out;
}

EvalOptions options_from(const py::object& obj) {
  if (obj.is_none()) return EvalOptions{};
  if (py::isinstance<py::dict>(obj)) return EvalOptions::from_json(to_json(obj));
  return obj.cast<EvalOptions>();
}

}  // namespace

void mola_bind_evaluate(py::module_& m) {
  m.def("parse_answer", &mola::train::parse_answer, py::arg("response"),
        "The authors' answer parse: re.findall(r'The answer is ([A-Z]).', response) with exactly one match; the "
        "letter, or None (FAILED).");

  py::class_<EvalOptions>(m, "EvalOptions",
                          "A recipe's eval section: batch_size (8), max_new_tokens (128), max_examples (0 = all), "
                          "methods (['generate', 'loglik']).")
      .def(py::init([](const py::kwargs& kw) { return EvalOptions::from_json(to_json(kw)); }),
           "EvalOptions(**settings); an unknown keyword raises ValueError naming the nearest valid one.")
      .def_static("from_json", [](const py::object& d) { return EvalOptions::from_json(to_json(d)); }, py::arg("d"))
      .def("to_json", [](const EvalOptions& o) { return to_python(o.to_json()); }, "The settings as a dict.")
      .def("validate", &EvalOptions::validate)
      .def_readwrite("batch_size", &EvalOptions::batch_size)
      .def_readwrite("max_new_tokens", &EvalOptions::max_new_tokens)
      .def_readwrite("max_examples", &EvalOptions::max_examples)
      .def_readwrite("methods", &EvalOptions::methods)
      .def("__repr__", [](const EvalOptions& o) { return "EvalOptions(" + o.to_json().dump() + ")"; });

  m.def(
      "majority_baseline",
      [](const py::iterable& rows) {
        const auto b = mola::train::majority_baseline(rows_from(rows));
        return py::make_tuple(b.answer, b.accuracy);
      },
      py::arg("rows"), "(answer, accuracy %) of always answering the most frequent gold answer (ties: first letter).");

  m.def(
      "evaluate",
      [](mola::models::CausalLMImpl& model, const py::object& tokenizer, const py::object& tmpl,
         const py::iterable& rows, const py::object& options, bool return_predictions) {
        const auto tok = tokenizer_from(tokenizer);
        const auto t = template_from(tmpl);
        const auto r = rows_from(rows);
        const EvalOptions o = options_from(options);
        mola::train::EvalResult result;
        {
          py::gil_scoped_release no_gil;
          result = mola::train::evaluate(model, tok, t, r, o);
        }
        py::dict out = to_python(result.to_json());
        if (return_predictions) {
          py::list preds;
          for (const auto& p : result.predictions) preds.append(to_python(p.to_json(result.methods)));
          out["predictions"] = preds;
        }
        return out;
      },
      py::arg("model"), py::arg("tokenizer"), py::arg("template"), py::arg("rows"), py::arg("options") = py::none(),
      py::arg("return_predictions") = false,
      "Accuracy of model on rows (mola._C.Row or dicts with answer and options), by generation with the authors' "
      "answer regex and by option log-likelihood: the dict of eval.json (n, generate_accuracy, generate_correct, "
      "generate_failed, loglik_accuracy, loglik_correct, majority_answer, majority_accuracy), plus 'predictions' "
      "(one dict per row, as eval_predictions.jsonl) when return_predictions. tokenizer: a Tokenizer or a "
      "tokenizer.model path; template: a PromptTemplate or a template JSON path; options: EvalOptions, a dict "
      "or None.");
}
