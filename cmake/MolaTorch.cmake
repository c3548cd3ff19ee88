# Finds LibTorch from the torch that the project's Python has installed, so the
# C++ library, the Python extension and the tests all use one torch (LibTorch is
# that torch's own; there is no separate LibTorch download).
#
# find_package(Torch) with a CUDA build of torch overwrites CMAKE_CUDA_ARCHITECTURES
# and appends -gencode flags for a dozen architectures to CMAKE_CUDA_FLAGS; we
# save and restore both around it (docs/contributing.md, A new op), so kernels/ compiles for ours only.

find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch, os; print(torch.utils.cmake_prefix_path); print(os.path.dirname(torch.__file__))"
  OUTPUT_VARIABLE _mola_torch_out
  RESULT_VARIABLE _mola_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _mola_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "mola: ${Python_EXECUTABLE} cannot import torch. Install it first "
    "(make install-python does: .venv with torch==2.11.0), or pass "
    "-DPython_EXECUTABLE=/path/to/python that has torch.")
endif()
string(REPLACE "\n" ";" _mola_torch_out "${_mola_torch_out}")
list(GET _mola_torch_out 0 MOLA_TORCH_CMAKE_PREFIX)
list(GET _mola_torch_out 1 MOLA_TORCH_DIR)
list(APPEND CMAKE_PREFIX_PATH "${MOLA_TORCH_CMAKE_PREFIX}")

set(_mola_saved_cuda_arch "${CMAKE_CUDA_ARCHITECTURES}")
set(_mola_saved_cuda_flags "${CMAKE_CUDA_FLAGS}")
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
find_package(Torch REQUIRED)
# Recorded in the installed molaConfig.cmake, so consumers find this same torch.
set(MOLA_TORCH_CMAKE_DIR "${Torch_DIR}")
set(MOLA_TORCH_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
set(CMAKE_CUDA_ARCHITECTURES "${_mola_saved_cuda_arch}")
set(CMAKE_CUDA_FLAGS "${_mola_saved_cuda_flags}")

# The pybind11 that torch bundles: bindings must match torch's ABI and internals.
set(MOLA_TORCH_PYBIND11_INCLUDE "${MOLA_TORCH_DIR}/include")
find_library(MOLA_TORCH_PYTHON_LIBRARY torch_python PATHS "${MOLA_TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
