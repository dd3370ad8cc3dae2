// Operator names and schemas of the NPU library (op_host.cpp), kept in one header so the CPU test-suite can
// check them (ospfn._ascend_sim exposes these lists; tests/test_ascend_kernels.py parses the schemas and
// checks that every HiF8 op the NPU library implements is declared by ospfn._C).
//
// The HiF8 ops are declared by ospfn._C (csrc/ops/hif8_ops.cpp: TORCH_LIBRARY_FRAGMENT(ospfn, ...)); the NPU
// library only adds PrivateUse1 kernels for them.  The Skiparse ops have no CPU kernel in ospfn._C (the
// Python backends run them), so the NPU library declares their schemas itself, in its own
// TORCH_LIBRARY_FRAGMENT: the CPU build stays unchanged.  Should ospfn._C ever declare them, delete the
// m.def calls in op_host.cpp (a schema defined twice is an error when both libraries load).
#pragma once

namespace ospfn {
namespace ascend {

constexpr const char* kHif8NpuOps[] = {"hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize", "_hif8_encode_arith"};

constexpr const char* kSkiparseSchemas[] = {
    "skiparse_fold(Tensor x, int T, int H, int W, int ratio, bool group) -> Tensor",
    "skiparse_unfold(Tensor y, int T, int H, int W, int ratio, bool group) -> Tensor",
    "skiparse_switch(Tensor y, int T, int H, int W, int ratio) -> Tensor",
};

}  // namespace ascend
}  // namespace ospfn
