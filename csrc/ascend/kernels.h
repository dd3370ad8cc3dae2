// Declarations of the Ascend C kernel entry points of hif8_kernel.cpp and skiparse_kernel.cpp, for code that
// launches them from another translation unit (the CPU simulator module).  Include after the Ascend C API.
#pragma once

#include "ascend/kernel_args.h"
#include "ascend/tiling.h"

extern "C" {
__global__ __aicore__ void ospfn_hif8_encode_f32(GM_ADDR x, GM_ADDR codes, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_encode_bf16(GM_ADDR x, GM_ADDR codes, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_decode_f32(GM_ADDR codes, GM_ADDR y, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_decode_bf16(GM_ADDR codes, GM_ADDR y, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_round_f32(GM_ADDR x, GM_ADDR y, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_round_bf16(GM_ADDR x, GM_ADDR y, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_amax_f32(GM_ADDR x, GM_ADDR ws, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_amax_bf16(GM_ADDR x, GM_ADDR ws, ospfn::ascend::ElemTiling t);
__global__ __aicore__ void ospfn_hif8_quantize_tensor_f32(GM_ADDR x, GM_ADDR ws, GM_ADDR y, ospfn::ascend::QuantTensorArgs a);
__global__ __aicore__ void ospfn_hif8_quantize_tensor_bf16(GM_ADDR x, GM_ADDR ws, GM_ADDR y, ospfn::ascend::QuantTensorArgs a);
__global__ __aicore__ void ospfn_hif8_quantize_rows_f32(GM_ADDR x, GM_ADDR amax, GM_ADDR y, ospfn::ascend::QuantRowArgs a);
__global__ __aicore__ void ospfn_hif8_quantize_rows_bf16(GM_ADDR x, GM_ADDR amax, GM_ADDR y, ospfn::ascend::QuantRowArgs a);
__global__ __aicore__ void ospfn_skiparse_fold(GM_ADDR x, GM_ADDR y, ospfn::ascend::SkiparseArgs a);
__global__ __aicore__ void ospfn_skiparse_unfold(GM_ADDR x, GM_ADDR y, ospfn::ascend::SkiparseArgs a);
__global__ __aicore__ void ospfn_skiparse_switch(GM_ADDR x, GM_ADDR y, ospfn::ascend::SkiparseArgs a);
}
