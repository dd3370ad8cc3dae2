// CPU torch ops for the HiF8 codec: torch.ops.ospfn.hif8_{encode,decode,round,quantize}.
//
// Argument validation (dtype, scale_max, granularity) happens in the Python wrappers of ospfn.ops.hif8,
// which are the public API; the checks here are a second line of defence for direct torch.ops callers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "hif8/hif8.h"

namespace ospfn {
namespace {

constexpr int64_t kGrain = 1 << 15;

const hif8::EncodeTable& encode_table() {
  static const hif8::EncodeTable table = [] {
    hif8::EncodeTable t{};
    hif8::fill_encode_table(t);
    return t;
  }();
  return table;
}

const float* decode_table() {
  static const struct Lut {
    float v[256];
    Lut() {
      for (int c = 0; c < 256; ++c) v[c] = hif8::decode(static_cast<uint8_t>(c));
    }
  } lut;
  return lut.v;
}

// Input element -> fp32 bits that encode to the correctly rounded code.  bf16/fp16 widen exactly; double
// narrows toward zero (hif8::to_f32_rz), which keeps it on the right side of every midpoint.
template <typename T>
inline uint32_t encodable_bits(T v) {
  return hif8::f32_bits(static_cast<float>(v));
}
template <>
inline uint32_t encodable_bits<double>(double v) {
  return hif8::f32_bits(hif8::to_f32_rz(v));
}

void check_float_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": the cpp backend runs on CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

at::Tensor hif8_encode(const at::Tensor& x_in) {
  check_float_input(x_in, "hif8_encode");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  uint8_t* o = out.data_ptr<uint8_t>();
  const hif8::EncodeTable& t = encode_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hif8_encode", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = hif8::encode_bits_table(t, encodable_bits(p[i]));
    });
  });
  return out;
}

// The table-free scalar path of the header (the one the Ascend kernels use), exposed for tests only.
at::Tensor hif8_encode_arith(const at::Tensor& x_in) {
  check_float_input(x_in, "_hif8_encode_arith");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  uint8_t* o = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "_hif8_encode_arith", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = hif8::encode_bits(encodable_bits(p[i]));
    });
  });
  return out;
}

at::Tensor hif8_decode(const at::Tensor& codes_in, at::ScalarType dtype) {
  TORCH_CHECK(codes_in.device().is_cpu(), "hif8_decode: the cpp backend runs on CPU tensors, got ",
              codes_in.device());
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "hif8_decode: codes must be uint8, got ",
              codes_in.scalar_type());
  const at::Tensor codes = codes_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  const int64_t n = codes.numel();
  const uint8_t* c = codes.const_data_ptr<uint8_t>();
  const float* lut = decode_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "hif8_decode", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = static_cast<scalar_t>(lut[c[i]]);  // exact in every dtype
    });
  });
  return out;
}

at::Tensor hif8_round(const at::Tensor& x_in) {
  check_float_input(x_in, "hif8_round");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  const hif8::EncodeTable& t = encode_table();
  const float* lut = decode_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hif8_round", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        o[i] = static_cast<scalar_t>(lut[hif8::encode_bits_table(t, encodable_bits(p[i]))]);
    });
  });
  return out;
}

// max over the |x| bit patterns: for non-negative floats integer order is value order, and any NaN
// (sign cleared) compares above +Inf, so a NaN anywhere makes amax NaN, as torch.amax does.
template <typename T>
inline uint32_t abs_bits(T v) {
  return hif8::f32_bits(static_cast<float>(v)) & 0x7FFFFFFFu;
}

inline float scale_from_amax(float amax, float scale_max) {
  const float denom = amax < 1e-8f ? 1e-8f : amax;  // NaN stays NaN; a negative given amax acts as 1e-8
  return scale_max / denom;
}

inline float scale_from_amax_bits(uint32_t amax_bits, float scale_max) {
  return scale_from_amax(hif8::f32_from_bits(amax_bits), scale_max);
}

template <typename T>
inline T quantize_one(T v, float s, const hif8::EncodeTable& t, const float* lut) {
  const float xs = static_cast<float>(v) * s;
  return static_cast<T>(lut[hif8::encode_bits_table(t, hif8::f32_bits(xs))] / s);
}

// amax_opt: an optional given amax (float32; one element for the tensor granularity, one per row for rows)
// that replaces the computed one, e.g. after an all-reduce over a process group.
at::Tensor hif8_quantize(const at::Tensor& x_in, double scale_max_d, bool rowwise,
                         const std::optional<at::Tensor>& amax_opt) {
  check_float_input(x_in, "hif8_quantize");
  const float scale_max = static_cast<float>(scale_max_d);
  TORCH_CHECK(std::isfinite(scale_max) && scale_max > 0.0f,
              "hif8_quantize: scale_max must be finite and > 0, got ", scale_max_d);
  TORCH_CHECK(!rowwise || x_in.dim() >= 1, "hif8_quantize: row granularity needs x.dim() >= 1");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  const int64_t rows_total = rowwise ? (x.size(-1) == 0 ? 0 : n / x.size(-1)) : 1;
  at::Tensor given;
  if (amax_opt.has_value()) {
    given = amax_opt->contiguous();
    TORCH_CHECK(given.device().is_cpu() && given.scalar_type() == at::kFloat,
                "hif8_quantize: amax must be a float32 CPU tensor, got ", given.scalar_type(), " on ",
                given.device());
    TORCH_CHECK(given.numel() == rows_total, "hif8_quantize: amax must have ", rows_total,
                " element(s) (one per ", rowwise ? "row" : "tensor", "), got ", given.numel());
  }
  if (n == 0) return out;
  const float* given_amax = given.defined() ? given.const_data_ptr<float>() : nullptr;
  const hif8::EncodeTable& t = encode_table();
  const float* lut = decode_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hif8_quantize", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (!rowwise) {
      const uint32_t amax_bits = given_amax ? hif8::f32_bits(given_amax[0]) : at::parallel_reduce(
          0, n, kGrain, uint32_t{0},
          [&](int64_t b, int64_t e, uint32_t acc) {
            for (int64_t i = b; i < e; ++i) {
              const uint32_t a = abs_bits(p[i]);
              acc = a > acc ? a : acc;
            }
            return acc;
          },
          [](uint32_t a, uint32_t b) { return a > b ? a : b; });
      const float s = scale_from_amax_bits(amax_bits, scale_max);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = quantize_one(p[i], s, t, lut);
      });
    } else {
      const int64_t cols = x.size(-1);
      const int64_t rows = cols == 0 ? 0 : n / cols;
      const int64_t row_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
      at::parallel_for(0, rows, row_grain, [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const scalar_t* pr = p + r * cols;
          scalar_t* orow = o + r * cols;
          float s;
          if (given_amax) {
            s = scale_from_amax(given_amax[r], scale_max);
          } else {
            uint32_t acc = 0;
            for (int64_t j = 0; j < cols; ++j) {
              const uint32_t a = abs_bits(pr[j]);
              acc = a > acc ? a : acc;
            }
            s = scale_from_amax_bits(acc, scale_max);
          }
          for (int64_t j = 0; j < cols; ++j) orow[j] = quantize_one(pr[j], s, t, lut);
        }
      });
    }
  });
  return out;
}

}  // namespace

// pt2_compliant_tag: every op has a Meta kernel below (shapes and dtypes only), so dynamo / inductor trace it
// as one opaque node, and each passes torch.library.opcheck (tests/test_compile_ops.py).
TORCH_LIBRARY_FRAGMENT(ospfn, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("hif8_encode(Tensor x) -> Tensor", tags);
  m.def("hif8_decode(Tensor codes, ScalarType dtype) -> Tensor", tags);
  m.def("hif8_round(Tensor x) -> Tensor", tags);
  m.def("hif8_quantize(Tensor x, float scale_max, bool rowwise, Tensor? amax=None) -> Tensor", tags);
  m.def("_hif8_encode_arith(Tensor x) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(ospfn, CPU, m) {
  m.impl("hif8_encode", &hif8_encode);
  m.impl("hif8_decode", &hif8_decode);
  m.impl("hif8_round", &hif8_round);
  m.impl("hif8_quantize", &hif8_quantize);
  m.impl("_hif8_encode_arith", &hif8_encode_arith);
}

// ----------------------------------------------------------------------------------------------------------
// Meta kernels: output shapes and dtypes only (FakeTensor / torch.compile tracing).  Sizes are SymInts, so
// they also trace with dynamic shapes.  The outputs are contiguous, like those of the CPU kernels.

namespace {

void check_float_meta(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

at::Tensor hif8_encode_meta(const at::Tensor& x) {
  check_float_meta(x, "hif8_encode");
  return at::empty_symint(x.sym_sizes(), x.options().dtype(at::kByte));
}

at::Tensor hif8_encode_arith_meta(const at::Tensor& x) {
  check_float_meta(x, "_hif8_encode_arith");
  return at::empty_symint(x.sym_sizes(), x.options().dtype(at::kByte));
}

at::Tensor hif8_decode_meta(const at::Tensor& codes, at::ScalarType dtype) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, "hif8_decode: codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "hif8_decode: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  return at::empty_symint(codes.sym_sizes(), codes.options().dtype(dtype));
}

at::Tensor hif8_round_meta(const at::Tensor& x) {
  check_float_meta(x, "hif8_round");
  return at::empty_symint(x.sym_sizes(), x.options());
}

at::Tensor hif8_quantize_meta(const at::Tensor& x, double scale_max, bool rowwise,
                              const std::optional<at::Tensor>& amax) {
  check_float_meta(x, "hif8_quantize");
  TORCH_CHECK(!rowwise || x.dim() >= 1, "hif8_quantize: row granularity needs x.dim() >= 1");
  if (amax.has_value()) {
    TORCH_CHECK(amax->scalar_type() == at::kFloat, "hif8_quantize: amax must be float32, got ",
                amax->scalar_type());
  }
  return at::empty_symint(x.sym_sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(ospfn, Meta, m) {
  m.impl("hif8_encode", &hif8_encode_meta);
  m.impl("hif8_decode", &hif8_decode_meta);
  m.impl("hif8_round", &hif8_round_meta);
  m.impl("hif8_quantize", &hif8_quantize_meta);
  m.impl("_hif8_encode_arith", &hif8_encode_arith_meta);
}

// ----------------------------------------------------------------------------------------------------------
// Autograd kernels: the ops are not differentiable (their results never carry autograd history, like the
// Python API's), so each one steps below autograd and re-dispatches to the backend kernel.  Registering them
// explicitly (instead of relying on the autograd fallback) is what torch.library.opcheck asks of
// non-differentiable ops.

namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor hif8_encode_autograd(const at::Tensor& x) {
  static const auto op = handle<decltype(hif8_encode_meta)>("ospfn::hif8_encode");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x);
}

at::Tensor hif8_encode_arith_autograd(const at::Tensor& x) {
  static const auto op = handle<decltype(hif8_encode_arith_meta)>("ospfn::_hif8_encode_arith");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x);
}

at::Tensor hif8_decode_autograd(const at::Tensor& codes, at::ScalarType dtype) {
  static const auto op = handle<decltype(hif8_decode_meta)>("ospfn::hif8_decode");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(codes, dtype);
}

at::Tensor hif8_round_autograd(const at::Tensor& x) {
  static const auto op = handle<decltype(hif8_round_meta)>("ospfn::hif8_round");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x);
}

at::Tensor hif8_quantize_autograd(const at::Tensor& x, double scale_max, bool rowwise,
                                  const std::optional<at::Tensor>& amax) {
  static const auto op = handle<decltype(hif8_quantize_meta)>("ospfn::hif8_quantize");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, scale_max, rowwise, amax);
}

}  // namespace

TORCH_LIBRARY_IMPL(ospfn, Autograd, m) {
  m.impl("hif8_encode", &hif8_encode_autograd);
  m.impl("hif8_decode", &hif8_decode_autograd);
  m.impl("hif8_round", &hif8_round_autograd);
  m.impl("hif8_quantize", &hif8_quantize_autograd);
  m.impl("_hif8_encode_arith", &hif8_encode_arith_autograd);
}

}  // namespace ospfn
