// The shim self-test kernel (shim_selftest.cpp): one correct run and one deliberate mistake per mode.
#pragma once

#include <cstdint>

namespace ospfn {
namespace ascend {

enum class SelftestMode : int {
  kOk = 0,
  kAllocOverflow,    // a third AllocTensor on a 2-slot queue
  kDequeueEmpty,     // DeQue without EnQue
  kFreeNotDequeued,  // FreeTensor straight after AllocTensor
  kEnqueueTwice,     // EnQue of a tensor already queued
  kUseWhileQueued,   // SetValue between EnQue and DeQue
  kLeak,             // a tensor never freed
  kMissingSyncIn,    // scalar read of a DMA'd tile without an MTE2 -> S sync
  kMissingSyncOut,   // copy-out of scalar-written data without an S -> MTE3 sync
  kWaitWithoutSet,   // WaitFlag with no SetFlag
  kSetWithoutWait,   // SetFlag with no WaitFlag
  kUbOverflow,       // InitBuffer past the UB budget
  kUnalignedCopy,    // DataCopy of 20 bytes
  kGmOutOfBounds,    // DataCopy past the end of a GM buffer
  kDoubleWrite,      // two blocks write the same GM bytes
};

void selftest_kernel(uint8_t* x, uint8_t* y, SelftestMode mode);

}  // namespace ascend
}  // namespace ospfn
