// mola._C: the pybind11 module of the Python package. Importing it loads
// libmola, whose static initialisers register the mola ops with the
// dispatcher (torch.ops.mola.*). The bindings themselves stay thin: each
// concept binds in its own file through a mola_bind_<concept> function.
#include <mola/config.h>
#include <mola/nn/moe_lora_linear.h>
#include <mola/ops.h>
#include <mola/quant.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

void mola_bind_config(pybind11::module_& m);
void mola_bind_models(pybind11::module_& m);
void mola_bind_data(pybind11::module_& m);
void mola_bind_train(pybind11::module_& m);
void mola_bind_convert(pybind11::module_& m);
void mola_bind_evaluate(pybind11::module_& m);
void mola_bind_run(pybind11::module_& m);

namespace {
// quantize_weight's dict back into a QuantizedWeight.
mola::quant::QuantizedWeight quantized_weight(const std::map<std::string, at::Tensor>& t, const std::string& kind,
                                              int64_t out, int64_t in) {
  mola::quant::QuantizedWeight q;
  q.kind = mola::quant::parse_kind(kind);
  q.out_features = out;
  q.in_features = in;
  const auto get = [&](const char* name) {
    const auto it = t.find(name);
    return it == t.end() ? at::Tensor() : it->second;
  };
  q.data = get("data");
  q.scale = get("scale");
  q.scale_scale = get("scale_scale");
  q.scale_offset = get("scale_offset");
  return q;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mola's C++ core: the op library and its bindings";
#ifdef MOLA_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("cpu_computes_in_fp32", &mola::ops::cpu_computes_in_fp32, pybind11::arg("dtype"),
        "Whether this CPU runs dtype (torch.bfloat16, torch.float16) work in fp32 from 16-bit storage (no native "
        "16-bit matrix units: ATen's 16-bit matmul would take a slow path).");
  m.def(
      "pissa_init",
      [](at::Tensor weight, at::Tensor lora_a, at::Tensor lora_b, double scaling) {
        mola::nn::detail::pissa_init(weight, lora_a, lora_b, scaling);
      },
      pybind11::arg("weight"), pybind11::arg("lora_a"), pybind11::arg("lora_b"), pybind11::arg("scaling"),
      "PiSSA in place (mola::nn::detail::pissa_init): every expert gets the principal part of weight, which "
      "loses it.");
  m.def(
      "quantize_weight",
      [](const at::Tensor& weight, const std::string& kind, bool double_quant) {
        return mola::quant::quantize(weight, mola::quant::parse_kind(kind), double_quant).tensors();
      },
      pybind11::arg("weight"), pybind11::arg("kind"), pybind11::arg("double_quant") = true,
      "mola::quant::quantize: a dict of the stored tensors (data, scale; nf4 with double quantization also "
      "scale_scale, scale_offset).");
  m.def(
      "dequantize_weight",
      [](const std::map<std::string, at::Tensor>& t, const std::string& kind, int64_t out, int64_t in,
         at::ScalarType dtype) {
        return mola::quant::dequantize(quantized_weight(t, kind, out, in), dtype);
      },
      pybind11::arg("tensors"), pybind11::arg("kind"), pybind11::arg("out_features"), pybind11::arg("in_features"),
      pybind11::arg("dtype") = at::kFloat, "mola::quant::dequantize of quantize_weight's dict.");
  m.def(
      "quantized_linear",
      [](const at::Tensor& x, const std::map<std::string, at::Tensor>& t, const std::string& kind, int64_t out,
         int64_t in, const std::optional<at::Tensor>& bias) {
        return mola::quant::linear(x, std::make_shared<const mola::quant::QuantizedWeight>(quantized_weight(t, kind, out, in)),
                                   bias);
      },
      pybind11::arg("x"), pybind11::arg("tensors"), pybind11::arg("kind"), pybind11::arg("out_features"),
      pybind11::arg("in_features"), pybind11::arg("bias") = pybind11::none(),
      "mola::quant::linear: x W^T + b from quantize_weight's dict, differentiable in x.");
  m.def(
      "nf4_values", [] { const auto& v = mola::quant::nf4_values(); return std::vector<float>(v.begin(), v.end()); },
      "NF4's sixteen values, ascending.");
  m.def(
      "compute_names", [] { return mola::AdapterConfig::compute_modes(); },
      "The names of the op's compute codes in code order (auto, dense, grouped): the one mapping.");
  m.def(
      "resolve_compute",
      [](int64_t compute, int64_t num_experts, int64_t rank, bool per_expert_dropout) {
        return static_cast<int64_t>(mola::ops::resolve_compute(static_cast<mola::ops::Compute>(compute),
                                                               num_experts, rank, per_expert_dropout));
      },
      pybind11::arg("compute"), pybind11::arg("num_experts"), pybind11::arg("rank"),
      pybind11::arg("per_expert_dropout") = false,
      "The strategy code (1 dense, 2 grouped) compute (0 auto, 1, 2) stands for at this shape: the one rule, "
      "mola::ops::resolve_compute.");
  mola_bind_config(m);
  mola_bind_models(m);
  mola_bind_data(m);
  mola_bind_train(m);
  mola_bind_convert(m);
  mola_bind_evaluate(m);
  mola_bind_run(m);
}
