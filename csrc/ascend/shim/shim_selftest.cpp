// Small Ascend C test kernels, each breaking one rule on purpose, so the tests can check that the CPU shim's
// assertions fire (tests/test_ascend_kernels.py::test_shim_*).  Compiled against the shim only.
#include "ascend/shim/ascendc_cpu.h"

#include <cstdint>
#include <string>

#include "ascend/kernel_common.h"
#include "ascend/shim/shim_selftest.h"

namespace ospfn {
namespace ascend {

namespace {

using AscendC::HardEvent;
using AscendC::LocalTensor;
using AscendC::TPosition;

// 64 floats in, 64 floats out (x + 1 on the bit patterns), with a configurable mistake.
class SelftestKernel {
 public:
  void Run(GM_ADDR x, GM_ADDR y, SelftestMode mode) {
    const uint64_t n = 64;
    xg_.SetGlobalBuffer(reinterpret_cast<uint32_t*>(x), 2 * n);
    yg_.SetGlobalBuffer(reinterpret_cast<uint32_t*>(y), 2 * n);
    const uint64_t off = mode == SelftestMode::kDoubleWrite ? 0 : static_cast<uint64_t>(AscendC::GetBlockIdx()) * n;
    if (mode == SelftestMode::kUbOverflow) {
      pipe_.InitBuffer(inq_, 2, 1 << 20);
      return;
    }
    pipe_.InitBuffer(inq_, 2, n * 4);
    pipe_.InitBuffer(outq_, 2, n * 4);
    if (mode == SelftestMode::kAllocOverflow) {
      LocalTensor<uint32_t> a = inq_.AllocTensor<uint32_t>();
      LocalTensor<uint32_t> b = inq_.AllocTensor<uint32_t>();
      LocalTensor<uint32_t> c = inq_.AllocTensor<uint32_t>();  // a third slot of a 2-slot queue
      (void)a, (void)b, (void)c;
      return;
    }
    if (mode == SelftestMode::kDequeueEmpty) {
      LocalTensor<uint32_t> a = inq_.DeQue<uint32_t>();  // nothing was enqueued
      (void)a;
      return;
    }
    if (mode == SelftestMode::kWaitWithoutSet) {
      AscendC::WaitFlag<HardEvent::MTE2_S>(0);
      return;
    }
    LocalTensor<uint32_t> in = inq_.AllocTensor<uint32_t>();
    if (mode == SelftestMode::kUnalignedCopy) {
      AscendC::DataCopy(in, xg_[off], 5);  // 20 bytes: not a whole 32-byte block
    } else if (mode == SelftestMode::kGmOutOfBounds) {
      AscendC::DataCopy(in, xg_[off + 2 * n - 8], static_cast<uint32_t>(n));  // runs past the buffer
    } else {
      AscendC::DataCopy(in, xg_[off], static_cast<uint32_t>(n));
    }
    if (mode == SelftestMode::kFreeNotDequeued) {
      inq_.FreeTensor(in);  // never enqueued / dequeued
      return;
    }
    inq_.EnQue(in);
    if (mode == SelftestMode::kEnqueueTwice) inq_.EnQue(in);
    if (mode == SelftestMode::kUseWhileQueued) in.SetValue(0, 1u);
    in = inq_.DeQue<uint32_t>();
    if (mode != SelftestMode::kMissingSyncIn) ospfn::ascend::pipe_sync<HardEvent::MTE2_S>(&pipe_);
    LocalTensor<uint32_t> out = outq_.AllocTensor<uint32_t>();
    for (uint64_t i = 0; i < n; ++i) out.SetValue(i, in.GetValue(i) + 1u);
    if (mode != SelftestMode::kMissingSyncOut) ospfn::ascend::pipe_sync<HardEvent::S_MTE3>(&pipe_);
    ospfn::ascend::pipe_sync<HardEvent::S_MTE2>(&pipe_);
    outq_.EnQue(out);
    if (mode == SelftestMode::kLeak) return;  // `in` is never freed
    inq_.FreeTensor(in);
    out = outq_.DeQue<uint32_t>();
    AscendC::DataCopy(yg_[off], out, static_cast<uint32_t>(n));
    outq_.FreeTensor(out);
    if (mode == SelftestMode::kSetWithoutWait) AscendC::SetFlag<HardEvent::S_V>(0);
  }

 private:
  AscendC::TPipe pipe_;
  AscendC::TQue<TPosition::VECIN, 2> inq_;
  AscendC::TQue<TPosition::VECOUT, 2> outq_;
  AscendC::GlobalTensor<uint32_t> xg_;
  AscendC::GlobalTensor<uint32_t> yg_;
};

}  // namespace

void selftest_kernel(GM_ADDR x, GM_ADDR y, SelftestMode mode) {
  SelftestKernel k;
  k.Run(x, y, mode);
}

}  // namespace ascend
}  // namespace ospfn
