// Ascend C kernels of the Skiparse-2D permutations (docs/skiparse.md, docs/npu.md#ascend-c-kernels):
//
//   ospfn_skiparse_fold     [B, T*H*W, C] -> [P^2 B, N_pad / P^2, C]   (token or group layout, zero padding)
//   ospfn_skiparse_unfold   the inverse, cropping the padding
//   ospfn_skiparse_switch   token <-> group on folded data
//
// Pure data movement, so bit-exact with the `ref` backend by construction: every output row (one token's C
// channels, moved as row_bytes raw bytes whatever the dtype) is gathered from the source row the map of
// csrc/ascend/kernel_args.h names, or -- for a pad slot of fold -- written from a zeroed UB tile (all-zero
// bytes: +0.0 / 0 / False, what the ref pads with).  Blocks own contiguous runs of output rows (the row
// tiling); a row longer than one tile moves in column tiles.  Each tile goes GM -> UB -> GM through a
// TQueBind<VECIN, VECOUT> with two slots, so one tile's copy-out overlaps the next one's copy-in.
#ifdef OSPFN_ASCEND_CPU_SHIM
#include "ascend/shim/ascendc_cpu.h"
#else
#include "kernel_operator.h"
#endif

#ifndef OSPFN_HD
#define OSPFN_HD __aicore__
#endif

#include "ascend/kernel_args.h"
#include "ascend/kernel_common.h"
#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {
namespace {

template <SkiparseOp OP>
__aicore__ inline uint64_t source_row(const SkiparseGeom& g, uint64_t o) {
  if (OP == SkiparseOp::kFold) return skiparse_fold_src(g, o);
  if (OP == SkiparseOp::kUnfold) return skiparse_unfold_src(g, o);
  return skiparse_switch_src(g, o);
}

template <SkiparseOp OP>
class SkiparseKernel {
 public:
  __aicore__ inline void Run(GM_ADDR x, GM_ADDR y, const SkiparseArgs& a) {
    const RowTiling& t = a.tiling;
    const uint64_t b = static_cast<uint64_t>(AscendC::GetBlockIdx());
    if (b >= t.block_num) return;
    const RowBlock rb = row_block(t, b);
    const uint64_t row_bytes = t.cols;
    xg_.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(x), a.in_rows * row_bytes);
    yg_.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(y), t.rows * row_bytes);
    pipe_.InitBuffer(que_, kBufferNum, static_cast<uint32_t>(t.tile));
    pipe_.InitBuffer(zero_, static_cast<uint32_t>(t.tile));
    AscendC::LocalTensor<uint8_t> zero = zero_.Get<uint8_t>();
    if (OP == SkiparseOp::kFold) {
      AscendC::Duplicate(zero.ReinterpretCast<int32_t>(), static_cast<int32_t>(0), static_cast<int32_t>(t.tile / 4));
      pipe_sync<AscendC::HardEvent::V_MTE3>(&pipe_);
    }
    const uint64_t ncols = t.col_full_tiles + (t.col_tail != 0 ? 1 : 0);
    for (uint64_t o = rb.row_start; o < rb.row_start + rb.row_count; ++o) {
      const uint64_t src = source_row<OP>(a.geom, o);
      for (uint64_t j = 0; j < ncols; ++j) {
        const uint64_t off = j * t.tile;
        const uint64_t len = j < t.col_full_tiles ? t.tile : t.col_tail;
        if (src == kPadRow) {
          copy_out(yg_, o * row_bytes + off, zero, len);
          continue;
        }
        AscendC::LocalTensor<uint8_t> buf = que_.template AllocTensor<uint8_t>();
        copy_in(buf, xg_, src * row_bytes + off, len);
        que_.EnQue(buf);
        AscendC::LocalTensor<uint8_t> ready = que_.template DeQue<uint8_t>();
        copy_out(yg_, o * row_bytes + off, ready, len);
        que_.FreeTensor(ready);
      }
    }
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TQueBind<AscendC::TPosition::VECIN, AscendC::TPosition::VECOUT, kBufferNum> que_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> zero_;
  AscendC::GlobalTensor<uint8_t> xg_;
  AscendC::GlobalTensor<uint8_t> yg_;
};

}  // namespace
}  // namespace ascend
}  // namespace ospfn

using ospfn::ascend::SkiparseArgs;

extern "C" __global__ __aicore__ void ospfn_skiparse_fold(GM_ADDR x, GM_ADDR y, SkiparseArgs a) {
  ospfn::ascend::SkiparseKernel<ospfn::ascend::SkiparseOp::kFold> k;
  k.Run(x, y, a);
}
extern "C" __global__ __aicore__ void ospfn_skiparse_unfold(GM_ADDR x, GM_ADDR y, SkiparseArgs a) {
  ospfn::ascend::SkiparseKernel<ospfn::ascend::SkiparseOp::kUnfold> k;
  k.Run(x, y, a);
}
extern "C" __global__ __aicore__ void ospfn_skiparse_switch(GM_ADDR x, GM_ADDR y, SkiparseArgs a) {
  ospfn::ascend::SkiparseKernel<ospfn::ascend::SkiparseOp::kSwitch> k;
  k.Run(x, y, a);
}
