// pybind11 bindings for mola/models/decoder.h: mola.CausalLM, the C++
// decoder as a Python object, registered into mola._C by module.cpp through
// mola_bind_models(m). Thin on purpose: argument conversion and the mapping
// of mola's exceptions to Python's, nothing else.
//
// Errors: ModelConfigError and std::invalid_argument become ValueError
// (pybind11's default), ModelFileNotFoundError becomes FileNotFoundError,
// io::SafetensorsError (a std::runtime_error) RuntimeError; using a model
// without an adapter where one is needed (std::logic_error) RuntimeError.
//
// Tensors cross by reference: named_parameters() hands Python the model's own
// parameters, requires_grad intact, so a torch.optim optimizer built from them
// trains the C++ model.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "json.h"
#include "mola/io/safetensors_header.h"
#include "mola/models/adapter.h"
#include "mola/models/decoder.h"

namespace py = pybind11;
using mola::models::CausalLMImpl;
using mola::models::KVCache;

namespace {

// Accepts "cpu", "cuda:0" or a torch.device.
at::Device to_device(const py::object& device) {
  if (py::isinstance<py::str>(device)) return at::Device(device.cast<std::string>());
  return device.cast<at::Device>();
}

// mola.CausalLMOutput: a namedtuple (logits, loss), so both `out.logits` and
// `logits, loss = model(ids)` work. Made once at import; never freed, as
// module-level Python objects outlive any C++ static destructor order.
py::object* output_type = nullptr;

py::object output_tuple(const mola::models::CausalLMOutput& out) {
  return (*output_type)(out.logits, out.loss.defined() ? py::cast(out.loss) : py::none());
}

// A config for attach(): a mola.MoLAConfig (anything with to_json()), a dict,
// JSON text, or the path of a JSON file. A resolved config (with
// "num_layers", as adapter_config.json holds) is taken as it is.
void attach_from_python(CausalLMImpl& self, const py::object& cfg) {
  const py::module_ json = py::module_::import("json");
  std::string text;
  if (mola_bindings::is_path(cfg)) {
    const std::string s = mola_bindings::fspath(cfg);
    const auto first = s.find_first_not_of(" \t\r\n");
    if (first == std::string::npos || s[first] != '{') return self.attach(mola::AdapterConfig::from_json_file(s));
    text = s;
  } else if (py::isinstance<py::dict>(cfg)) {
    text = json.attr("dumps")(cfg).cast<std::string>();
  } else if (py::hasattr(cfg, "to_json")) {
    text = cfg.attr("to_json")().cast<std::string>();
  } else if (py::hasattr(cfg, "to_dict")) {
    text = json.attr("dumps")(cfg.attr("to_dict")()).cast<std::string>();
  } else {
    throw py::type_error("CausalLM.attach: give a mola.MoLAConfig, a dict, JSON text or a JSON file path; got " +
                         py::repr(cfg).cast<std::string>());
  }
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("num_layers")) return self.attach(mola::ResolvedAdapter::from_json(j));
  self.attach(mola::AdapterConfig::from_json_string(text));
}

// CausalLM's state as a dict of Python values (pickle's __getstate__).
py::dict state_to_python(const CausalLMImpl::State& st) {
  py::dict tensors;
  for (const auto& [key, t] : st.tensors) tensors[py::str(key)] = t.detach();
  py::dict d;
  d["version"] = 1;
  d["config"] = st.config.to_json().dump();
  d["name_or_path"] = st.name_or_path;
  d["adapter"] = st.adapter ? py::object(py::str(st.adapter->to_json().dump())) : py::object(py::none());
  d["tensors"] = tensors;
  d["trainable"] = st.trainable;
  d["training"] = st.training;
  d["gradient_checkpointing"] = st.gradient_checkpointing;
  d["adapter_enabled"] = st.adapter_enabled;
  d["quantization"] = std::string(mola::quant::kind_name(st.quantization));
  return d;
}

// The inverse (pickle's __setstate__); the tensors are the unpickled ones, taken as they are.
std::shared_ptr<CausalLMImpl> state_from_python(const py::dict& d) {
  if (!d.contains("version") || d["version"].cast<int>() != 1)
    throw py::value_error("CausalLM: this pickled state was written by another mola version; save the model "
                          "with save_adapter and load it again instead of pickling");
  CausalLMImpl::State st;
  st.config = mola::models::ModelConfig::from_json_string(d["config"].cast<std::string>(), "<pickled CausalLM>");
  st.name_or_path = d["name_or_path"].cast<std::string>();
  if (!d["adapter"].is_none())
    st.adapter = mola::ResolvedAdapter::from_json(nlohmann::json::parse(d["adapter"].cast<std::string>()));
  for (const auto& [key, value] : d["tensors"].cast<py::dict>())
    st.tensors[key.cast<std::string>()] = value.cast<at::Tensor>();
  st.trainable = d["trainable"].cast<std::vector<std::string>>();
  st.training = d["training"].cast<bool>();
  st.gradient_checkpointing = d["gradient_checkpointing"].cast<bool>();
  st.adapter_enabled = d["adapter_enabled"].cast<bool>();
  if (d.contains("quantization")) st.quantization = mola::quant::parse_kind(d["quantization"].cast<std::string>());
  return CausalLMImpl::from_state(st, /*clone=*/false);
}

// nn.Module.to's arguments: to(device), to(dtype), to(device, dtype), to(tensor),
// keywords device= / dtype= / non_blocking=, as torch parses them.
void move_model(CausalLMImpl& self, const py::args& args, const py::kwargs& kwargs) {
  const py::tuple parsed = py::module_::import("torch._C._nn").attr("_parse_to")(*args, **kwargs);
  const py::object device = parsed[0], dtype = parsed[1];
  if (!dtype.is_none() && !at::isFloatingType(dtype.cast<at::ScalarType>()))
    throw py::value_error("CausalLM.to: dtype must be a floating type (torch.float32, torch.bfloat16, "
                          "torch.float16), got " + py::repr(dtype).cast<std::string>());
  if (!device.is_none()) {
    const at::Device dev = device.cast<at::Device>();
    mola::models::check_device(dev, "keep the model on the CPU");
    self.to(dev);
  }
  if (!dtype.is_none()) self.to(dtype.cast<at::ScalarType>());
}

// aux_loss's mask: a tensor, or a list of them (one per forward that counts), joined.
std::optional<at::Tensor> joined_mask(const py::object& mask) {
  if (mask.is_none()) return std::nullopt;
  if (py::isinstance<py::list>(mask) || py::isinstance<py::tuple>(mask)) {
    std::vector<at::Tensor> parts;
    for (const auto& m : mask) parts.push_back(m.cast<at::Tensor>().reshape({-1}));
    if (parts.empty()) return std::nullopt;
    return at::cat(parts);
  }
  return mask.cast<at::Tensor>();
}

}  // namespace

void mola_bind_models(py::module_& m) {
  // A corrupt or truncated .safetensors file: a bad input, so a ValueError.
  py::register_exception<mola::io::SafetensorsError>(m, "SafetensorsError", PyExc_ValueError);
  py::register_exception<mola::models::ModelFileNotFoundError>(m, "ModelFileNotFoundError", PyExc_FileNotFoundError);

  output_type = new py::object(py::module_::import("collections").attr("namedtuple")(
      "CausalLMOutput", py::make_tuple("logits", "loss")));
  output_type->attr("__module__") = "mola";
  output_type->attr("__doc__") = "CausalLM's output: logits [batch, seq, vocab] and the loss (None without labels).";
  m.attr("CausalLMOutput") = *output_type;

  py::class_<KVCache>(m, "KVCache",
                      "The past keys and values of every layer, for CausalLM.forward(ids, cache=cache): each call "
                      "appends its tokens, numbered after the cached ones.")
      .def(py::init<>())
      .def_property_readonly("length", &KVCache::length, "How many tokens the cache holds.");

  py::class_<CausalLMImpl, std::shared_ptr<CausalLMImpl>>(
      m, "CausalLM",
      "mola's C++ decoder (llama, mistral, gemma) with Hugging Face's parameter names. "
      "Load with CausalLM.from_pretrained(path); call with (input_ids, attention_mask=None, labels=None) "
      "to get (logits, loss or None).")
      .def_static(
          "from_pretrained",
          [](const std::string& path, at::ScalarType dtype, const py::object& device,
             const std::optional<std::string>& quantize, bool double_quant) {
            const at::Device dev = to_device(device);
            const mola::quant::Kind kind = mola::quant::parse_kind(quantize.value_or(""));
            py::gil_scoped_release no_gil;
            return CausalLMImpl::from_pretrained(path, dtype, dev, kind, double_quant);
          },
          py::arg("path"), py::arg("dtype") = at::kFloat, py::arg("device") = py::str("cpu"),
          py::arg("quantize") = py::none(), py::arg("double_quant") = true,
          "Load a Hugging Face checkpoint directory (config.json and safetensors weights), in eval mode as "
          "transformers' from_pretrained (model.train() to train). quantize=\"nf4\" or \"int8\" holds the "
          "seven projection weights quantized (docs/quantization.md); double_quant=False keeps nf4's block absmaxes in "
          "fp32 (as bitsandbytes without bnb_4bit_use_double_quant). Raises "
          "FileNotFoundError for a missing directory, config.json or weights, ValueError for a bad config or "
          "weights that do not match it (naming the key and both shapes).")
      .def_property_readonly(
          "quantization", [](const CausalLMImpl& self) { return std::string(mola::quant::kind_name(self.quantization())); },
          "How the projection weights are held: \"none\" (dense), \"int8\" or \"nf4\".")
      .def(
          "forward",
          [](CausalLMImpl& self, const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
             const std::optional<at::Tensor>& labels, KVCache* cache) {
            return output_tuple(self.forward(input_ids, attention_mask, labels, cache));
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
          py::arg("cache") = py::none(),
          "CausalLMOutput(logits [batch, seq, vocab], loss or None), a namedtuple. labels are unshifted, -100 "
          "where no loss is taken.")
      .def(
          "__call__",
          [](CausalLMImpl& self, const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
             const std::optional<at::Tensor>& labels, KVCache* cache) {
            return output_tuple(self.forward(input_ids, attention_mask, labels, cache));
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
          py::arg("cache") = py::none())
      .def(
          "state_dict",
          [](CausalLMImpl& self) {
            py::dict d;
            for (const auto& p : self.named_parameters(/*recurse=*/true)) d[py::str(p.key())] = p.value();
            return d;
          },
          "The parameters by their Hugging Face names (shared with the model, not copies).")
      .def(
          "named_parameters",
          [](CausalLMImpl& self) {
            py::list out;
            for (const auto& p : self.named_parameters(/*recurse=*/true)) out.append(py::make_tuple(p.key(), p.value()));
            return out;
          },
          "[(name, tensor)] for every parameter, the model's own tensors (requires_grad as set: after attach only "
          "the adapter's), so torch.optim trains the C++ model.")
      .def(
          "parameters",
          [](CausalLMImpl& self) {
            py::list out;
            for (const auto& p : self.parameters(/*recurse=*/true)) out.append(p);
            return out;
          },
          "Every parameter tensor (shared, not copied); filter on requires_grad for an optimizer.")
      .def(
          "to",
          [](std::shared_ptr<CausalLMImpl> self, const py::args& args, const py::kwargs& kwargs) {
            move_model(*self, args, kwargs);
            return self;
          },
          "As nn.Module.to: to(device), to(dtype), to(device, dtype), to(tensor) or keywords device=, dtype=. "
          "Moves and/or casts every parameter in place (the tensor objects stay the same); returns the model.")
      .def(
          "__deepcopy__", [](const CausalLMImpl& self, const py::object&) { return self.copy(); }, py::arg("memo"),
          "copy.deepcopy: a model with its own copy of every tensor, the same adapter, mode and settings.")
      .def(py::pickle([](const CausalLMImpl& self) { return state_to_python(self.state()); },
                      [](const py::dict& d) { return state_from_python(d); }))
      .def_property_readonly("training", [](const CausalLMImpl& self) { return self.is_training(); },
                             "True in training mode (dropout on), as nn.Module.training.")
      .def(
          "zero_grad",
          [](CausalLMImpl& self, bool set_to_none) {
            for (auto& p : self.parameters(/*recurse=*/true)) {
              at::Tensor& g = p.mutable_grad();
              if (!g.defined()) continue;
              if (set_to_none) g = at::Tensor();
              else g.zero_();
            }
          },
          py::arg("set_to_none") = true, "As nn.Module.zero_grad: drops (or zeroes) every parameter's gradient.")
      .def_property(
          "adapter_enabled", &CausalLMImpl::adapter_enabled, &CausalLMImpl::set_adapter_enabled,
          "False runs the base model alone (the adapter stays attached); mola.disable_adapter(model) sets it for "
          "a with-block.")
      .def(
          "set_trainable",
          [](CausalLMImpl& self, const std::string& which) {
            const auto c = self.set_trainable(which);
            py::dict d;
            d["trainable"] = c.trainable;
            d["frozen"] = c.frozen;
            return d;
          },
          py::arg("trainable") = "all",
          "Which adapter tensors train: 'all', 'experts' (routers frozen) or 'routers' (experts frozen). "
          "Returns {'trainable': n, 'frozen': m} adapter elements.")
      .def("detach_adapter", &CausalLMImpl::detach_adapter,
           "Takes the adapter out (mola.unload): the base model as before attach, its parameters trainable again.")
      .def("attach", &attach_from_python, py::arg("config"),
           "Adds a MoLA (or LoRA) adapter to the target projections of every layer and freezes the rest. config: "
           "a mola.MoLAConfig, a dict, JSON text or a JSON file path. Raises ValueError for a bad config or target.")
      .def(
          "aux_loss",
          [](CausalLMImpl& self, std::optional<double> coef, const py::object& attention_mask) {
            return self.aux_loss(coef, joined_mask(attention_mask));
          },
          py::arg("coef") = py::none(), py::arg("attention_mask") = py::none(),
          "The load-balancing loss (docs/design.md, The balance loss) of every training forward since it was last taken (else of "
          "the last forward); taking it forgets them, as does a backward pass that reaches the adapter. coef "
          "defaults to the adapter's aux_loss_coef; attention_mask [batch, seq] leaves padding out (a list of "
          "masks, one per forward, when several count).")
      .def(
          "save_adapter", [](const CausalLMImpl& self, const std::string& dir) { mola::models::save_adapter(self, dir); },
          py::arg("directory"), "Writes adapter_config.json and adapter_model.safetensors into directory.")
      .def(
          "load_adapter",
          [](CausalLMImpl& self, const std::string& dir, bool is_trainable) {
            mola::models::load_adapter(self, dir, is_trainable);
          },
          py::arg("directory"), py::arg("is_trainable") = false,
          "Loads an adapter directory, attaching its config first when the model has no adapter. As PEFT's "
          "from_pretrained: frozen and in eval mode for inference unless is_trainable=True.")
      .def(
          "generate",
          [](CausalLMImpl& self, const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
             int64_t max_new_tokens, bool do_sample, double temperature, double top_p,
             std::optional<uint64_t> seed) {
            mola::models::GenerateOptions o;
            o.max_new_tokens = max_new_tokens;
            o.do_sample = do_sample;
            o.temperature = temperature;
            o.top_p = top_p;
            o.seed = seed;
            py::gil_scoped_release no_gil;
            return self.generate(input_ids, o, attention_mask);
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("max_new_tokens") = 20,
          py::arg("do_sample") = false, py::arg("temperature") = 1.0, py::arg("top_p") = 1.0,
          py::arg("seed") = py::none(),
          "Continues input_ids [batch, seq] by up to max_new_tokens tokens with a KV cache: greedy, or sampled "
          "(temperature, top_p; seed for a private generator). Rows stop at the config's eos and are padded after "
          "it. Returns an int64 tensor [batch, seq + generated]. attention_mask (1 = token, 0 = padding) allows a "
          "left-padded batch, generated as transformers' generate does; right padding raises ValueError.")
      .def_property("gradient_checkpointing", &CausalLMImpl::gradient_checkpointing,
                    &CausalLMImpl::set_gradient_checkpointing,
                    "Recompute each decoder layer in backward instead of keeping its activations (training only).")
      .def("set_gradient_checkpointing", &CausalLMImpl::set_gradient_checkpointing, py::arg("enabled") = true)
      .def_property_readonly("has_adapter", &CausalLMImpl::has_adapter)
      .def_property_readonly(
          "adapter_config", [](const CausalLMImpl& self) { return mola_bindings::to_python(self.adapter_config().to_json()); },
          "The attached adapter's resolved config as a dict (what adapter_config.json holds).")
      .def(
          "adapter_state_dict",
          [](const CausalLMImpl& self) {
            py::dict d;
            for (const auto& [key, t] : mola::models::adapter_state_dict(self)) d[py::str(key)] = t;
            return d;
          },
          "The adapter's parameters by their file keys (shared, not copies).")
      .def(
          "router_logits",
          [](const CausalLMImpl& self) {
            py::dict d;
            for (const auto& a : self.adapted_projections()) {
              const at::Tensor& logits = a.module->mola->router_logits;
              if (logits.defined()) d[py::str(a.path)] = logits;
            }
            return d;
          },
          "The router logits [tokens, E] of the last forward, by adapted module path "
          "(\"model.layers.3.self_attn.q_proj\"), rows in input_ids' row-major token order, padding "
          "included; empty before the first forward or without an adapter.")
      .def_property_readonly(
          "config",
          [](const CausalLMImpl& self) { return mola_bindings::to_python(self.config().to_json()); },
          "The parsed config.json as a dict, defaults filled in.")
      .def(
          "train",
          [](std::shared_ptr<CausalLMImpl> self, bool on) {
            self->train(on);
            return self;
          },
          py::arg("mode") = true, "Training mode (dropout on) or not; returns the model, as nn.Module.train.")
      .def(
          "eval",
          [](std::shared_ptr<CausalLMImpl> self) {
            self->eval();
            return self;
          },
          "Eval mode (no dropout); returns the model, as nn.Module.eval.")
      .def("__repr__", [](const CausalLMImpl& self) {
        const auto& c = self.config();
        return "CausalLM(model_type=" + c.model_type + ", layers=" + std::to_string(c.num_hidden_layers) +
               ", hidden_size=" + std::to_string(c.hidden_size) + ")";
      });
}
