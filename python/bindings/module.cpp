// mola._C: the pybind11 module of the Python package. Importing it loads
// libmola, whose static initialisers register the mola ops with the
// dispatcher (torch.ops.mola.*). The bindings themselves stay thin: each
// concept binds in its own file through a mola_bind_<concept> function.
#include <pybind11/pybind11.h>

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
  mola_bind_config(m);
  mola_bind_models(m);
  mola_bind_data(m);
  mola_bind_train(m);
  mola_bind_convert(m);
  mola_bind_evaluate(m);
  mola_bind_run(m);
}
