// pybind11 entry point of pymesh._C. Kernels register themselves here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymesh fused kernels (CPU; CUDA when built with a CUDA compiler)";
  m.attr("has_cuda") = false;
}
