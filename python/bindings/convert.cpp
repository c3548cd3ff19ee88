// pybind11 bindings for mola/io/llama2c.h, registered into mola._C by
// module.cpp through mola_bind_convert(m): mola._C.convert_llama2c, the
// function behind `mola convert llama2c`.
//
// Errors: Llama2cError (std::invalid_argument) becomes ValueError,
// Llama2cFileNotFoundError FileNotFoundError, a directory that cannot be
// written (std::runtime_error) RuntimeError; each message names the file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "json.h"
#include "mola/io/llama2c.h"

namespace py = pybind11;

namespace {

using mola_bindings::fspath;  // paths may be str or any os.PathLike (pathlib.Path)

py::dict header_dict(const mola::io::Llama2cHeader& h) {
  py::dict d;
  d["dim"] = h.dim;
  d["hidden_dim"] = h.hidden_dim;
  d["n_layers"] = h.n_layers;
  d["n_heads"] = h.n_heads;
  d["n_kv_heads"] = h.n_kv_heads;
  d["vocab_size"] = h.vocab_size;
  d["seq_len"] = h.seq_len;
  d["shared_classifier"] = h.shared_classifier;
  d["num_parameters"] = h.num_floats() - h.seq_len * h.head_size();  // without the unused RoPE tables
  return d;
}

}  // namespace

void mola_bind_convert(py::module_& m) {
  py::register_exception<mola::io::Llama2cFileNotFoundError>(m, "Llama2cFileNotFoundError",
                                                              PyExc_FileNotFoundError);

  m.def(
      "convert_llama2c",
      [](const py::object& checkpoint, const py::object& tokenizer, const py::object& out_dir) {
        const std::string c = fspath(checkpoint), o = fspath(out_dir);
        const std::string t = tokenizer.is_none() ? mola::io::default_llama2c_tokenizer(c) : fspath(tokenizer);
        mola::io::Llama2cHeader h;
        {
          py::gil_scoped_release no_gil;
          h = mola::io::convert_llama2c(c, t, o);
        }
        return header_dict(h);
      },
      py::arg("checkpoint"), py::arg("tokenizer"), py::arg("out_dir"),
      "Convert a llama2.c float32 checkpoint (.bin) and its SentencePiece tokenizer.model (None: tokenizer.model, "
      "else tok512.model, beside the checkpoint) into a Hugging Face "
      "llama directory out_dir (config.json, model.safetensors, generation_config.json, tokenizer.model). "
      "Returns the checkpoint's header as a dict. Raises FileNotFoundError for a missing input and ValueError "
      "for a malformed one (truncated, impossible sizes, size not matching the header, tokenizer of another "
      "vocabulary).");

  m.def(
      "read_llama2c_header",
      [](const py::object& checkpoint) { return header_dict(mola::io::read_llama2c_header(fspath(checkpoint))); },
      py::arg("checkpoint"),
      "The validated header of a llama2.c checkpoint as a dict (dim, hidden_dim, n_layers, n_heads, n_kv_heads, "
      "vocab_size, seq_len, shared_classifier, num_parameters). Raises as convert_llama2c does.");
}
