// Host-callable launchers of the Ascend C kernels, defined in npu_launch.asc (compiled by the Ascend C
// compiler, which is what understands the <<<blockDim, l2ctrl, stream>>> launch) and called from op_host.cpp
// (compiled by the host compiler with the torch / torch_npu headers).  Plain C++17: no Ascend, no torch.
#pragma once

#include <cstdint>

#include "ascend/kernel_args.h"
#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {
namespace npu {

enum class Elementwise : uint32_t { kEncode = 0, kDecode = 1, kRound = 2 };

// `stream` is an aclrtStream; `blocks` the tiling's block_num (> 0).  bf16: the bfloat16 kernel, else float32.
void launch_elementwise(Elementwise op, bool bf16, uint32_t blocks, void* stream, void* x, void* y, const ElemTiling& t);
void launch_amax(bool bf16, uint32_t blocks, void* stream, void* x, void* ws, const ElemTiling& t);
void launch_quantize_tensor(bool bf16, uint32_t blocks, void* stream, void* x, void* ws, void* y, const QuantTensorArgs& a);
void launch_quantize_rows(bool bf16, uint32_t blocks, void* stream, void* x, void* amax, void* y, const QuantRowArgs& a);
void launch_skiparse(SkiparseOp op, uint32_t blocks, void* stream, void* x, void* y, const SkiparseArgs& a);

}  // namespace npu
}  // namespace ascend
}  // namespace ospfn
