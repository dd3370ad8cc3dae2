// ospfn._ascend_sim: the Ascend C kernels compiled against the CPU shim, for the test-suite.
//
// Every function plans exactly as the NPU launcher (op_host.cpp) does -- same costs, same tiling -- and runs
// the kernel's blocks through ospfn_shim::run on host memory.  Tensors travel as raw addresses (Python:
// tensor.data_ptr()) so this module needs no torch headers; the tests own the tensors and compare the results
// with the `ref` backend.  Each run returns its tiling and the shim's statistics (bytes written per buffer,
// UB used, ...); a broken rule raises RuntimeError, a bad argument ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "ascend/shim/ascendc_cpu.h"
#include "ascend/kernel_args.h"
#include "ascend/kernels.h"
#include "ascend/schema.h"
#include "ascend/shim/shim_selftest.h"
#include "ascend/tiling.h"

#ifndef OSPFN_NPU_STATUS
#define OSPFN_NPU_STATUS "unknown (not recorded at build time)"
#endif

namespace py = pybind11;
using namespace ospfn::ascend;

// What the kernels receive by value must be plain data with one layout on host and device.
static_assert(std::is_trivially_copyable_v<ElemTiling> && std::is_standard_layout_v<ElemTiling>);
static_assert(std::is_trivially_copyable_v<RowTiling> && std::is_standard_layout_v<RowTiling>);
static_assert(std::is_trivially_copyable_v<QuantTensorArgs> && std::is_standard_layout_v<QuantTensorArgs>);
static_assert(std::is_trivially_copyable_v<QuantRowArgs> && std::is_standard_layout_v<QuantRowArgs>);
static_assert(std::is_trivially_copyable_v<SkiparseArgs> && std::is_standard_layout_v<SkiparseArgs>);
static_assert(sizeof(ElemTiling) == 7 * 8 && sizeof(RowTiling) == 10 * 8 && sizeof(QuantTensorArgs) == 9 * 8 &&
              sizeof(QuantRowArgs) == 11 * 8 && sizeof(SkiparseArgs) == 19 * 8, "no padding in the kernel arguments");

namespace {

uint8_t* ptr(uintptr_t p) { return reinterpret_cast<uint8_t*>(p); }

void check_tiling(const char* err) {
  if (err != nullptr) throw std::invalid_argument(err);
}

void check_aligned(uintptr_t p, const char* name) {
  if (p % kBlockBytes != 0)
    throw std::invalid_argument(std::string(name) + ": buffer not 32-byte aligned (the NPU launcher copies such inputs)");
}

py::dict elem_dict(const ElemTiling& t) {
  py::dict d;
  d["n"] = t.n;
  d["block_num"] = t.block_num;
  d["unit"] = t.unit;
  d["units_per_block"] = t.units_per_block;
  d["big_blocks"] = t.big_blocks;
  d["tile"] = t.tile;
  d["ub_bytes"] = t.ub_bytes;
  py::list blocks;
  for (uint64_t b = 0; b < t.block_num; ++b) {
    const ElemBlock e = elem_block(t, b);
    blocks.append(py::make_tuple(e.start, e.len, e.full_tiles, e.tail));
  }
  d["blocks"] = blocks;
  return d;
}

py::dict row_dict(const RowTiling& t) {
  py::dict d;
  d["rows"] = t.rows;
  d["cols"] = t.cols;
  d["block_num"] = t.block_num;
  d["rows_per_block"] = t.rows_per_block;
  d["big_blocks"] = t.big_blocks;
  d["unit"] = t.unit;
  d["tile"] = t.tile;
  d["col_full_tiles"] = t.col_full_tiles;
  d["col_tail"] = t.col_tail;
  d["ub_bytes"] = t.ub_bytes;
  py::list blocks;
  for (uint64_t b = 0; b < t.block_num; ++b) {
    const RowBlock r = row_block(t, b);
    blocks.append(py::make_tuple(r.row_start, r.row_count));
  }
  d["blocks"] = blocks;
  return d;
}

py::dict stats_dict(const ospfn_shim::Stats& s, const ospfn_shim::Launch& l) {
  py::dict d;
  d["blocks"] = s.blocks;
  d["ub_bytes_max"] = s.ub_bytes_max;
  d["data_copy"] = s.data_copy;
  d["data_copy_pad"] = s.data_copy_pad;
  d["syncs"] = s.syncs;
  d["scalar_ops"] = s.scalar_ops;
  d["vector_ops"] = s.vector_ops;
  d["shared_lines"] = s.shared_lines;
  py::dict written;
  for (size_t i = 0; i < l.regions.size(); ++i) written[py::str(l.regions[i].name)] = s.written.size() > i ? s.written[i] : 0;
  d["written"] = written;
  return d;
}

KernelCost cost_of(const std::string& op, uint64_t esize, uint64_t cores) {
  if (op == "encode") return cost_encode(esize);
  if (op == "decode") return cost_decode(esize);
  if (op == "round") return cost_round(esize);
  if (op == "quantize_tensor") return cost_quantize_tensor(esize, cores);
  if (op == "quantize_rows") return cost_quantize_rows(esize);
  if (op == "skiparse") return cost_skiparse();
  throw std::invalid_argument("unknown kernel '" + op + "'");
}

void check_esize(uint64_t esize) {
  if (esize != 4 && esize != 2) throw std::invalid_argument("element size must be 4 (float32) or 2 (bfloat16)");
}

struct AlignedBuffer {  // host stand-in for a device workspace
  explicit AlignedBuffer(uint64_t bytes) : p(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64))) {
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  ~AlignedBuffer() { std::free(p); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* p;
};

py::dict run_elementwise(const std::string& op, uintptr_t x, uintptr_t y, uint64_t n, uint64_t esize, uint64_t ub,
                         uint64_t cores) {
  check_esize(esize);
  const KernelCost c = cost_of(op, esize, cores);
  ElemTiling t;
  check_tiling(make_elem_tiling(n, c, ub, cores, &t));
  py::dict out;
  out["tiling"] = elem_dict(t);
  if (t.block_num == 0) return out;
  check_aligned(x, "x");
  check_aligned(y, "y");
  ospfn_shim::Launch l{t.block_num, ub, {{x, n * c.in_bytes, false, "x"}, {y, n * c.out_bytes, true, "y"}}};
  const bool f32 = esize == 4;
  auto kernel = op == "encode" ? (f32 ? ospfn_hif8_encode_f32 : ospfn_hif8_encode_bf16)
                : op == "decode" ? (f32 ? ospfn_hif8_decode_f32 : ospfn_hif8_decode_bf16)
                : op == "round" ? (f32 ? ospfn_hif8_round_f32 : ospfn_hif8_round_bf16)
                                : nullptr;
  if (kernel == nullptr) throw std::invalid_argument("run_elementwise: op must be encode, decode or round");
  const ospfn_shim::Stats s = ospfn_shim::run(l, [&] { kernel(ptr(x), ptr(y), t); });
  out["stats"] = stats_dict(s, l);
  return out;
}

py::dict run_quantize_tensor(uintptr_t x, uintptr_t y, uint64_t n, uint64_t esize, float scale_max, uintptr_t amax,
                             uint64_t ub, uint64_t cores) {
  check_esize(esize);
  ElemTiling t;
  check_tiling(make_elem_tiling(n, cost_quantize_tensor(esize, cores), ub, cores, &t));
  py::dict out;
  out["tiling"] = elem_dict(t);
  if (t.block_num == 0) return out;
  check_aligned(x, "x");
  check_aligned(y, "y");
  const bool f32 = esize == 4;
  const uint64_t partials = amax != 0 ? 1 : t.block_num;
  AlignedBuffer ws(partials * kBlockBytes);
  const uintptr_t wsp = reinterpret_cast<uintptr_t>(ws.p);
  if (amax != 0) {
    std::memcpy(ws.p, reinterpret_cast<const void*>(amax), 4);  // the host places a given amax in line 0
  } else {
    ospfn_shim::Launch l1{t.block_num, ub, {{x, n * esize, false, "x"}, {wsp, partials * kBlockBytes, true, "workspace"}}};
    const ospfn_shim::Stats s1 =
        ospfn_shim::run(l1, [&] { (f32 ? ospfn_hif8_amax_f32 : ospfn_hif8_amax_bf16)(ptr(x), ws.p, t); });
    out["amax_stats"] = stats_dict(s1, l1);
  }
  py::list lines;
  for (uint64_t k = 0; k < partials; ++k) {
    uint32_t v;
    std::memcpy(&v, ws.p + k * kBlockBytes, 4);
    lines.append(v);
  }
  out["partials"] = lines;
  uint32_t smb;
  std::memcpy(&smb, &scale_max, 4);
  const QuantTensorArgs a{t, partials, smb, 0};
  ospfn_shim::Launch l2{t.block_num, ub,
                        {{x, n * esize, false, "x"}, {wsp, partials * kBlockBytes, false, "workspace"}, {y, n * esize, true, "y"}}};
  const ospfn_shim::Stats s2 = ospfn_shim::run(
      l2, [&] { (f32 ? ospfn_hif8_quantize_tensor_f32 : ospfn_hif8_quantize_tensor_bf16)(ptr(x), ws.p, ptr(y), a); });
  out["stats"] = stats_dict(s2, l2);
  return out;
}

py::dict run_quantize_rows(uintptr_t x, uintptr_t y, uint64_t rows, uint64_t cols, uint64_t esize, float scale_max,
                           uintptr_t amax, uint64_t ub, uint64_t cores) {
  check_esize(esize);
  RowTiling t;
  check_tiling(make_row_tiling(rows, cols, cost_quantize_rows(esize), ub, cores, &t));
  py::dict out;
  out["tiling"] = row_dict(t);
  if (t.block_num == 0) return out;
  check_aligned(x, "x");
  check_aligned(y, "y");
  uint32_t smb;
  std::memcpy(&smb, &scale_max, 4);
  const QuantRowArgs a{t, smb, amax != 0 ? 1u : 0u};
  ospfn_shim::Launch l{t.block_num, ub, {{x, rows * cols * esize, false, "x"}, {y, rows * cols * esize, true, "y"}}};
  if (amax != 0) {
    check_aligned(amax, "amax");
    l.regions.push_back({amax, rows * 4, false, "amax"});
  }
  const bool f32 = esize == 4;
  const ospfn_shim::Stats s = ospfn_shim::run(
      l, [&] { (f32 ? ospfn_hif8_quantize_rows_f32 : ospfn_hif8_quantize_rows_bf16)(ptr(x), ptr(amax), ptr(y), a); });
  out["stats"] = stats_dict(s, l);
  return out;
}

py::dict run_skiparse(const std::string& op, uintptr_t x, uintptr_t y, uint64_t B, uint64_t T, uint64_t H, uint64_t W,
                      uint64_t P, bool group, uint64_t row_bytes, uint64_t ub, uint64_t cores) {
  if (P < 2 || H < P || W < P) throw std::invalid_argument("run_skiparse: needs ratio >= 2 and H, W >= ratio");
  const SkiparseOp which = op == "fold" ? SkiparseOp::kFold
                           : op == "unfold" ? SkiparseOp::kUnfold
                           : op == "switch" ? SkiparseOp::kSwitch
                                            : throw std::invalid_argument("run_skiparse: op must be fold, unfold or switch");
  const SkiparseGeom g = skiparse_geom(B, T, H, W, P, group);
  const uint64_t out_rows = skiparse_out_rows(g, which), in_rows = skiparse_in_rows(g, which);
  RowTiling t;
  check_tiling(make_row_tiling(out_rows, row_bytes, cost_skiparse(), ub, cores, &t));
  py::dict out;
  out["tiling"] = row_dict(t);
  out["out_rows"] = out_rows;
  out["in_rows"] = in_rows;
  if (t.block_num == 0) return out;
  check_aligned(x, "x");
  check_aligned(y, "y");
  const SkiparseArgs a{t, g, in_rows};
  ospfn_shim::Launch l{t.block_num, ub, {{x, in_rows * row_bytes, false, "x"}, {y, out_rows * row_bytes, true, "y"}}};
  auto kernel = which == SkiparseOp::kFold ? ospfn_skiparse_fold
                : which == SkiparseOp::kUnfold ? ospfn_skiparse_unfold
                                               : ospfn_skiparse_switch;
  const ospfn_shim::Stats s = ospfn_shim::run(l, [&] { kernel(ptr(x), ptr(y), a); });
  out["stats"] = stats_dict(s, l);
  return out;
}

py::dict shim_selftest(int mode) {
  if (mode < 0 || mode > static_cast<int>(SelftestMode::kDoubleWrite)) throw std::invalid_argument("unknown self-test mode");
  AlignedBuffer x(2 * 64 * 4), y(2 * 64 * 4);
  const uintptr_t xp = reinterpret_cast<uintptr_t>(x.p), yp = reinterpret_cast<uintptr_t>(y.p);
  ospfn_shim::Launch l{2, 64 * 1024, {{xp, 2 * 64 * 4, false, "x"}, {yp, 2 * 64 * 4, true, "y"}}};
  const ospfn_shim::Stats s = ospfn_shim::run(l, [&] { selftest_kernel(x.p, y.p, static_cast<SelftestMode>(mode)); });
  return stats_dict(s, l);
}

}  // namespace

PYBIND11_MODULE(_ascend_sim, m) {
  m.doc() = "ospfn's Ascend C kernels compiled against a CPU shim of the Ascend C API (tests only; docs/npu.md)";
  py::dict info;
  info["ospfn_npu"] = OSPFN_NPU_STATUS;
  info["shim"] = "csrc/ascend/shim/ascendc_cpu.h";
  info["buffer_num"] = kBufferNum;
  info["default_cores"] = kDefaultCores;
  info["default_ub_bytes"] = kDefaultUbBytes;
  info["ub_reserve"] = kUbReserve;
  m.attr("BUILD_INFO") = info;

  py::list ops, schemas;
  for (const char* s : kHif8NpuOps) ops.append(s);
  for (const char* s : kSkiparseSchemas) schemas.append(s);
  m.attr("NPU_HIF8_OPS") = ops;
  m.attr("NPU_SKIPARSE_SCHEMAS") = schemas;

  py::dict modes;
  modes["ok"] = static_cast<int>(SelftestMode::kOk);
  modes["alloc_overflow"] = static_cast<int>(SelftestMode::kAllocOverflow);
  modes["dequeue_empty"] = static_cast<int>(SelftestMode::kDequeueEmpty);
  modes["free_not_dequeued"] = static_cast<int>(SelftestMode::kFreeNotDequeued);
  modes["enqueue_twice"] = static_cast<int>(SelftestMode::kEnqueueTwice);
  modes["use_while_queued"] = static_cast<int>(SelftestMode::kUseWhileQueued);
  modes["leak"] = static_cast<int>(SelftestMode::kLeak);
  modes["missing_sync_in"] = static_cast<int>(SelftestMode::kMissingSyncIn);
  modes["missing_sync_out"] = static_cast<int>(SelftestMode::kMissingSyncOut);
  modes["wait_without_set"] = static_cast<int>(SelftestMode::kWaitWithoutSet);
  modes["set_without_wait"] = static_cast<int>(SelftestMode::kSetWithoutWait);
  modes["ub_overflow"] = static_cast<int>(SelftestMode::kUbOverflow);
  modes["unaligned_copy"] = static_cast<int>(SelftestMode::kUnalignedCopy);
  modes["gm_out_of_bounds"] = static_cast<int>(SelftestMode::kGmOutOfBounds);
  modes["double_write"] = static_cast<int>(SelftestMode::kDoubleWrite);
  m.attr("SELFTEST_MODES") = modes;

  m.def("elem_tiling",
        [](uint64_t n, uint64_t in_bytes, uint64_t out_bytes, uint64_t scratch_bytes, uint64_t fixed_bytes, uint64_t ub,
           uint64_t cores) {
          ElemTiling t;
          check_tiling(make_elem_tiling(n, KernelCost{in_bytes, out_bytes, scratch_bytes, fixed_bytes}, ub, cores, &t));
          return elem_dict(t);
        },
        py::arg("n"), py::arg("in_bytes"), py::arg("out_bytes"), py::arg("scratch_bytes"), py::arg("fixed_bytes"),
        py::arg("ub_bytes"), py::arg("cores"), "The elementwise tiling (csrc/ascend/tiling.h) with its per-block ranges.");
  m.def("row_tiling",
        [](uint64_t rows, uint64_t cols, uint64_t in_bytes, uint64_t out_bytes, uint64_t scratch_bytes, uint64_t fixed_bytes,
           uint64_t ub, uint64_t cores) {
          RowTiling t;
          check_tiling(make_row_tiling(rows, cols, KernelCost{in_bytes, out_bytes, scratch_bytes, fixed_bytes}, ub, cores, &t));
          return row_dict(t);
        },
        py::arg("rows"), py::arg("cols"), py::arg("in_bytes"), py::arg("out_bytes"), py::arg("scratch_bytes"),
        py::arg("fixed_bytes"), py::arg("ub_bytes"), py::arg("cores"), "The row tiling with its per-block row ranges.");
  m.def("kernel_cost",
        [](const std::string& op, uint64_t esize, uint64_t cores) {
          const KernelCost c = cost_of(op, esize, cores);
          return py::make_tuple(c.in_bytes, c.out_bytes, c.scratch_bytes, c.fixed_bytes);
        },
        py::arg("op"), py::arg("esize"), py::arg("cores"),
        "(in, out, scratch, fixed) UB bytes the kernel declares: encode, decode, round, quantize_tensor, quantize_rows, skiparse.");
  m.def("run_elementwise", &run_elementwise, py::arg("op"), py::arg("x"), py::arg("y"), py::arg("n"), py::arg("esize"),
        py::arg("ub_bytes"), py::arg("cores"), "Run hif8 encode / decode / round (esize 4: float32, 2: bfloat16).");
  m.def("run_quantize_tensor", &run_quantize_tensor, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("esize"),
        py::arg("scale_max"), py::arg("amax"), py::arg("ub_bytes"), py::arg("cores"),
        "Per-tensor quantise: the amax launch then the quantise launch (amax: address of a given float32, or 0).");
  m.def("run_quantize_rows", &run_quantize_rows, py::arg("x"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("esize"),
        py::arg("scale_max"), py::arg("amax"), py::arg("ub_bytes"), py::arg("cores"),
        "Per-row quantise (amax: address of rows given float32 values, or 0).");
  m.def("run_skiparse", &run_skiparse, py::arg("op"), py::arg("x"), py::arg("y"), py::arg("B"), py::arg("T"), py::arg("H"),
        py::arg("W"), py::arg("P"), py::arg("group"), py::arg("row_bytes"), py::arg("ub_bytes"), py::arg("cores"),
        "Skiparse fold / unfold / switch of rows of row_bytes bytes.");
  m.def("shim_selftest", &shim_selftest, py::arg("mode"), "Run the self-test kernel in one of SELFTEST_MODES.");
}
