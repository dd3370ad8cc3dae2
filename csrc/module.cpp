// The Python extension module ospfn._C.  Importing it loads this shared library, whose static
// initialisers register the CPU ops of csrc/ops/*.cpp with the torch dispatcher (torch.ops.ospfn.*).
// The module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include <string>

#ifndef OSPFN_TORCH_VERSION
#define OSPFN_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ospfn compiled CPU ops (registered under torch.ops.ospfn)";
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = OSPFN_TORCH_VERSION;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
    d["openmp"] = _OPENMP;
#else
    d["openmp"] = py::none();
#endif
    d["cplusplus"] = static_cast<long>(__cplusplus);
    return d;
  });
}
