// Host side of the NPU kernels: the PrivateUse1 (torch_npu) implementations of the ospfn ops.
//
// Built only by the ospfn_npu target, where CANN and torch_npu are present (CMakeLists.txt); never compiled
// on a machine without them, and nothing here has run on hardware yet (docs/npu.md#what-has-run-on-real-hardware).
// The planning it does (costs, tiling, Skiparse geometry) is csrc/ascend/kernel_args.h + tiling.h, the code
// the CPU tests run through ospfn._ascend_sim.
//
// Ops (schemas: csrc/ascend/schema.h):
//   hif8_encode / _hif8_encode_arith   float32, bfloat16 natively; float16 widened exactly to float32
//   hif8_decode                        to float32 / bfloat16 natively; float16 / float64 from float32 (exact)
//   hif8_round                         float32, bfloat16 natively; float16 through float32 (exact)
//   hif8_quantize                      float32, bfloat16 natively; float16 / float64 through float32, like ref
//   skiparse_fold / _unfold / _switch  any dtype (raw row bytes)
// float64 encode / round need the round-toward-zero narrowing of the CPU path and are refused here.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "tiling/platform/platform_ascendc.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

#include "ascend/kernel_args.h"
#include "ascend/launch.h"
#include "ascend/schema.h"
#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {
namespace npu {
namespace {

struct DeviceInfo {
  uint64_t cores;
  uint64_t ub_budget;
};

// AIV core count and UB size from the platform, the 910B defaults when it cannot say; kUbReserve is left
// to the runtime.
const DeviceInfo& device_info() {
  static const DeviceInfo info = [] {
    DeviceInfo d{kDefaultCores, kDefaultUbBytes - kUbReserve};
    auto* plat = platform_ascendc::PlatformAscendCManager::GetInstance();
    if (plat != nullptr) {
      const uint64_t cores = plat->GetCoreNumAiv();
      if (cores > 0) d.cores = cores;
      uint64_t ub = 0;
      plat->GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub);
      if (ub > kUbReserve) d.ub_budget = ub - kUbReserve;
    }
    return d;
  }();
  return info;
}

void* stream() { return c10_npu::getCurrentNPUStream().stream(false); }

void check_npu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1, op, ": ", arg, " must be an NPU tensor, got ", t.device());
}

// Contiguous with a 32-byte aligned start (a view into storage may start anywhere; the kernels' DataCopy
// rule needs aligned bases).
at::Tensor prepared(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % kBlockBytes != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

at::Tensor output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor out = at::empty(sizes, opts);
  TORCH_CHECK(out.numel() == 0 || reinterpret_cast<uintptr_t>(out.data_ptr()) % kBlockBytes == 0,
              "ospfn npu: the allocator returned a buffer that is not 32-byte aligned");
  return out;
}

void check_tiling(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, ": ", err); }

uint32_t blocks_of(uint64_t block_num) { return static_cast<uint32_t>(block_num); }

uint32_t f32_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

// ----------------------------------------------------------------------------------------------------------
// HiF8

at::Tensor elementwise(Elementwise op, const at::Tensor& x, at::ScalarType out_dtype, uint64_t in_bytes, uint64_t out_bytes,
                       bool bf16, const char* name) {
  const at::Tensor xc = prepared(x);
  at::Tensor out = output(xc.sizes(), xc.options().dtype(out_dtype));
  const uint64_t n = static_cast<uint64_t>(xc.numel());
  const KernelCost cost = op == Elementwise::kEncode   ? cost_encode(in_bytes)
                          : op == Elementwise::kDecode ? cost_decode(out_bytes)
                                                       : cost_round(in_bytes);
  const DeviceInfo& d = device_info();
  ElemTiling t;
  check_tiling(make_elem_tiling(n, cost, d.ub_budget, d.cores, &t), name);
  if (t.block_num > 0) launch_elementwise(op, bf16, blocks_of(t.block_num), stream(), xc.data_ptr(), out.data_ptr(), t);
  return out;
}

void check_float(const at::Tensor& x, const char* op) {
  check_npu(x, op, "x");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op,
              ": x must be float32, float64, float16 or bfloat16, got ", st);
}

at::Tensor hif8_encode(const at::Tensor& x) {
  check_float(x, "hif8_encode");
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "hif8_encode: float64 on the NPU is not supported (it needs round-toward-zero narrowing); use the cpu or ref backend");
  if (x.scalar_type() == at::kBFloat16) return elementwise(Elementwise::kEncode, x, at::kByte, 2, 1, true, "hif8_encode");
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);  // float16 widens exactly
  return elementwise(Elementwise::kEncode, xf, at::kByte, 4, 1, false, "hif8_encode");
}

at::Tensor hif8_decode(const at::Tensor& codes, at::ScalarType dtype) {
  check_npu(codes, "hif8_decode", "codes");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "hif8_decode: codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "hif8_decode: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  if (dtype == at::kBFloat16) return elementwise(Elementwise::kDecode, codes, at::kBFloat16, 1, 2, true, "hif8_decode");
  at::Tensor out = elementwise(Elementwise::kDecode, codes, at::kFloat, 1, 4, false, "hif8_decode");
  return dtype == at::kFloat ? out : out.to(dtype);  // every HiF8 value is exact in float16 / float64
}

at::Tensor hif8_round(const at::Tensor& x) {
  check_float(x, "hif8_round");
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "hif8_round: float64 on the NPU is not supported (it needs round-toward-zero narrowing); use the cpu or ref backend");
  if (x.scalar_type() == at::kBFloat16) return elementwise(Elementwise::kRound, x, at::kBFloat16, 2, 2, true, "hif8_round");
  if (x.scalar_type() == at::kFloat) return elementwise(Elementwise::kRound, x, at::kFloat, 4, 4, false, "hif8_round");
  return elementwise(Elementwise::kRound, x.to(at::kFloat), at::kFloat, 4, 4, false, "hif8_round").to(x.scalar_type());
}

at::Tensor quantize_native(const at::Tensor& x_in, float scale_max, bool rowwise, const std::optional<at::Tensor>& amax) {
  const at::Tensor x = prepared(x_in);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const uint64_t esize = bf16 ? 2 : 4;
  at::Tensor out = output(x.sizes(), x.options());
  const uint64_t n = static_cast<uint64_t>(x.numel());
  if (n == 0) return out;
  const DeviceInfo& d = device_info();
  if (!rowwise) {
    ElemTiling t;
    check_tiling(make_elem_tiling(n, cost_quantize_tensor(esize, d.cores), d.ub_budget, d.cores, &t), "hif8_quantize");
    at::Tensor ws;
    uint64_t partials;
    if (amax.has_value()) {  // the given amax goes to word 0 of a one-line workspace
      ws = at::zeros({static_cast<int64_t>(kPartialWords)}, x.options().dtype(at::kInt));
      ws.narrow(0, 0, 1).copy_(amax->reshape({1}).view(at::kInt));
      partials = 1;
    } else {
      ws = at::empty({static_cast<int64_t>(t.block_num * kPartialWords)}, x.options().dtype(at::kInt));
      launch_amax(bf16, blocks_of(t.block_num), stream(), x.data_ptr(), ws.data_ptr(), t);
      partials = t.block_num;
    }
    const QuantTensorArgs a{t, partials, f32_bits(scale_max), 0};
    launch_quantize_tensor(bf16, blocks_of(t.block_num), stream(), x.data_ptr(), ws.data_ptr(), out.data_ptr(), a);
    return out;
  }
  const uint64_t cols = static_cast<uint64_t>(x.size(-1));
  const uint64_t rows = cols == 0 ? 0 : n / cols;
  RowTiling t;
  check_tiling(make_row_tiling(rows, cols, cost_quantize_rows(esize), d.ub_budget, d.cores, &t), "hif8_quantize");
  if (t.block_num == 0) return out;
  at::Tensor am;
  if (amax.has_value()) am = prepared(*amax);
  const QuantRowArgs a{t, f32_bits(scale_max), amax.has_value() ? 1u : 0u};
  launch_quantize_rows(bf16, blocks_of(t.block_num), stream(), x.data_ptr(), am.defined() ? am.data_ptr() : nullptr,
                       out.data_ptr(), a);
  return out;
}

at::Tensor hif8_quantize(const at::Tensor& x, double scale_max_d, bool rowwise, const std::optional<at::Tensor>& amax) {
  check_float(x, "hif8_quantize");
  const float scale_max = static_cast<float>(scale_max_d);
  TORCH_CHECK(std::isfinite(scale_max) && scale_max > 0.0f, "hif8_quantize: scale_max must be finite and > 0, got ", scale_max_d);
  TORCH_CHECK(!rowwise || x.dim() >= 1, "hif8_quantize: row granularity needs x.dim() >= 1");
  if (amax.has_value()) {
    check_npu(*amax, "hif8_quantize", "amax");
    TORCH_CHECK(amax->scalar_type() == at::kFloat, "hif8_quantize: amax must be float32, got ", amax->scalar_type());
    const int64_t rows = rowwise ? (x.size(-1) == 0 ? 0 : x.numel() / x.size(-1)) : 1;
    TORCH_CHECK(amax->numel() == rows, "hif8_quantize: amax must have ", rows, " element(s), got ", amax->numel());
  }
  const auto st = x.scalar_type();
  if (st == at::kFloat || st == at::kBFloat16) return quantize_native(x, scale_max, rowwise, amax);
  // float16 / float64: the ref computes in float32 and casts the result back; so does this
  return quantize_native(x.to(at::kFloat), scale_max, rowwise, amax).to(st);
}

// ----------------------------------------------------------------------------------------------------------
// Skiparse

at::Tensor skiparse(SkiparseOp op, const at::Tensor& x_in, int64_t T, int64_t H, int64_t W, int64_t ratio, bool group,
                    const char* name) {
  check_npu(x_in, name, "x");
  TORCH_CHECK(x_in.dim() == 3, name, ": expected a [batch, tokens, channels] tensor, got ", x_in.dim(), " dims");
  TORCH_CHECK(T >= 1 && H >= 1 && W >= 1 && ratio >= 1, name, ": grid and ratio must be positive");
  TORCH_CHECK(ratio == 1 || (H >= ratio && W >= ratio), name, ": H and W must be >= ratio");
  if (ratio == 1) return x_in.clone(at::MemoryFormat::Contiguous);
  const int64_t m = ratio * ratio;
  const int64_t B = op == SkiparseOp::kFold ? x_in.size(0) : x_in.size(0) / m;
  const SkiparseGeom g = skiparse_geom(B, T, H, W, ratio, group);
  const int64_t seq = static_cast<int64_t>(skiparse_seq(g)), C = x_in.size(2);
  std::vector<int64_t> out_sizes;
  if (op == SkiparseOp::kFold) {
    TORCH_CHECK(x_in.size(1) == T * H * W, name, ": x has ", x_in.size(1), " tokens, the grid T*H*W = ", T * H * W);
    out_sizes = {m * B, seq, C};
  } else {
    TORCH_CHECK(x_in.size(0) % m == 0 && x_in.size(1) == seq, name, ": y must have shape [ratio^2 * B, ", seq, ", C]");
    out_sizes = op == SkiparseOp::kUnfold ? std::vector<int64_t>{B, T * H * W, C} : x_in.sizes().vec();
  }
  const at::Tensor x = prepared(x_in);
  at::Tensor out = output(out_sizes, x.options());
  const uint64_t row_bytes = static_cast<uint64_t>(C) * x.element_size();
  const DeviceInfo& d = device_info();
  RowTiling t;
  check_tiling(make_row_tiling(skiparse_out_rows(g, op), row_bytes, cost_skiparse(), d.ub_budget, d.cores, &t), name);
  if (t.block_num == 0) return out;
  const SkiparseArgs a{t, g, skiparse_in_rows(g, op)};
  launch_skiparse(op, blocks_of(t.block_num), stream(), x.data_ptr(), out.data_ptr(), a);
  return out;
}

at::Tensor skiparse_fold(const at::Tensor& x, int64_t T, int64_t H, int64_t W, int64_t ratio, bool group) {
  return skiparse(SkiparseOp::kFold, x, T, H, W, ratio, group, "skiparse_fold");
}
at::Tensor skiparse_unfold(const at::Tensor& y, int64_t T, int64_t H, int64_t W, int64_t ratio, bool group) {
  return skiparse(SkiparseOp::kUnfold, y, T, H, W, ratio, group, "skiparse_unfold");
}
at::Tensor skiparse_switch(const at::Tensor& y, int64_t T, int64_t H, int64_t W, int64_t ratio) {
  return skiparse(SkiparseOp::kSwitch, y, T, H, W, ratio, false, "skiparse_switch");
}

// Meta kernels of the Skiparse ops (shapes only), for FakeTensor / torch.compile tracing.
std::vector<int64_t> skiparse_meta_sizes(bool fold, bool unfold, const at::Tensor& x, int64_t T, int64_t H, int64_t W,
                                         int64_t P) {
  const int64_t m = P * P, Hp = (H + m - 1) / m * m, Wp = (W + m - 1) / m * m, seq = T * Hp * Wp / m;
  if (fold) return {m * x.size(0), seq, x.size(2)};
  if (unfold) return {x.size(0) / m, T * H * W, x.size(2)};
  return x.sizes().vec();
}
at::Tensor skiparse_fold_meta(const at::Tensor& x, int64_t T, int64_t H, int64_t W, int64_t ratio, bool) {
  return at::empty(ratio == 1 ? x.sizes().vec() : skiparse_meta_sizes(true, false, x, T, H, W, ratio), x.options());
}
at::Tensor skiparse_unfold_meta(const at::Tensor& y, int64_t T, int64_t H, int64_t W, int64_t ratio, bool) {
  return at::empty(ratio == 1 ? y.sizes().vec() : skiparse_meta_sizes(false, true, y, T, H, W, ratio), y.options());
}
at::Tensor skiparse_switch_meta(const at::Tensor& y, int64_t, int64_t, int64_t, int64_t) {
  return at::empty(y.sizes(), y.options());
}

}  // namespace
}  // namespace npu
}  // namespace ascend
}  // namespace ospfn

// The HiF8 schemas come from ospfn._C (csrc/ops/hif8_ops.cpp); the Skiparse ones are declared here
// (csrc/ascend/schema.h explains why).
TORCH_LIBRARY_FRAGMENT(ospfn, m) {
  for (const char* schema : ospfn::ascend::kSkiparseSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(ospfn, PrivateUse1, m) {
  namespace n = ospfn::ascend::npu;
  m.impl("hif8_encode", &n::hif8_encode);
  m.impl("_hif8_encode_arith", &n::hif8_encode);
  m.impl("hif8_decode", &n::hif8_decode);
  m.impl("hif8_round", &n::hif8_round);
  m.impl("hif8_quantize", &n::hif8_quantize);
  m.impl("skiparse_fold", &n::skiparse_fold);
  m.impl("skiparse_unfold", &n::skiparse_unfold);
  m.impl("skiparse_switch", &n::skiparse_switch);
}

TORCH_LIBRARY_IMPL(ospfn, Meta, m) {
  namespace n = ospfn::ascend::npu;
  m.impl("skiparse_fold", &n::skiparse_fold_meta);
  m.impl("skiparse_unfold", &n::skiparse_unfold_meta);
  m.impl("skiparse_switch", &n::skiparse_switch_meta);
}
