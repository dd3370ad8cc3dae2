// Helpers shared by the Ascend C kernels: pipe synchronisation, aligned-or-padded copies, and the
// double-buffered tile streams.  Included by the kernel sources after the Ascend C API (the real
// "kernel_operator.h" or the CPU shim) and with OSPFN_HD defined as __aicore__.
//
// Synchronisation discipline (checked by the CPU shim, docs/npu.md#the-cpu-shim): the HiF8 arithmetic is
// scalar code on bit patterns (GetValue / SetValue on UB), so the queues' own events (MTE2 -> V on VECIN,
// V -> MTE3 on VECOUT) do not cover it; every hand-over between the scalar unit and a DMA pipe gets an
// explicit SetFlag / WaitFlag pair through pipe_sync.
#pragma once

#include <cstdint>

#include "ascend/tiling.h"

namespace ospfn {
namespace ascend {

template <AscendC::HardEvent E>
__aicore__ inline void pipe_sync(AscendC::TPipe* pipe) {
  const event_t id = static_cast<event_t>(pipe->FetchEventID(E));
  AscendC::SetFlag<E>(id);
  AscendC::WaitFlag<E>(id);
}

// GM -> UB of `count` elements starting at element `off` of `g` (whose base the launcher keeps 32-byte
// aligned): DataCopy when the GM offset and the length are whole 32-byte blocks, else DataCopyPad.
template <typename T>
__aicore__ inline void copy_in(const AscendC::LocalTensor<T>& dst, const AscendC::GlobalTensor<T>& g, uint64_t off,
                               uint64_t count) {
  if ((off * sizeof(T)) % kBlockBytes == 0 && (count * sizeof(T)) % kBlockBytes == 0) {
    AscendC::DataCopy(dst, g[off], static_cast<uint32_t>(count));
  } else {
    AscendC::DataCopyExtParams p{1, static_cast<uint32_t>(count * sizeof(T)), 0, 0, 0};
    AscendC::DataCopyPadExtParams<T> pad{false, 0, 0, 0};
    AscendC::DataCopyPad(dst, g[off], p, pad);
  }
}

// UB -> GM, the same rule.
template <typename T>
__aicore__ inline void copy_out(const AscendC::GlobalTensor<T>& g, uint64_t off, const AscendC::LocalTensor<T>& src,
                                uint64_t count) {
  if ((off * sizeof(T)) % kBlockBytes == 0 && (count * sizeof(T)) % kBlockBytes == 0) {
    AscendC::DataCopy(g[off], src, static_cast<uint32_t>(count));
  } else {
    AscendC::DataCopyExtParams p{1, static_cast<uint32_t>(count * sizeof(T)), 0, 0, 0};
    AscendC::DataCopyPad(g[off], src, p);
  }
}

// Streams a contiguous GM range through the UB in tiles of `tile` elements with two slots per queue: the
// next tile's copy-in is issued before the scalar work on the current one.
//   ForEach(x, start, len, f): f(in, count) reads every tile (in queue only)
//   Map(x, y, start, len, f):  f(in, out, count) turns every tile into an output tile copied out to y
// f runs on the scalar unit; the syncs around it are the ones the scalar accesses need.
template <typename TIn, typename TOut>
class TileStream {
 public:
  __aicore__ inline void Init(AscendC::TPipe* pipe, uint64_t tile, bool with_out) {
    pipe_ = pipe;
    tile_ = tile;
    pipe->InitBuffer(inq_, kBufferNum, static_cast<uint32_t>(tile * sizeof(TIn)));
    if (with_out) pipe->InitBuffer(outq_, kBufferNum, static_cast<uint32_t>(tile * sizeof(TOut)));
  }

  template <typename F>
  __aicore__ inline void ForEach(const AscendC::GlobalTensor<TIn>& x, uint64_t start, uint64_t len, F& f) {
    const uint64_t ntiles = len / tile_ + (len % tile_ != 0 ? 1 : 0);
    if (ntiles == 0) return;
    CopyIn(x, start, Count(len, 0));
    for (uint64_t j = 0; j < ntiles; ++j) {
      AscendC::LocalTensor<TIn> in = inq_.template DeQue<TIn>();
      pipe_sync<AscendC::HardEvent::MTE2_S>(pipe_);
      if (j + 1 < ntiles) CopyIn(x, start + (j + 1) * tile_, Count(len, j + 1));
      f(in, Count(len, j));
      pipe_sync<AscendC::HardEvent::S_MTE2>(pipe_);
      inq_.FreeTensor(in);
    }
  }

  template <typename F>
  __aicore__ inline void Map(const AscendC::GlobalTensor<TIn>& x, const AscendC::GlobalTensor<TOut>& y, uint64_t start,
                             uint64_t len, F& f) {
    const uint64_t ntiles = len / tile_ + (len % tile_ != 0 ? 1 : 0);
    if (ntiles == 0) return;
    CopyIn(x, start, Count(len, 0));
    for (uint64_t j = 0; j < ntiles; ++j) {
      const uint64_t count = Count(len, j);
      AscendC::LocalTensor<TIn> in = inq_.template DeQue<TIn>();
      pipe_sync<AscendC::HardEvent::MTE2_S>(pipe_);
      if (j + 1 < ntiles) CopyIn(x, start + (j + 1) * tile_, Count(len, j + 1));
      AscendC::LocalTensor<TOut> out = outq_.template AllocTensor<TOut>();
      pipe_sync<AscendC::HardEvent::MTE3_S>(pipe_);  // the slot's previous copy-out has finished reading it
      f(in, out, count);
      pipe_sync<AscendC::HardEvent::S_MTE3>(pipe_);  // scalar writes land before the copy-out
      pipe_sync<AscendC::HardEvent::S_MTE2>(pipe_);  // scalar reads finish before the slot is refilled
      outq_.EnQue(out);
      inq_.FreeTensor(in);
      AscendC::LocalTensor<TOut> done = outq_.template DeQue<TOut>();
      copy_out(y, start + j * tile_, done, count);
      outq_.FreeTensor(done);
    }
  }

 private:
  __aicore__ inline uint64_t Count(uint64_t len, uint64_t j) const {
    const uint64_t rest = len - j * tile_;
    return rest < tile_ ? rest : tile_;
  }
  __aicore__ inline void CopyIn(const AscendC::GlobalTensor<TIn>& x, uint64_t off, uint64_t count) {
    AscendC::LocalTensor<TIn> t = inq_.template AllocTensor<TIn>();
    copy_in(t, x, off, count);
    inq_.EnQue(t);
  }

  AscendC::TPipe* pipe_ = nullptr;
  uint64_t tile_ = 0;
  AscendC::TQue<AscendC::TPosition::VECIN, kBufferNum> inq_;
  AscendC::TQue<AscendC::TPosition::VECOUT, kBufferNum> outq_;
};

}  // namespace ascend
}  // namespace ospfn
