// Ascend C vector kernels of the HiF8 codec (docs/npu.md#ascend-c-kernels):
//
//   ospfn_hif8_encode_{f32,bf16}      x -> uint8 codes
//   ospfn_hif8_decode_{f32,bf16}      codes -> values
//   ospfn_hif8_round_{f32,bf16}       x -> nearest HiF8 value (fake quantisation without a scale)
//   ospfn_hif8_amax_{f32,bf16}        per-block max |x| (bit pattern) -> one 32-byte line of a GM workspace
//   ospfn_hif8_quantize_tensor_{f32,bf16}  reduce the workspace's partials, s = M / max(amax, 1e-8), Q(x s) / s
//   ospfn_hif8_quantize_rows_{f32,bf16}    the same per last-dim row (a block owns whole rows)
//
// Semantics: exactly those of the `ref` backend (ospfn/ops/hif8.py); the per-element codec is
// csrc/hif8/hif8.h, shared with the CPU ops.  float32 travels as its uint32 bit pattern and bfloat16 as its
// uint16 pattern; bf16 widens exactly (bits << 16) and the quantised bf16 result narrows with
// round-to-nearest-even (NaN -> 0x7FC0), as torch's .to(torch.bfloat16) does.  The arithmetic is scalar:
// integer operations on bit patterns plus one fp32 multiply and one fp32 divide per quantised element.
//
// Cross-core reduction of the per-tensor amax: two launches on one stream.  Launch 1 (amax) writes each
// block's max |x| bit pattern to word 0 of its own 32-byte line of a GM workspace (block_num lines, no line
// shared between cores, no atomics); launch 2 (quantize_tensor) copies all lines into every block's UB and
// reduces them there, so every block derives the same scale.  A given amax (one float32) is placed in a
// one-line workspace by the host, so the second launch is the same kernel.  The max is taken over |x| bit
// patterns as unsigned integers: for non-negative floats integer order is value order and any NaN compares
// above +Inf, so a NaN anywhere gives a NaN amax, as torch.amax does.
#ifdef OSPFN_ASCEND_CPU_SHIM
#include "ascend/shim/ascendc_cpu.h"
#else
#include "kernel_operator.h"
#endif

#ifndef OSPFN_HD
#define OSPFN_HD __aicore__
#endif

#include "hif8/hif8.h"
#include "ascend/kernel_args.h"
#include "ascend/kernel_common.h"
#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {
namespace {

// ----------------------------------------------------------------------------------------------------------
// element formats: float32 as uint32 bits, bfloat16 as uint16 bits

__aicore__ inline uint32_t widen(uint32_t b) { return b; }
__aicore__ inline uint32_t widen(uint16_t b) { return static_cast<uint32_t>(b) << 16; }

template <typename T>
__aicore__ inline T narrow_exact(uint32_t f);  // for values exact in T (every HiF8 value, NaN canonical)
template <>
__aicore__ inline uint32_t narrow_exact<uint32_t>(uint32_t f) { return f; }
template <>
__aicore__ inline uint16_t narrow_exact<uint16_t>(uint32_t f) { return static_cast<uint16_t>(f >> 16); }

template <typename T>
__aicore__ inline T narrow_rne(uint32_t f);  // fp32 bits -> T, round to nearest even
template <>
__aicore__ inline uint32_t narrow_rne<uint32_t>(uint32_t f) { return f; }
template <>
__aicore__ inline uint16_t narrow_rne<uint16_t>(uint32_t f) {
  if ((f & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((f + 0x7FFFu + ((f >> 16) & 1u)) >> 16);
}

__aicore__ inline float scale_from_amax(float amax, float scale_max) {
  const float denom = amax < 1e-8f ? 1e-8f : amax;  // NaN stays NaN; a negative given amax acts as 1e-8
  return scale_max / denom;
}

// ----------------------------------------------------------------------------------------------------------
// per-tile functors (scalar loops over one UB tile)

template <typename TIn>
struct EncodeTile {
  __aicore__ inline void operator()(const AscendC::LocalTensor<TIn>& in, const AscendC::LocalTensor<uint8_t>& out,
                                    uint64_t n) const {
    for (uint64_t i = 0; i < n; ++i) out.SetValue(i, hif8::encode_bits(widen(in.GetValue(i))));
  }
};

template <typename TOut>
struct DecodeTile {
  __aicore__ inline void operator()(const AscendC::LocalTensor<uint8_t>& in, const AscendC::LocalTensor<TOut>& out,
                                    uint64_t n) const {
    for (uint64_t i = 0; i < n; ++i) out.SetValue(i, narrow_exact<TOut>(hif8::decode_bits(in.GetValue(i))));
  }
};

template <typename T>
struct RoundTile {
  __aicore__ inline void operator()(const AscendC::LocalTensor<T>& in, const AscendC::LocalTensor<T>& out,
                                    uint64_t n) const {
    for (uint64_t i = 0; i < n; ++i)
      out.SetValue(i, narrow_exact<T>(hif8::decode_bits(hif8::encode_bits(widen(in.GetValue(i))))));
  }
};

template <typename T>
struct AmaxTile {
  uint32_t acc = 0;
  __aicore__ inline void operator()(const AscendC::LocalTensor<T>& in, uint64_t n) {
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t a = widen(in.GetValue(i)) & 0x7FFFFFFFu;
      acc = a > acc ? a : acc;
    }
  }
};

template <typename T>
__aicore__ inline void quantize_loop(const AscendC::LocalTensor<T>& in, const AscendC::LocalTensor<T>& out, uint64_t n,
                                     float s) {
  for (uint64_t i = 0; i < n; ++i) {
    const float x = hif8::f32_from_bits(widen(in.GetValue(i)));
    const float xs = x * s;
    const float q = hif8::decode(hif8::encode(xs));
    out.SetValue(i, narrow_rne<T>(hif8::f32_bits(q / s)));
  }
}

template <typename T>
struct QuantizeTile {
  float s;
  __aicore__ inline void operator()(const AscendC::LocalTensor<T>& in, const AscendC::LocalTensor<T>& out,
                                    uint64_t n) const {
    quantize_loop(in, out, n, s);
  }
};

// A row held in one tile: amax and quantise from the same UB copy (the row is read from GM once).
template <typename T>
struct AmaxQuantizeTile {
  float scale_max;
  __aicore__ inline void operator()(const AscendC::LocalTensor<T>& in, const AscendC::LocalTensor<T>& out,
                                    uint64_t n) const {
    AmaxTile<T> a;
    a(in, n);
    quantize_loop(in, out, n, scale_from_amax(hif8::f32_from_bits(a.acc), scale_max));
  }
};

// ----------------------------------------------------------------------------------------------------------
// kernels

// One elementwise pass over this block's range with functor F.
template <typename TIn, typename TOut, typename F>
class ElementwiseKernel {
 public:
  __aicore__ inline void Run(GM_ADDR x, GM_ADDR y, const ElemTiling& t, F& f) {
    const uint64_t b = static_cast<uint64_t>(AscendC::GetBlockIdx());
    if (b >= t.block_num) return;
    const ElemBlock blk = elem_block(t, b);
    xg_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(x), t.n);
    yg_.SetGlobalBuffer(reinterpret_cast<__gm__ TOut*>(y), t.n);
    stream_.Init(&pipe_, t.tile, true);
    stream_.Map(xg_, yg_, blk.start, blk.len, f);
  }

 private:
  AscendC::TPipe pipe_;
  TileStream<TIn, TOut> stream_;
  AscendC::GlobalTensor<TIn> xg_;
  AscendC::GlobalTensor<TOut> yg_;
};

// Launch 1 of the per-tensor quantise: this block's max |x| bits -> workspace line GetBlockIdx().
template <typename T>
class AmaxKernel {
 public:
  __aicore__ inline void Run(GM_ADDR x, GM_ADDR ws, const ElemTiling& t) {
    const uint64_t b = static_cast<uint64_t>(AscendC::GetBlockIdx());
    if (b >= t.block_num) return;
    const ElemBlock blk = elem_block(t, b);
    xg_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(x), t.n);
    wsg_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(ws), t.block_num * kPartialWords);
    stream_.Init(&pipe_, t.tile, false);
    pipe_.InitBuffer(line_, static_cast<uint32_t>(kBlockBytes));
    AmaxTile<T> acc;
    stream_.ForEach(xg_, blk.start, blk.len, acc);
    AscendC::LocalTensor<uint32_t> line = line_.Get<uint32_t>();
    line.SetValue(0, acc.acc);
    for (uint64_t k = 1; k < kPartialWords; ++k) line.SetValue(k, 0u);
    pipe_sync<AscendC::HardEvent::S_MTE3>(&pipe_);
    AscendC::DataCopy(wsg_[b * kPartialWords], line, static_cast<uint32_t>(kPartialWords));
  }

 private:
  AscendC::TPipe pipe_;
  TileStream<T, T> stream_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> line_;
  AscendC::GlobalTensor<T> xg_;
  AscendC::GlobalTensor<uint32_t> wsg_;
};

// Launch 2: every block reduces all partial lines to the same amax, then quantises its range.
template <typename T>
class QuantizeTensorKernel {
 public:
  __aicore__ inline void Run(GM_ADDR x, GM_ADDR ws, GM_ADDR y, const QuantTensorArgs& a) {
    const ElemTiling& t = a.tiling;
    const uint64_t b = static_cast<uint64_t>(AscendC::GetBlockIdx());
    if (b >= t.block_num) return;
    const ElemBlock blk = elem_block(t, b);
    xg_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(x), t.n);
    yg_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(y), t.n);
    wsg_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(ws), a.partials * kPartialWords);
    stream_.Init(&pipe_, t.tile, true);
    pipe_.InitBuffer(table_, static_cast<uint32_t>(a.partials * kBlockBytes));
    AscendC::LocalTensor<uint32_t> table = table_.Get<uint32_t>();
    AscendC::DataCopy(table, wsg_, static_cast<uint32_t>(a.partials * kPartialWords));
    pipe_sync<AscendC::HardEvent::MTE2_S>(&pipe_);
    uint32_t amax = 0;
    for (uint64_t k = 0; k < a.partials; ++k) {
      const uint32_t v = table.GetValue(k * kPartialWords);
      amax = (k == 0 || v > amax) ? v : amax;
    }
    QuantizeTile<T> q{scale_from_amax(hif8::f32_from_bits(amax), hif8::f32_from_bits(a.scale_max_bits))};
    stream_.Map(xg_, yg_, blk.start, blk.len, q);
  }

 private:
  AscendC::TPipe pipe_;
  TileStream<T, T> stream_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> table_;
  AscendC::GlobalTensor<T> xg_;
  AscendC::GlobalTensor<T> yg_;
  AscendC::GlobalTensor<uint32_t> wsg_;
};

// Per-row quantise: a block owns whole rows; a row longer than one tile is read twice (amax, then quantise),
// a row within one tile once.  With a given amax (has_amax) row r's float32 comes from amax[r].
template <typename T>
class QuantizeRowsKernel {
 public:
  __aicore__ inline void Run(GM_ADDR x, GM_ADDR amax, GM_ADDR y, const QuantRowArgs& a) {
    const RowTiling& t = a.tiling;
    const uint64_t b = static_cast<uint64_t>(AscendC::GetBlockIdx());
    if (b >= t.block_num) return;
    const RowBlock rb = row_block(t, b);
    const float scale_max = hif8::f32_from_bits(a.scale_max_bits);
    xg_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(x), t.rows * t.cols);
    yg_.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(y), t.rows * t.cols);
    if (a.has_amax != 0) ag_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(amax), t.rows);
    stream_.Init(&pipe_, t.tile, true);
    pipe_.InitBuffer(slot_, static_cast<uint32_t>(kBlockBytes));
    const bool one_tile = t.cols <= t.tile;
    for (uint64_t r = rb.row_start; r < rb.row_start + rb.row_count; ++r) {
      const uint64_t start = r * t.cols;
      if (a.has_amax != 0) {
        AscendC::LocalTensor<uint32_t> s = slot_.Get<uint32_t>();
        copy_in(s, ag_, r, 1);
        pipe_sync<AscendC::HardEvent::MTE2_S>(&pipe_);
        QuantizeTile<T> q{scale_from_amax(hif8::f32_from_bits(s.GetValue(0)), scale_max)};
        stream_.Map(xg_, yg_, start, t.cols, q);
      } else if (one_tile) {
        AmaxQuantizeTile<T> q{scale_max};
        stream_.Map(xg_, yg_, start, t.cols, q);
      } else {
        AmaxTile<T> acc;
        stream_.ForEach(xg_, start, t.cols, acc);
        QuantizeTile<T> q{scale_from_amax(hif8::f32_from_bits(acc.acc), scale_max)};
        stream_.Map(xg_, yg_, start, t.cols, q);
      }
    }
  }

 private:
  AscendC::TPipe pipe_;
  TileStream<T, T> stream_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> slot_;
  AscendC::GlobalTensor<T> xg_;
  AscendC::GlobalTensor<T> yg_;
  AscendC::GlobalTensor<uint32_t> ag_;
};

template <typename TIn, typename TOut, typename F>
__aicore__ inline void run_elementwise(GM_ADDR x, GM_ADDR y, const ElemTiling& t) {
  F f{};
  ElementwiseKernel<TIn, TOut, F> k;
  k.Run(x, y, t, f);
}

}  // namespace
}  // namespace ascend
}  // namespace ospfn

// ----------------------------------------------------------------------------------------------------------
// entry points (launched with blockDim = tiling.block_num; nothing is launched for 0 blocks)

using ospfn::ascend::ElemTiling;
using ospfn::ascend::QuantRowArgs;
using ospfn::ascend::QuantTensorArgs;

extern "C" __global__ __aicore__ void ospfn_hif8_encode_f32(GM_ADDR x, GM_ADDR codes, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint32_t, uint8_t, ospfn::ascend::EncodeTile<uint32_t>>(x, codes, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_encode_bf16(GM_ADDR x, GM_ADDR codes, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint16_t, uint8_t, ospfn::ascend::EncodeTile<uint16_t>>(x, codes, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_decode_f32(GM_ADDR codes, GM_ADDR y, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint8_t, uint32_t, ospfn::ascend::DecodeTile<uint32_t>>(codes, y, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_decode_bf16(GM_ADDR codes, GM_ADDR y, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint8_t, uint16_t, ospfn::ascend::DecodeTile<uint16_t>>(codes, y, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_round_f32(GM_ADDR x, GM_ADDR y, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint32_t, uint32_t, ospfn::ascend::RoundTile<uint32_t>>(x, y, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_round_bf16(GM_ADDR x, GM_ADDR y, ElemTiling t) {
  ospfn::ascend::run_elementwise<uint16_t, uint16_t, ospfn::ascend::RoundTile<uint16_t>>(x, y, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_amax_f32(GM_ADDR x, GM_ADDR ws, ElemTiling t) {
  ospfn::ascend::AmaxKernel<uint32_t> k;
  k.Run(x, ws, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_amax_bf16(GM_ADDR x, GM_ADDR ws, ElemTiling t) {
  ospfn::ascend::AmaxKernel<uint16_t> k;
  k.Run(x, ws, t);
}
extern "C" __global__ __aicore__ void ospfn_hif8_quantize_tensor_f32(GM_ADDR x, GM_ADDR ws, GM_ADDR y, QuantTensorArgs a) {
  ospfn::ascend::QuantizeTensorKernel<uint32_t> k;
  k.Run(x, ws, y, a);
}
extern "C" __global__ __aicore__ void ospfn_hif8_quantize_tensor_bf16(GM_ADDR x, GM_ADDR ws, GM_ADDR y, QuantTensorArgs a) {
  ospfn::ascend::QuantizeTensorKernel<uint16_t> k;
  k.Run(x, ws, y, a);
}
extern "C" __global__ __aicore__ void ospfn_hif8_quantize_rows_f32(GM_ADDR x, GM_ADDR amax, GM_ADDR y, QuantRowArgs a) {
  ospfn::ascend::QuantizeRowsKernel<uint32_t> k;
  k.Run(x, amax, y, a);
}
extern "C" __global__ __aicore__ void ospfn_hif8_quantize_rows_bf16(GM_ADDR x, GM_ADDR amax, GM_ADDR y, QuantRowArgs a) {
  ospfn::ascend::QuantizeRowsKernel<uint16_t> k;
  k.Run(x, amax, y, a);
}
