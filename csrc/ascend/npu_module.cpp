// The Python extension module ospfn._npu (target ospfn_npu, built only with CANN + torch_npu).  Importing
// it loads this library, whose static initialisers register the PrivateUse1 kernels of op_host.cpp (and the
// Skiparse schemas) with the torch dispatcher; import torch_npu first.  The module itself only reports how it
// was built.
#include <pybind11/pybind11.h>

#ifndef OSPFN_NPU_STATUS
#define OSPFN_NPU_STATUS "built"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_npu, m) {
  m.doc() = "ospfn Ascend C kernels for torch_npu (registered under torch.ops.ospfn for NPU tensors)";
  py::dict info;
  info["ospfn_npu"] = OSPFN_NPU_STATUS;
  m.attr("BUILD_INFO") = info;
}
