// Host-side tiling of the Ascend C kernels (docs/npu.md#tiling): plain C++17, no Ascend headers.
//
// One header for the three places that must agree on it: the host launchers (op_host.cpp) compute a tiling,
// the kernels (hif8_kernel.cpp, skiparse_kernel.cpp) receive it by value and derive their own block range
// from it, and the CPU tests (tests/test_ascend_tiling.py, through ospfn._ascend_sim) check its invariants.
//
// Vocabulary
//   block   one AI core (AIV) of a launch; GetBlockIdx() in [0, block_num)
//   tile    the elements one block moves through the Unified Buffer (UB) at a time
//   unit    the alignment granule: the fewest elements whose bytes are a multiple of 32 in every tensor the
//           kernel touches (fp32 -> uint8: 32 elements = 128 B in, 32 B out)
//
// Elementwise rules (make_elem_tiling)
//   * n = 0 gives 0 blocks (nothing is launched);
//   * the n elements are cut into ceil(n / unit) units; block_num = min(cores, units), so no block is ever
//     empty; every block gets units / block_num units, the first units % block_num blocks one more;
//     so block boundaries are unit-aligned (32 B in every tensor) and only the last block can end
//     mid-unit (the global tail);
//   * the tile is the largest multiple of the unit whose buffers fit the UB budget --
//     tile * (BUFFER_NUM * (in + out) + scratch) + fixed <= ub_budget -- capped at the (unit-rounded)
//     length of the largest block; a block runs len / tile full tiles and one tail of len % tile elements.
// Row rules (make_row_tiling): the same with rows in place of units (a block owns whole rows; rows per
// block balanced, the remainder spread over the first blocks), and the tile cut along a row: a row longer
// than one tile runs cols / tile full column tiles and a column tail of cols % tile.
#pragma once

#include <cstdint>

#ifndef OSPFN_HD
#define OSPFN_HD  // host/device qualifier hook (__aicore__ in the kernels); empty on the host
#endif

namespace ospfn {
namespace ascend {

constexpr uint64_t kBlockBytes = 32;  // UB granule: DataCopy lengths and UB addresses are multiples of it
constexpr uint64_t kBufferNum = 2;    // double buffering: slots per TQue

// UB bytes a kernel needs for a tile of `tile` elements: tile * (kBufferNum * (in + out) + scratch) + fixed.
// in / out / scratch are bytes per element of the queued input, the queued output and unqueued scratch
// (0 when absent); fixed covers small per-block slots (an amax slot, the partial-amax table).
struct KernelCost {
  uint64_t in_bytes;
  uint64_t out_bytes;
  uint64_t scratch_bytes;
  uint64_t fixed_bytes;
};

OSPFN_HD inline uint64_t per_elem_bytes(const KernelCost& c) {
  return kBufferNum * (c.in_bytes + c.out_bytes) + c.scratch_bytes;
}

OSPFN_HD inline uint64_t ub_bytes_for(const KernelCost& c, uint64_t tile) {
  return tile * per_elem_bytes(c) + c.fixed_bytes;
}

// Elements per 32-byte unit of one element size (0: the tensor is absent).
OSPFN_HD inline uint64_t unit_of(uint64_t elem_bytes) {
  if (elem_bytes == 0) return 1;
  uint64_t a = kBlockBytes, b = elem_bytes;  // gcd(32, elem_bytes)
  while (b != 0) {
    const uint64_t r = a % b;
    a = b;
    b = r;
  }
  return kBlockBytes / a;
}

OSPFN_HD inline uint64_t lcm_pow2(uint64_t a, uint64_t b) { return a > b ? a : b; }  // units are powers of 2

OSPFN_HD inline uint64_t unit_of(const KernelCost& c) {
  return lcm_pow2(lcm_pow2(unit_of(c.in_bytes), unit_of(c.out_bytes)), unit_of(c.scratch_bytes));
}

// The tiling a kernel receives by value (POD, trivially copyable; every field 64-bit so the layout is the
// same on host and device).
struct ElemTiling {
  uint64_t n;                // elements
  uint64_t block_num;        // blocks to launch (0 iff n == 0)
  uint64_t unit;             // alignment granule in elements
  uint64_t units_per_block;  // every block gets this many units ...
  uint64_t big_blocks;       // ... and the first big_blocks blocks one more
  uint64_t tile;             // elements per tile, a multiple of unit (0 iff n == 0)
  uint64_t ub_bytes;         // UB bytes the kernel's buffers take for this tile (<= the budget)
};

struct RowTiling {
  uint64_t rows;
  uint64_t cols;             // elements per row
  uint64_t block_num;        // blocks to launch (0 iff rows == 0 or cols == 0)
  uint64_t rows_per_block;   // every block gets this many rows ...
  uint64_t big_blocks;       // ... and the first big_blocks blocks one more
  uint64_t unit;
  uint64_t tile;             // column tile, a multiple of unit
  uint64_t col_full_tiles;   // per row: cols = col_full_tiles * tile + col_tail
  uint64_t col_tail;
  uint64_t ub_bytes;
};

// What one block does (derived on the device from the tiling and GetBlockIdx()).
struct ElemBlock {
  uint64_t start;       // first element
  uint64_t len;         // elements (> 0 for every block < block_num)
  uint64_t full_tiles;  // len / tile
  uint64_t tail;        // len % tile
};

struct RowBlock {
  uint64_t row_start;
  uint64_t row_count;
};

OSPFN_HD inline ElemBlock elem_block(const ElemTiling& t, uint64_t b) {
  ElemBlock r{0, 0, 0, 0};
  if (b >= t.block_num) return r;
  const uint64_t units = t.units_per_block + (b < t.big_blocks ? 1 : 0);
  const uint64_t first_unit = b * t.units_per_block + (b < t.big_blocks ? b : t.big_blocks);
  r.start = first_unit * t.unit;
  const uint64_t end = r.start + units * t.unit;
  r.len = (end < t.n ? end : t.n) - r.start;
  r.full_tiles = r.len / t.tile;
  r.tail = r.len % t.tile;
  return r;
}

OSPFN_HD inline RowBlock row_block(const RowTiling& t, uint64_t b) {
  RowBlock r{0, 0};
  if (b >= t.block_num) return r;
  r.row_count = t.rows_per_block + (b < t.big_blocks ? 1 : 0);
  r.row_start = b * t.rows_per_block + (b < t.big_blocks ? b : t.big_blocks);
  return r;
}

// ----------------------------------------------------------------------------------------------------------
// host side: computing a tiling (returns nullptr on success, else a static message)

// The largest tile (a multiple of the unit) whose buffers fit ub_budget; 0 when not even one unit fits.
inline uint64_t max_tile(const KernelCost& c, uint64_t ub_budget) {
  const uint64_t unit = unit_of(c);
  if (ub_budget <= c.fixed_bytes) return 0;
  const uint64_t per = per_elem_bytes(c);
  if (per == 0) return 0;
  const uint64_t t = (ub_budget - c.fixed_bytes) / per;
  return t / unit * unit;
}

inline const char* make_elem_tiling(uint64_t n, const KernelCost& c, uint64_t ub_budget, uint64_t cores,
                                    ElemTiling* out) {
  *out = ElemTiling{n, 0, unit_of(c), 0, 0, 0, 0};
  if (cores == 0) return "tiling: the number of cores must be >= 1";
  const uint64_t cap = max_tile(c, ub_budget);
  if (cap == 0) return "tiling: the UB budget cannot hold one 32-byte unit of every buffer";
  if (n == 0) return nullptr;
  const uint64_t unit = out->unit;
  const uint64_t units = n / unit + (n % unit != 0 ? 1 : 0);
  out->block_num = units < cores ? units : cores;
  out->units_per_block = units / out->block_num;
  out->big_blocks = units % out->block_num;
  const uint64_t largest = (out->units_per_block + (out->big_blocks != 0 ? 1 : 0)) * unit;
  out->tile = largest < cap ? largest : cap;
  out->ub_bytes = ub_bytes_for(c, out->tile);
  return nullptr;
}

inline const char* make_row_tiling(uint64_t rows, uint64_t cols, const KernelCost& c, uint64_t ub_budget,
                                   uint64_t cores, RowTiling* out) {
  *out = RowTiling{rows, cols, 0, 0, 0, unit_of(c), 0, 0, 0, 0};
  if (cores == 0) return "tiling: the number of cores must be >= 1";
  const uint64_t cap = max_tile(c, ub_budget);
  if (cap == 0) return "tiling: the UB budget cannot hold one 32-byte unit of every buffer";
  if (rows == 0 || cols == 0) return nullptr;
  const uint64_t unit = out->unit;
  out->block_num = rows < cores ? rows : cores;
  out->rows_per_block = rows / out->block_num;
  out->big_blocks = rows % out->block_num;
  const uint64_t row_units = (cols / unit + (cols % unit != 0 ? 1 : 0)) * unit;
  out->tile = row_units < cap ? row_units : cap;
  out->col_full_tiles = cols / out->tile;
  out->col_tail = cols % out->tile;
  out->ub_bytes = ub_bytes_for(c, out->tile);
  return nullptr;
}

}  // namespace ascend
}  // namespace ospfn
