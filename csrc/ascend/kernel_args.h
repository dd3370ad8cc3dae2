// Arguments of the Ascend C kernels (POD structs passed by value at launch) and the host-side planning that
// fills them: which UB cost each kernel declares, the Skiparse geometry, and the row maps of the Skiparse
// permutations.  Plain C++17, no Ascend or torch headers; shared by op_host.cpp (the NPU launchers), the
// kernels, and the CPU simulator module (csrc/ascend/sim/sim_module.cpp), so the tests plan exactly as the
// NPU host code does.
#pragma once

#include <cstdint>

#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {

// ----------------------------------------------------------------------------------------------------------
// HiF8 kernels.  Element sizes: 4 = float32 (handled as its uint32 bit pattern), 2 = bfloat16 (uint16).

// UB cost of each kernel (must match the kernel's InitBuffer calls; the CPU shim enforces the budget).
inline KernelCost cost_encode(uint64_t esize) { return KernelCost{esize, 1, 0, 0}; }
inline KernelCost cost_decode(uint64_t esize) { return KernelCost{1, esize, 0, 0}; }
inline KernelCost cost_round(uint64_t esize) { return KernelCost{esize, esize, 0, 0}; }
// Per-tensor quantise = two launches sharing one block split: amax (in queue + a 32-byte partial slot) and
// quantise (in + out queues + the table of up to `cores` 32-byte partials); planned with the larger cost.
inline KernelCost cost_quantize_tensor(uint64_t esize, uint64_t cores) {
  return KernelCost{esize, esize, 0, (cores > 0 ? cores : 1) * kBlockBytes};
}
// Per-row quantise: in + out queues + one 32-byte slot for a given amax.
inline KernelCost cost_quantize_rows(uint64_t esize) { return KernelCost{esize, esize, 0, kBlockBytes}; }

// One 32-byte line per partial amax in the workspace: uint32 word 0 holds the bits, words 1..7 are zero.
constexpr uint64_t kPartialWords = kBlockBytes / 4;

struct QuantTensorArgs {
  ElemTiling tiling;
  uint64_t partials;        // partial amax lines to reduce (the amax launch's block_num, or 1 for a given amax)
  uint32_t scale_max_bits;  // float32 bits of scale_max
  uint32_t reserved;
};

struct QuantRowArgs {
  RowTiling tiling;
  uint32_t scale_max_bits;
  uint32_t has_amax;  // 1: one given float32 amax per row in the amax buffer
};

// ----------------------------------------------------------------------------------------------------------
// Skiparse kernels: pure row gathers.  A row is one token's C channels, moved as row_bytes raw bytes, so one
// kernel serves every dtype; pad rows are written from a zeroed UB tile (0 bytes = +0.0 / 0 / False).

struct SkiparseGeom {
  uint64_t B, T, H, W, P;
  uint64_t Hp, Wp;  // H, W rounded up to multiples of P^2
  uint64_t group;   // fold / unfold: 0 token layout, 1 group layout (switch ignores it)
};

struct SkiparseArgs {
  RowTiling tiling;  // rows = output rows, cols = row_bytes
  SkiparseGeom geom;
  uint64_t in_rows;  // rows of the source tensor (bounds)
};

// Bound in/out queue (TQueBind VECIN -> VECOUT) + one zero tile.
inline KernelCost cost_skiparse() { return KernelCost{1, 0, 1, 0}; }

inline SkiparseGeom skiparse_geom(uint64_t B, uint64_t T, uint64_t H, uint64_t W, uint64_t P, bool group) {
  const uint64_t m = P * P;
  return SkiparseGeom{B, T, H, W, P, (H + m - 1) / m * m, (W + m - 1) / m * m, group ? 1u : 0u};
}

constexpr uint64_t kPadRow = ~uint64_t{0};

OSPFN_HD inline uint64_t skiparse_seq(const SkiparseGeom& g) { return g.T * g.Hp * g.Wp / (g.P * g.P); }
OSPFN_HD inline uint64_t skiparse_folded_rows(const SkiparseGeom& g) { return g.P * g.P * g.B * skiparse_seq(g); }
OSPFN_HD inline uint64_t skiparse_raster_rows(const SkiparseGeom& g) { return g.B * g.T * g.H * g.W; }

// Folded row (slot major: row = (slot * B + b) * seq + s) of padded grid position (b, t, hh, ww).
OSPFN_HD inline uint64_t skiparse_folded_row(const SkiparseGeom& g, uint64_t b, uint64_t t, uint64_t hh,
                                             uint64_t ww) {
  const uint64_t P = g.P;
  uint64_t slot, s;
  if (g.group == 0) {  // token: slot = (hh mod P, ww mod P), s = (t, hh div P, ww div P)
    slot = (hh % P) * P + ww % P;
    s = (t * (g.Hp / P) + hh / P) * (g.Wp / P) + ww / P;
  } else {  // group: hh = h P^2 + p1 P + p2; slot = (p1, q1), s = (t, h, p2, w, q2)
    const uint64_t m = P * P;
    slot = ((hh / P) % P) * P + (ww / P) % P;
    s = (((t * (g.Hp / m) + hh / m) * P + hh % P) * (g.Wp / m) + ww / m) * P + ww % P;
  }
  return (slot * g.B + b) * skiparse_seq(g) + s;
}

// fold: output folded row -> source raster row of [B, T*H*W], or kPadRow for a pad slot.
OSPFN_HD inline uint64_t skiparse_fold_src(const SkiparseGeom& g, uint64_t o) {
  const uint64_t P = g.P, seq = skiparse_seq(g);
  const uint64_t s = o % seq;
  const uint64_t gb = o / seq;
  const uint64_t b = gb % g.B, slot = gb / g.B;
  uint64_t t, hh, ww;
  if (g.group == 0) {
    const uint64_t wq = g.Wp / P, hq = g.Hp / P;
    const uint64_t w = s % wq, h = (s / wq) % hq;
    t = s / (wq * hq);
    hh = h * P + slot / P;
    ww = w * P + slot % P;
  } else {
    const uint64_t m = P * P, wg = g.Wp / m, hg = g.Hp / m;
    uint64_t r = s;
    const uint64_t q2 = r % P;
    r /= P;
    const uint64_t w = r % wg;
    r /= wg;
    const uint64_t p2 = r % P;
    r /= P;
    const uint64_t h = r % hg;
    t = r / hg;
    hh = h * m + (slot / P) * P + p2;
    ww = w * m + (slot % P) * P + q2;
  }
  if (hh >= g.H || ww >= g.W) return kPadRow;
  return ((b * g.T + t) * g.H + hh) * g.W + ww;
}

// unfold: output raster row of [B, T*H*W] -> source folded row (padding is cropped: never read).
OSPFN_HD inline uint64_t skiparse_unfold_src(const SkiparseGeom& g, uint64_t o) {
  const uint64_t ww = o % g.W;
  const uint64_t hh = (o / g.W) % g.H;
  const uint64_t t = (o / (g.W * g.H)) % g.T;
  const uint64_t b = o / (g.W * g.H * g.T);
  return skiparse_folded_row(g, b, t, hh, ww);
}

// switch: output row of the group layout (p1 q1 b)(t h p2 w q2) -> source row of the token layout
// (p2 q2 b)(t h p1 w q1); the same map both ways (an involution).
OSPFN_HD inline uint64_t skiparse_switch_src(const SkiparseGeom& g, uint64_t o) {
  const uint64_t P = g.P, m = P * P, seq = skiparse_seq(g);
  const uint64_t wg = g.Wp / m, hg = g.Hp / m;
  uint64_t r = o % seq;
  const uint64_t gb = o / seq;
  const uint64_t b = gb % g.B, slot = gb / g.B;
  const uint64_t p1 = slot / P, q1 = slot % P;
  const uint64_t q2 = r % P;
  r /= P;
  const uint64_t w = r % wg;
  r /= wg;
  const uint64_t p2 = r % P;
  r /= P;
  const uint64_t h = r % hg;
  const uint64_t t = r / hg;
  const uint64_t s_src = (((t * hg + h) * P + p1) * wg + w) * P + q1;
  return ((p2 * P + q2) * g.B + b) * seq + s_src;
}

enum class SkiparseOp : uint32_t { kFold = 0, kUnfold = 1, kSwitch = 2 };

inline uint64_t skiparse_out_rows(const SkiparseGeom& g, SkiparseOp op) {
  return op == SkiparseOp::kUnfold ? skiparse_raster_rows(g) : skiparse_folded_rows(g);
}

inline uint64_t skiparse_in_rows(const SkiparseGeom& g, SkiparseOp op) {
  return op == SkiparseOp::kFold ? skiparse_raster_rows(g) : skiparse_folded_rows(g);
}

// ----------------------------------------------------------------------------------------------------------
// Device defaults (Atlas A2 / 910B): 40 AIV cores and 192 KiB of UB per core; the host launcher asks the
// platform first and uses these only when it cannot.  kUbReserve is left unused for the runtime.

constexpr uint64_t kDefaultCores = 40;
constexpr uint64_t kDefaultUbBytes = 192 * 1024;
constexpr uint64_t kUbReserve = 8 * 1024;

}  // namespace ascend
}  // namespace ospfn
