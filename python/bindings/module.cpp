// mola._C: the pybind11 module of the Python package. Importing it loads
// libmola, whose static initialisers register the mola ops with the
// dispatcher (torch.ops.mola.*). The bindings themselves stay thin: each
// concept binds in its own file through a mola_bind_<concept> function.
#include <mola/ops.h>

#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

void mola_bind_config(pybind11::module_& m);
void mola_bind_models(pybind11::module_& m);
void mola_bind_data(pybind11::module_& m);
void mola_bind_train(pybind11::module_& m);
void mola_bind_convert(pybind11::module_& m);
void mola_bind_evaluate(pybind11::module_& m);
void mola_bind_run(pybind11::module_& m);

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
