// pybind11 bindings for mola/data/{tokenizer,dataset}.h: Tokenizer,
// PromptTemplate, Row, DataOptions, Example, load_rows, tokenize_row(s) on
// mola._C, registered by module.cpp through mola_bind_data(m). Thin: argument
// conversion (paths may be str or os.PathLike) and exception mapping only.
//
// Errors: DataFileNotFoundError becomes FileNotFoundError; DataError (a
// std::invalid_argument) ValueError, pybind11's default. Token ids cross as
// Python lists of int.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "json.h"
#include "mola/data/dataset.h"
#include "mola/data/tokenizer.h"

namespace py = pybind11;
using namespace mola::data;

namespace {

using mola_bindings::fspath;  // str or os.PathLike (pathlib.Path) to a path string

std::string quoted(const std::string& s) { return py::repr(py::str(s)).cast<std::string>(); }

std::string row_repr(const Row& r) {
  std::string opts;
  for (const auto& o : r.options) opts += (opts.empty() ? "" : ", ") + quoted(o);
  return "Row(id=" + quoted(r.id) + ", instruction=" + quoted(r.instruction) + ", input=" + quoted(r.input) +
         ", output=" + quoted(r.output) + ", answer=" + quoted(r.answer) + ", options=[" + opts + "])";
}

}  // namespace

void mola_bind_data(py::module_& m) {
  py::register_exception<DataFileNotFoundError>(m, "DataFileNotFoundError", PyExc_FileNotFoundError);

  py::class_<Tokenizer>(m, "Tokenizer",
                        "A SentencePiece tokenizer.model (llama, mistral, gemma) through the SentencePiece C++ "
                        "library; encode() equals transformers' LlamaTokenizer (BOS first, legacy behaviour).")
      .def_static(
          "from_file", [](const py::object& path) { return Tokenizer::from_file(fspath(path)); }, py::arg("path"),
          "Load a tokenizer.model (a directory means its tokenizer.model). Raises FileNotFoundError when missing, "
          "ValueError when the file is not a SentencePiece model.")
      .def(
          "encode",
          [](const Tokenizer& self, const std::string& text, bool add_bos, bool add_eos) {
            py::gil_scoped_release no_gil;
            return self.encode(text, add_bos, add_eos);
          },
          py::arg("text"), py::arg("add_bos") = true, py::arg("add_eos") = false,
          "Token ids of text (list of int): BOS first when add_bos, EOS last when add_eos.")
      .def("decode", &Tokenizer::decode, py::arg("ids"),
           "The text of ids, skipping BOS, EOS and pad; an id outside [0, vocab_size) raises ValueError.")
      .def("bos_id", &Tokenizer::bos_id)
      .def("eos_id", &Tokenizer::eos_id)
      .def("pad_id", &Tokenizer::pad_id, "The model's pad id, or 0 (the authors' pad id) when it has none.")
      .def("vocab_size", &Tokenizer::vocab_size)
      .def("__len__", &Tokenizer::vocab_size)
      .def_property_readonly("path", &Tokenizer::path)
      .def("__repr__", [](const Tokenizer& self) {
        return "Tokenizer(" + quoted(self.path()) + ", vocab_size=" + std::to_string(self.vocab_size()) + ")";
      });

  py::class_<PromptTemplate>(m, "PromptTemplate",
                             "A prompt template as the authors' templates/alpaca.json: prompt_input ({instruction}, "
                             "{input}), prompt_no_input ({instruction}) and response_split.")
      .def(py::init([](std::string name, std::string prompt_input, std::string prompt_no_input,
                       std::string response_split) {
             return PromptTemplate{std::move(name), std::move(prompt_input), std::move(prompt_no_input),
                                   std::move(response_split)};
           }),
           py::arg("name") = "", py::arg("prompt_input") = "", py::arg("prompt_no_input") = "",
           py::arg("response_split") = "")
      .def_static(
          "from_json_file", [](const py::object& path) { return PromptTemplate::from_json_file(fspath(path)); },
          py::arg("path"),
          "Read a template JSON file. Raises FileNotFoundError, or ValueError naming the file and the missing or bad "
          "key.")
      .def_static("raw", &PromptTemplate::raw, "The instruction stage's template: the text itself, no framing.")
      .def_readwrite("name", &PromptTemplate::name)
      .def_readwrite("prompt_input", &PromptTemplate::prompt_input)
      .def_readwrite("prompt_no_input", &PromptTemplate::prompt_no_input)
      .def_readwrite("response_split", &PromptTemplate::response_split)
      .def("prompt", &PromptTemplate::prompt, py::arg("instruction"), py::arg("input") = "", py::arg("output") = "",
           "Prompter.generate_prompt: prompt_input when input is non-empty, else prompt_no_input; then + output.")
      .def("response", &PromptTemplate::response, py::arg("text"),
           "Prompter.get_response: the text after response_split (up to a second one), stripped; '' when absent.")
      .def("__repr__", [](const PromptTemplate& self) { return "PromptTemplate(name=" + quoted(self.name) + ")"; });

  py::class_<Row>(m, "Row", "One instruction row: instruction, input, output, and for scored tasks answer/options.")
      .def(py::init([](std::string id, std::string instruction, std::string input, std::string output,
                       std::string answer, std::vector<std::string> options) {
             return Row{std::move(id),     std::move(instruction), std::move(input),
                        std::move(output), std::move(answer),      std::move(options)};
           }),
           py::arg("id") = "", py::arg("instruction") = "", py::arg("input") = "", py::arg("output") = "",
           py::arg("answer") = "", py::arg("options") = std::vector<std::string>{})
      .def_readwrite("id", &Row::id)
      .def_readwrite("instruction", &Row::instruction)
      .def_readwrite("input", &Row::input)
      .def_readwrite("output", &Row::output)
      .def_readwrite("answer", &Row::answer)
      .def_readwrite("options", &Row::options)
      .def("__eq__",
           [](const Row& a, const Row& b) {
             return a.id == b.id && a.instruction == b.instruction && a.input == b.input && a.output == b.output &&
                    a.answer == b.answer && a.options == b.options;
           })
      .def("__repr__", &row_repr);

  py::class_<DataOptions>(m, "DataOptions", "How rows become examples (the authors' defaults).")
      .def(py::init([](int64_t cutoff_len, bool train_on_inputs, bool add_eos_token) {
             DataOptions o;
             o.cutoff_len = cutoff_len;
             o.train_on_inputs = train_on_inputs;
             o.add_eos_token = add_eos_token;
             return o;
           }),
           py::arg("cutoff_len") = 256, py::arg("train_on_inputs") = true, py::arg("add_eos_token") = true)
      .def_readwrite("cutoff_len", &DataOptions::cutoff_len)
      .def_readwrite("train_on_inputs", &DataOptions::train_on_inputs)
      .def_readwrite("add_eos_token", &DataOptions::add_eos_token)
      .def("__repr__", [](const DataOptions& o) {
        return "DataOptions(cutoff_len=" + std::to_string(o.cutoff_len) +
               ", train_on_inputs=" + (o.train_on_inputs ? "True" : "False") +
               ", add_eos_token=" + (o.add_eos_token ? "True" : "False") + ")";
      });

  py::class_<Example>(m, "Example", "A tokenised row: input_ids and labels (-100 where no loss is taken).")
      .def(py::init<>())
      .def_readwrite("input_ids", &Example::input_ids)
      .def_readwrite("labels", &Example::labels)
      .def("__len__", [](const Example& e) { return e.input_ids.size(); })
      .def("__repr__", [](const Example& e) { return "Example(len=" + std::to_string(e.input_ids.size()) + ")"; });

  m.def(
      "load_rows",
      [](const py::object& path, const std::string& task) {
        const std::string p = fspath(path);
        py::gil_scoped_release no_gil;
        return load_rows(p, task);
      },
      py::arg("path"), py::arg("task") = "auto",
      "Read a JSON Lines file into [Row]. task: 'auto' (each row's 'task' field, else instruction/output), "
      "'instruction', or one of task_names(). Raises FileNotFoundError, or ValueError naming the file, line and "
      "field.");
  m.def("task_names", &task_names, "The task schemas load_rows converts.");
  m.def("tokenize_row", &tokenize_row, py::arg("row"), py::arg("template"), py::arg("tokenizer"),
        py::arg("options") = DataOptions{},
        "The authors' generate_and_tokenize_prompt: an Example with input_ids and labels lists.");
  m.def(
      "tokenize_rows",
      [](const std::vector<Row>& rows, const PromptTemplate& tmpl, const Tokenizer& tok, const DataOptions& opts) {
        py::gil_scoped_release no_gil;
        return tokenize_rows(rows, tmpl, tok, opts);
      },
      py::arg("rows"), py::arg("template"), py::arg("tokenizer"), py::arg("options") = DataOptions{},
      "tokenize_row over a list of rows.");
}
