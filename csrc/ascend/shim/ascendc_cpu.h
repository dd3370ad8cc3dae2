// A minimal CPU host shim of the Ascend C primitives the ospfn kernels use (docs/npu.md#the-cpu-shim).
//
// The kernel sources (csrc/ascend/*_kernel.cpp) compile unchanged against this header (with
// -DOSPFN_ASCEND_CPU_SHIM) or against the real "kernel_operator.h" of CANN.  Here every block of a launch
// runs one after the other on the calling thread, over plain host memory, and the bookkeeping below turns the
// programming-model rules the kernels rely on into exceptions (ospfn_shim::Error, a std::runtime_error:
// RuntimeError in Python):
//
//  * Global memory: a launch names the buffers it passes (ospfn_shim::Launch::regions); every GM access must
//    fall inside one, writes only into writable ones; after the launch no byte may have been written twice
//    (by one block or two), and the bytes written per buffer are reported (tests check "exactly once").
//  * Unified Buffer: each block gets a fresh arena of Launch::ub_bytes bytes filled with a poison pattern
//    (0xA5); TPipe::InitBuffer carves 32-byte-aligned buffers from it and fails past the budget.
//  * Queues (TQue / TQueBind): AllocTensor fails when every slot is taken, EnQue needs a freshly allocated
//    tensor of that queue and at most `depth` queued, DeQue a non-empty queue, FreeTensor a dequeued tensor;
//    a tensor may not be touched while queued or after FreeTensor; at the end of a block every slot must be
//    free and every SetFlag waited.
//  * DataCopy: element count * sizeof(T) a multiple of 32, UB address 32-byte aligned, and (a rule of these
//    kernels, not of the hardware) a 32-byte aligned GM address.  DataCopyPad: blockCount == 1, any GM
//    address / length; GM -> UB fills the rest of the last 32-byte block with poison (or the padding value).
//  * Pipeline synchronisation: every UB access is attributed to a pipe (S scalar GetValue/SetValue, V vector
//    ops, MTE2 GM->UB, MTE3 UB->GM).  An access that depends on an earlier access of the same buffer by
//    another pipe (read-after-write, write-after-write, write-after-read) fails unless a sync from that pipe
//    to this one was issued after it: an explicit SetFlag<E>/WaitFlag<E> pair, PipeBarrier<PIPE_ALL>, or the
//    event a queue implies (EnQue -> DeQue: producer -> consumer pipe; FreeTensor -> AllocTensor: consumer ->
//    producer; VECIN = MTE2 -> V, VECOUT = V -> MTE3, TQueBind<VECIN, VECOUT> = MTE2 -> MTE3).
//
// Not modelled (the hardware can still differ here): timing and real pipeline overlap (blocks and pipes run
// sequentially, so a missing sync the model does not see cannot show up as a race), the UB the runtime
// reserves beyond the budget the launcher passes, bank conflicts, event-ID exhaustion (FetchEventID always
// returns 0), GM cache coherence between cores and 32-byte-line sharing between blocks (counted, not
// failed), DataCopy / DataCopyPad strides and blockCount > 1, hardware Cast / rounding modes (no vector
// arithmetic is shimmed: the kernels do their arithmetic in scalar C++ on bit patterns), subnormal flushing
// of the AI core's scalar float unit, and any instruction not listed here (a kernel using one fails to
// compile against the shim, which is the point).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define __vector__
#define GM_ADDR uint8_t*

enum event_t : int32_t { EVENT_ID0 = 0, EVENT_ID1, EVENT_ID2, EVENT_ID3, EVENT_ID4, EVENT_ID5, EVENT_ID6, EVENT_ID7 };

namespace ospfn_shim {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& msg) { throw Error("ascendc shim: " + msg); }

enum Pipe : int { kS = 0, kV = 1, kMTE2 = 2, kMTE3 = 3, kPipes = 4 };

inline const char* pipe_name(int p) {
  static const char* names[] = {"S (scalar)", "V (vector)", "MTE2 (GM->UB)", "MTE3 (UB->GM)"};
  return p >= 0 && p < kPipes ? names[p] : "none";
}

struct Region {
  uintptr_t base;
  uint64_t bytes;
  bool writable;
  std::string name;
};

struct Launch {
  uint64_t block_num = 0;
  uint64_t ub_bytes = 0;
  std::vector<Region> regions;
};

struct Stats {
  uint64_t blocks = 0;
  uint64_t ub_bytes_max = 0;    // the most UB any block carved with InitBuffer
  uint64_t data_copy = 0;       // DataCopy calls
  uint64_t data_copy_pad = 0;   // DataCopyPad calls
  uint64_t syncs = 0;           // WaitFlag + PipeBarrier + queue-implied waits
  uint64_t scalar_ops = 0;      // GetValue + SetValue
  uint64_t vector_ops = 0;
  uint64_t shared_lines = 0;    // 32-byte GM lines written by more than one block
  std::vector<uint64_t> written;  // bytes written per region
};

enum class SlotState { kFree, kAllocated, kQueued, kDequeued, kBuf };

inline const char* state_name(SlotState s) {
  switch (s) {
    case SlotState::kFree: return "free";
    case SlotState::kAllocated: return "allocated";
    case SlotState::kQueued: return "queued";
    case SlotState::kDequeued: return "dequeued";
    default: return "buffer";
  }
}

struct Slot {
  uint64_t off = 0;  // UB byte offset
  uint64_t len = 0;  // bytes (rounded up to 32)
  SlotState st = SlotState::kFree;
  const void* owner = nullptr;
  std::string owner_name;
  int last_write_pipe = -1;
  uint64_t last_write_tick = 0;
  uint64_t last_read_tick[kPipes] = {0, 0, 0, 0};
  uint64_t enq_tick = 0;
  uint64_t free_tick = 0;
};

struct Write {
  uintptr_t begin, end;
  uint64_t block;
};

struct State {
  bool active = false;
  Launch launch;
  int64_t block_idx = 0;
  std::vector<uint64_t> ub_words;  // the UB arena (uint64 words: 8-byte aligned host storage)
  uint64_t ub_used = 0;
  std::deque<Slot> slots;          // stable addresses
  uint64_t tick = 0;
  uint64_t synced_upto[kPipes][kPipes] = {};
  uint64_t pending_set[kPipes][kPipes][8] = {};
  const void* pipe = nullptr;
  std::vector<Write> writes;
  Stats stats;

  uint8_t* ub() { return reinterpret_cast<uint8_t*>(ub_words.data()); }
};

inline State& state() {
  static State s;
  return s;
}

inline State& active_state(const char* what) {
  State& s = state();
  if (!s.active) fail(std::string(what) + " called outside a launch (ospfn_shim::run)");
  return s;
}

// ----------------------------------------------------------------------------------------------------------
// bookkeeping helpers

inline void sync_pipes(int src, int dst, uint64_t upto) {
  State& s = state();
  if (s.synced_upto[src][dst] < upto) s.synced_upto[src][dst] = upto;
  ++s.stats.syncs;
}

// Record an access of `bytes` bytes at UB offset `off` of slot `sl` by pipe `p`; fails on a state or sync
// violation.
inline void touch(Slot& sl, uint64_t off, uint64_t bytes, int p, bool write, const char* what) {
  State& s = active_state(what);
  if (sl.st == SlotState::kFree)
    fail(std::string(what) + ": tensor of " + sl.owner_name + " used while free (after FreeTensor, or never allocated)");
  if (sl.st == SlotState::kQueued)
    fail(std::string(what) + ": tensor of " + sl.owner_name + " used while queued (between EnQue and DeQue)");
  if (off < sl.off || off + bytes > sl.off + sl.len)
    fail(std::string(what) + ": UB access [" + std::to_string(off) + ", " + std::to_string(off + bytes) +
         ") outside its buffer [" + std::to_string(sl.off) + ", " + std::to_string(sl.off + sl.len) + ") of " + sl.owner_name);
  ++s.tick;
  const int w = sl.last_write_pipe;
  if (w >= 0 && w != p && s.synced_upto[w][p] <= sl.last_write_tick)
    fail(std::string(what) + ": pipe " + pipe_name(p) + (write ? " writes " : " reads ") + sl.owner_name +
         " last written by pipe " + pipe_name(w) + " without a " + pipe_name(w) + " -> " + pipe_name(p) +
         " sync in between (SetFlag/WaitFlag or a queue EnQue/DeQue)");
  if (write) {
    for (int q = 0; q < kPipes; ++q) {
      if (q != p && sl.last_read_tick[q] != 0 && s.synced_upto[q][p] <= sl.last_read_tick[q])
        fail(std::string(what) + ": pipe " + pipe_name(p) + " overwrites " + sl.owner_name + " still being read by pipe " +
             pipe_name(q) + " (no " + pipe_name(q) + " -> " + pipe_name(p) + " sync since that read)");
    }
    sl.last_write_pipe = p;
    sl.last_write_tick = s.tick;
  } else {
    sl.last_read_tick[p] = s.tick;
  }
}

inline const Region& gm_region(uintptr_t addr, uint64_t bytes, bool write, const char* what) {
  State& s = active_state(what);
  for (const Region& r : s.launch.regions) {
    if (addr >= r.base && addr + bytes <= r.base + r.bytes && (bytes > 0 || addr < r.base + r.bytes)) {
      if (write && !r.writable) fail(std::string(what) + ": writes into read-only GM buffer '" + r.name + "'");
      return r;
    }
  }
  fail(std::string(what) + ": GM access of " + std::to_string(bytes) + " bytes at offset outside every buffer of the launch");
}

inline void gm_write(uintptr_t addr, uint64_t bytes, const char* what) {
  gm_region(addr, bytes, true, what);
  State& s = state();
  s.writes.push_back(Write{addr, addr + bytes, static_cast<uint64_t>(s.block_idx)});
}

// Every queue slot must be free again (Alloc -> EnQue -> DeQue -> Free completed).
inline void check_all_idle(const char* when) {
  for (const Slot& sl : state().slots)
    if (sl.st != SlotState::kFree && sl.st != SlotState::kBuf)
      fail(std::string(when) + ": a tensor of " + sl.owner_name + " is still " + state_name(sl.st) + " (missing FreeTensor?)");
}

inline constexpr uint64_t kGranule = 32;
inline constexpr uint8_t kPoison = 0xA5;

}  // namespace ospfn_shim

// ==========================================================================================================
// The AscendC API subset

namespace AscendC {

using TEventID = int8_t;

enum class TPosition : uint8_t { GM, VECIN, VECOUT, VECCALC, A1, A2, B1, B2, C1, C2, CO1, CO2 };
using QuePosition = TPosition;

enum class HardEvent : uint8_t {
  MTE2_V, V_MTE2, MTE3_V, V_MTE3, MTE2_MTE3, MTE3_MTE2, S_V, V_S, S_MTE2, MTE2_S, S_MTE3, MTE3_S,
};

enum pipe_t : uint8_t { PIPE_S, PIPE_V, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };

namespace shim_detail {
constexpr int src_pipe(HardEvent e) {
  switch (e) {
    case HardEvent::MTE2_V: case HardEvent::MTE2_MTE3: case HardEvent::MTE2_S: return ospfn_shim::kMTE2;
    case HardEvent::V_MTE2: case HardEvent::V_MTE3: case HardEvent::V_S: return ospfn_shim::kV;
    case HardEvent::MTE3_V: case HardEvent::MTE3_MTE2: case HardEvent::MTE3_S: return ospfn_shim::kMTE3;
    default: return ospfn_shim::kS;
  }
}
constexpr int dst_pipe(HardEvent e) {
  switch (e) {
    case HardEvent::V_MTE2: case HardEvent::MTE3_MTE2: case HardEvent::S_MTE2: return ospfn_shim::kMTE2;
    case HardEvent::MTE2_V: case HardEvent::MTE3_V: case HardEvent::S_V: return ospfn_shim::kV;
    case HardEvent::V_MTE3: case HardEvent::MTE2_MTE3: case HardEvent::S_MTE3: return ospfn_shim::kMTE3;
    default: return ospfn_shim::kS;
  }
}
}  // namespace shim_detail

inline int64_t GetBlockIdx() { return ospfn_shim::active_state("GetBlockIdx").block_idx; }
inline int64_t GetBlockNum() { return static_cast<int64_t>(ospfn_shim::active_state("GetBlockNum").launch.block_num); }

template <HardEvent E>
inline void SetFlag(int32_t id) {
  ospfn_shim::State& s = ospfn_shim::active_state("SetFlag");
  if (id < 0 || id > 7) ospfn_shim::fail("SetFlag: event id out of range 0..7");
  uint64_t& pend = s.pending_set[shim_detail::src_pipe(E)][shim_detail::dst_pipe(E)][id];
  if (pend != 0) ospfn_shim::fail("SetFlag: the same event was set twice without a WaitFlag in between");
  pend = ++s.tick;
}

template <HardEvent E>
inline void WaitFlag(int32_t id) {
  ospfn_shim::State& s = ospfn_shim::active_state("WaitFlag");
  if (id < 0 || id > 7) ospfn_shim::fail("WaitFlag: event id out of range 0..7");
  uint64_t& pend = s.pending_set[shim_detail::src_pipe(E)][shim_detail::dst_pipe(E)][id];
  if (pend == 0) ospfn_shim::fail("WaitFlag without a matching SetFlag (would hang on the device)");
  ospfn_shim::sync_pipes(shim_detail::src_pipe(E), shim_detail::dst_pipe(E), pend);
  pend = 0;
}

template <pipe_t P>
inline void PipeBarrier() {
  static_assert(P == PIPE_ALL, "the shim models PipeBarrier<PIPE_ALL> only");
  ospfn_shim::State& s = ospfn_shim::active_state("PipeBarrier");
  ++s.tick;
  for (int a = 0; a < ospfn_shim::kPipes; ++a)
    for (int b = 0; b < ospfn_shim::kPipes; ++b) s.synced_upto[a][b] = s.tick;
  ++s.stats.syncs;
}

// ----------------------------------------------------------------------------------------------------------
// tensors

template <typename T>
class GlobalTensor {
 public:
  void SetGlobalBuffer(T* buffer, uint64_t size) {
    ospfn_shim::gm_region(reinterpret_cast<uintptr_t>(buffer), size * sizeof(T), false, "SetGlobalBuffer");
    addr_ = buffer;
    size_ = size;
  }
  GlobalTensor operator[](uint64_t offset) const {
    if (offset > size_) ospfn_shim::fail("GlobalTensor[]: offset " + std::to_string(offset) + " past its size " + std::to_string(size_));
    GlobalTensor g;
    g.addr_ = addr_ + offset;
    g.size_ = size_ - offset;
    return g;
  }
  uint64_t GetSize() const { return size_; }
  T* GetPhyAddr() const { return addr_; }

 private:
  T* addr_ = nullptr;
  uint64_t size_ = 0;
};

template <typename T>
class LocalTensor {
 public:
  LocalTensor() = default;
  LocalTensor(ospfn_shim::Slot* slot, uint64_t off, uint64_t count) : slot_(slot), off_(off), count_(count) {}

  T GetValue(uint64_t i) const {
    check_index(i, "GetValue");
    ospfn_shim::touch(*slot_, off_ + i * sizeof(T), sizeof(T), ospfn_shim::kS, false, "GetValue");
    ++ospfn_shim::state().stats.scalar_ops;
    T v;
    std::memcpy(&v, ospfn_shim::state().ub() + off_ + i * sizeof(T), sizeof(T));
    return v;
  }
  void SetValue(uint64_t i, T v) const {
    check_index(i, "SetValue");
    ospfn_shim::touch(*slot_, off_ + i * sizeof(T), sizeof(T), ospfn_shim::kS, true, "SetValue");
    ++ospfn_shim::state().stats.scalar_ops;
    std::memcpy(ospfn_shim::state().ub() + off_ + i * sizeof(T), &v, sizeof(T));
  }
  LocalTensor operator[](uint64_t offset) const {
    if (offset > count_) ospfn_shim::fail("LocalTensor[]: offset past the tensor");
    return LocalTensor(slot_, off_ + offset * sizeof(T), count_ - offset);
  }
  template <typename U>
  LocalTensor<U> ReinterpretCast() const {
    return LocalTensor<U>(slot_, off_, count_ * sizeof(T) / sizeof(U));
  }
  uint32_t GetSize() const { return static_cast<uint32_t>(count_); }

  // shim internals
  ospfn_shim::Slot* slot() const { return slot_; }
  uint64_t ub_offset() const { return off_; }
  uint64_t count() const { return count_; }
  uint8_t* data() const { return ospfn_shim::state().ub() + off_; }

 private:
  void check_index(uint64_t i, const char* what) const {
    if (slot_ == nullptr) ospfn_shim::fail(std::string(what) + " on an empty LocalTensor");
    if (i >= count_) ospfn_shim::fail(std::string(what) + ": index " + std::to_string(i) + " out of range " + std::to_string(count_));
  }
  ospfn_shim::Slot* slot_ = nullptr;
  uint64_t off_ = 0;
  uint64_t count_ = 0;
};

// ----------------------------------------------------------------------------------------------------------
// TPipe, queues, buffers

class TPipe;

template <TPosition SRC, TPosition DST, int32_t DEPTH>
class TQueBind {
 public:
  template <typename T>
  LocalTensor<T> AllocTensor() {
    for (ospfn_shim::Slot* sl : slots_) {
      if (sl->st == ospfn_shim::SlotState::kFree) {
        if (sl->free_tick != 0) ospfn_shim::sync_pipes(cons_, prod_, sl->free_tick);  // FreeTensor -> AllocTensor event
        sl->st = ospfn_shim::SlotState::kAllocated;
        return LocalTensor<T>(sl, sl->off, sl->len / sizeof(T));
      }
    }
    if (slots_.empty()) ospfn_shim::fail("AllocTensor on a queue without InitBuffer");
    ospfn_shim::fail("AllocTensor: all " + std::to_string(slots_.size()) + " buffers of " + name() +
                     " are in use (missing FreeTensor?)");
  }
  template <typename T>
  bool EnQue(const LocalTensor<T>& t) {
    ospfn_shim::Slot* sl = own(t.slot(), "EnQue");
    if (sl->st != ospfn_shim::SlotState::kAllocated)
      ospfn_shim::fail("EnQue of a tensor that is " + std::string(ospfn_shim::state_name(sl->st)) + ", not freshly allocated, in " + name());
    if (queued_.size() >= static_cast<size_t>(DEPTH))
      ospfn_shim::fail("EnQue: more than depth " + std::to_string(DEPTH) + " tensors queued in " + name() + " (missing DeQue?)");
    sl->st = ospfn_shim::SlotState::kQueued;
    sl->enq_tick = ++ospfn_shim::state().tick;  // the producer -> consumer SetFlag
    queued_.push_back(sl);
    return true;
  }
  template <typename T>
  LocalTensor<T> DeQue() {
    if (queued_.empty()) ospfn_shim::fail("DeQue on the empty " + name() + " (missing EnQue?)");
    ospfn_shim::Slot* sl = queued_.front();
    queued_.pop_front();
    sl->st = ospfn_shim::SlotState::kDequeued;
    ospfn_shim::sync_pipes(prod_, cons_, sl->enq_tick);
    return LocalTensor<T>(sl, sl->off, sl->len / sizeof(T));
  }
  template <typename T>
  void FreeTensor(const LocalTensor<T>& t) {
    ospfn_shim::Slot* sl = own(t.slot(), "FreeTensor");
    if (sl->st != ospfn_shim::SlotState::kDequeued)
      ospfn_shim::fail("FreeTensor of a tensor that is " + std::string(ospfn_shim::state_name(sl->st)) +
                       ", not dequeued, in " + name() + " (Alloc -> EnQue -> DeQue -> Free)");
    sl->st = ospfn_shim::SlotState::kFree;
    sl->free_tick = ++ospfn_shim::state().tick;  // the consumer -> producer SetFlag
  }

  // shim internals
  void shim_init(uint8_t num, uint64_t len, uint64_t off0) {
    if (!slots_.empty()) ospfn_shim::fail("InitBuffer called twice on " + name());
    if (num == 0 || num > DEPTH * 4) ospfn_shim::fail("InitBuffer: bad buffer count for " + name());
    for (uint8_t i = 0; i < num; ++i) {
      ospfn_shim::state().slots.emplace_back();
      ospfn_shim::Slot* sl = &ospfn_shim::state().slots.back();
      sl->off = off0 + i * len;
      sl->len = len;
      sl->owner = this;
      sl->owner_name = name();
      slots_.push_back(sl);
    }
    set_pipes();
  }
  std::string name() const {
    return std::string("TQue<") + pos_name(SRC) + (SRC == DST ? "" : std::string("->") + pos_name(DST)) + ", " +
           std::to_string(DEPTH) + ">";
  }

 private:
  static const char* pos_name(TPosition p) {
    return p == TPosition::VECIN ? "VECIN" : p == TPosition::VECOUT ? "VECOUT" : p == TPosition::VECCALC ? "VECCALC" : "other";
  }
  void set_pipes() {
    if (SRC == TPosition::VECIN && DST == TPosition::VECIN) { prod_ = ospfn_shim::kMTE2; cons_ = ospfn_shim::kV; return; }
    if (SRC == TPosition::VECOUT && DST == TPosition::VECOUT) { prod_ = ospfn_shim::kV; cons_ = ospfn_shim::kMTE3; return; }
    if (SRC == TPosition::VECIN && DST == TPosition::VECOUT) { prod_ = ospfn_shim::kMTE2; cons_ = ospfn_shim::kMTE3; return; }
    ospfn_shim::fail("the shim models TQue<VECIN>, TQue<VECOUT> and TQueBind<VECIN, VECOUT> only");
  }
  ospfn_shim::Slot* own(ospfn_shim::Slot* sl, const char* what) const {
    if (sl == nullptr || sl->owner != this) ospfn_shim::fail(std::string(what) + ": the tensor does not belong to " + name());
    return sl;
  }
  std::vector<ospfn_shim::Slot*> slots_;
  std::deque<ospfn_shim::Slot*> queued_;
  int prod_ = 0, cons_ = 0;
};

template <TPosition POS, int32_t DEPTH>
using TQue = TQueBind<POS, POS, DEPTH>;

template <TPosition POS>
class TBuf {
 public:
  template <typename T>
  LocalTensor<T> Get() const {
    if (slot_ == nullptr) ospfn_shim::fail("TBuf::Get before InitBuffer");
    return LocalTensor<T>(slot_, slot_->off, slot_->len / sizeof(T));
  }
  template <typename T>
  LocalTensor<T> Get(uint32_t count) const {
    LocalTensor<T> t = Get<T>();
    if (count > t.count()) ospfn_shim::fail("TBuf::Get: more elements than the buffer holds");
    return LocalTensor<T>(slot_, slot_->off, count);
  }
  void shim_init(uint64_t len, uint64_t off0) {
    if (slot_ != nullptr) ospfn_shim::fail("InitBuffer called twice on a TBuf");
    ospfn_shim::state().slots.emplace_back();
    slot_ = &ospfn_shim::state().slots.back();
    slot_->off = off0;
    slot_->len = len;
    slot_->st = ospfn_shim::SlotState::kBuf;
    slot_->owner = this;
    slot_->owner_name = "TBuf";
  }
 private:
  ospfn_shim::Slot* slot_ = nullptr;
};

class TPipe {
 public:
  TPipe() {
    ospfn_shim::State& s = ospfn_shim::active_state("TPipe");
    if (s.pipe != nullptr) ospfn_shim::fail("a second TPipe in one block");
    s.pipe = this;
  }
  // The slot records live in the shim state, not in the queue objects (which a kernel class usually destroys
  // before its TPipe member), so the leak check reads those.
  ~TPipe() noexcept(false) {
    ospfn_shim::State& s = ospfn_shim::state();
    if (s.pipe == this) s.pipe = nullptr;
    if (std::uncaught_exceptions() == 0) ospfn_shim::check_all_idle("end of kernel (TPipe destroyed)");
  }
  TPipe(const TPipe&) = delete;
  TPipe& operator=(const TPipe&) = delete;

  template <TPosition SRC, TPosition DST, int32_t DEPTH>
  bool InitBuffer(TQueBind<SRC, DST, DEPTH>& que, uint8_t num, uint32_t len) {
    const uint64_t l = round_up(len);
    que.shim_init(num, l, carve(static_cast<uint64_t>(num) * l, "InitBuffer(queue)"));
    return true;
  }
  template <TPosition POS>
  bool InitBuffer(TBuf<POS>& buf, uint32_t len) {
    const uint64_t l = round_up(len);
    buf.shim_init(l, carve(l, "InitBuffer(TBuf)"));
    return true;
  }
  TEventID FetchEventID(HardEvent) { return 0; }
  template <HardEvent E>
  TEventID FetchEventID() { return 0; }

 private:
  static uint64_t round_up(uint64_t len) {
    if (len == 0) ospfn_shim::fail("InitBuffer with length 0");
    return (len + ospfn_shim::kGranule - 1) / ospfn_shim::kGranule * ospfn_shim::kGranule;
  }
  uint64_t carve(uint64_t bytes, const char* what) {
    ospfn_shim::State& s = ospfn_shim::active_state(what);
    const uint64_t off = s.ub_used;
    if (off + bytes > s.launch.ub_bytes)
      ospfn_shim::fail(std::string(what) + ": UB budget exceeded: " + std::to_string(off + bytes) + " > " +
                       std::to_string(s.launch.ub_bytes) + " bytes");
    s.ub_used = off + bytes;
    if (s.ub_used > s.stats.ub_bytes_max) s.stats.ub_bytes_max = s.ub_used;
    return off;
  }
};

// ----------------------------------------------------------------------------------------------------------
// data movement

struct DataCopyExtParams {
  uint16_t blockCount = 0;
  uint32_t blockLen = 0;  // bytes
  uint32_t srcStride = 0;
  uint32_t dstStride = 0;
  uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
  bool isPad = false;
  uint8_t leftPadding = 0;
  uint8_t rightPadding = 0;
  T paddingValue = 0;
};

namespace shim_detail {
template <typename T>
inline void check_ub_aligned(const LocalTensor<T>& t, const char* what) {
  if (t.slot() == nullptr) ospfn_shim::fail(std::string(what) + " on an empty LocalTensor");
  if (t.ub_offset() % ospfn_shim::kGranule != 0)
    ospfn_shim::fail(std::string(what) + ": UB address " + std::to_string(t.ub_offset()) + " is not 32-byte aligned");
}
template <typename T>
inline void check_ub_room(const LocalTensor<T>& t, uint64_t bytes, const char* what) {
  if (bytes > t.count() * sizeof(T))
    ospfn_shim::fail(std::string(what) + ": " + std::to_string(bytes) + " bytes do not fit the LocalTensor of " +
                     std::to_string(t.count() * sizeof(T)) + " bytes");
}
template <typename T>
inline void check_gm(const GlobalTensor<T>& g, uint64_t bytes, const char* what) {
  if (bytes > g.GetSize() * sizeof(T))
    ospfn_shim::fail(std::string(what) + ": " + std::to_string(bytes) + " bytes past the end of the GlobalTensor");
}
}  // namespace shim_detail

template <typename T>
inline void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
  const uint64_t bytes = static_cast<uint64_t>(count) * sizeof(T);
  shim_detail::check_ub_aligned(dst, "DataCopy(GM->UB)");
  if (bytes == 0 || bytes % ospfn_shim::kGranule != 0)
    ospfn_shim::fail("DataCopy(GM->UB): " + std::to_string(bytes) + " bytes is not a positive multiple of 32 (use DataCopyPad)");
  if (reinterpret_cast<uintptr_t>(src.GetPhyAddr()) % ospfn_shim::kGranule != 0)
    ospfn_shim::fail("DataCopy(GM->UB): GM address not 32-byte aligned (these kernels use DataCopyPad there)");
  shim_detail::check_ub_room(dst, bytes, "DataCopy(GM->UB)");
  shim_detail::check_gm(src, bytes, "DataCopy(GM->UB)");
  ospfn_shim::gm_region(reinterpret_cast<uintptr_t>(src.GetPhyAddr()), bytes, false, "DataCopy(GM->UB)");
  ospfn_shim::touch(*dst.slot(), dst.ub_offset(), bytes, ospfn_shim::kMTE2, true, "DataCopy(GM->UB)");
  std::memcpy(dst.data(), src.GetPhyAddr(), bytes);
  ++ospfn_shim::state().stats.data_copy;
}

template <typename T>
inline void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
  const uint64_t bytes = static_cast<uint64_t>(count) * sizeof(T);
  shim_detail::check_ub_aligned(src, "DataCopy(UB->GM)");
  if (bytes == 0 || bytes % ospfn_shim::kGranule != 0)
    ospfn_shim::fail("DataCopy(UB->GM): " + std::to_string(bytes) + " bytes is not a positive multiple of 32 (use DataCopyPad)");
  if (reinterpret_cast<uintptr_t>(dst.GetPhyAddr()) % ospfn_shim::kGranule != 0)
    ospfn_shim::fail("DataCopy(UB->GM): GM address not 32-byte aligned (these kernels use DataCopyPad there)");
  shim_detail::check_ub_room(src, bytes, "DataCopy(UB->GM)");
  shim_detail::check_gm(dst, bytes, "DataCopy(UB->GM)");
  ospfn_shim::touch(*src.slot(), src.ub_offset(), bytes, ospfn_shim::kMTE3, false, "DataCopy(UB->GM)");
  ospfn_shim::gm_write(reinterpret_cast<uintptr_t>(dst.GetPhyAddr()), bytes, "DataCopy(UB->GM)");
  std::memcpy(dst.GetPhyAddr(), src.data(), bytes);
  ++ospfn_shim::state().stats.data_copy;
}

template <typename T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                        const DataCopyPadExtParams<T>& pad) {
  if (p.blockCount != 1) ospfn_shim::fail("DataCopyPad: the shim models blockCount == 1 only");
  const uint64_t bytes = p.blockLen;
  if (bytes == 0) ospfn_shim::fail("DataCopyPad(GM->UB): blockLen 0");
  const uint64_t padded = (bytes + ospfn_shim::kGranule - 1) / ospfn_shim::kGranule * ospfn_shim::kGranule;
  shim_detail::check_ub_aligned(dst, "DataCopyPad(GM->UB)");
  shim_detail::check_ub_room(dst, padded, "DataCopyPad(GM->UB)");
  shim_detail::check_gm(src, bytes, "DataCopyPad(GM->UB)");
  ospfn_shim::gm_region(reinterpret_cast<uintptr_t>(src.GetPhyAddr()), bytes, false, "DataCopyPad(GM->UB)");
  ospfn_shim::touch(*dst.slot(), dst.ub_offset(), padded, ospfn_shim::kMTE2, true, "DataCopyPad(GM->UB)");
  uint8_t* d = dst.data();
  std::memcpy(d, src.GetPhyAddr(), bytes);
  std::memset(d + bytes, ospfn_shim::kPoison, padded - bytes);  // the hardware leaves it undefined
  if (pad.isPad) {
    if (pad.leftPadding != 0) ospfn_shim::fail("DataCopyPad: the shim models right padding only");
    for (uint64_t i = 0; i < pad.rightPadding && bytes + (i + 1) * sizeof(T) <= padded; ++i)
      std::memcpy(d + bytes + i * sizeof(T), &pad.paddingValue, sizeof(T));
  }
  ++ospfn_shim::state().stats.data_copy_pad;
}

template <typename T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
  if (p.blockCount != 1) ospfn_shim::fail("DataCopyPad: the shim models blockCount == 1 only");
  const uint64_t bytes = p.blockLen;
  if (bytes == 0) ospfn_shim::fail("DataCopyPad(UB->GM): blockLen 0");
  shim_detail::check_ub_aligned(src, "DataCopyPad(UB->GM)");
  shim_detail::check_ub_room(src, bytes, "DataCopyPad(UB->GM)");
  shim_detail::check_gm(dst, bytes, "DataCopyPad(UB->GM)");
  ospfn_shim::touch(*src.slot(), src.ub_offset(), bytes, ospfn_shim::kMTE3, false, "DataCopyPad(UB->GM)");
  ospfn_shim::gm_write(reinterpret_cast<uintptr_t>(dst.GetPhyAddr()), bytes, "DataCopyPad(UB->GM)");
  std::memcpy(dst.GetPhyAddr(), src.data(), bytes);
  ++ospfn_shim::state().stats.data_copy_pad;
}

// ----------------------------------------------------------------------------------------------------------
// vector instructions (the only one the kernels use)

template <typename T>
inline void Duplicate(const LocalTensor<T>& dst, const T& scalar, const int32_t& count) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "Duplicate takes 16- or 32-bit elements");
  shim_detail::check_ub_aligned(dst, "Duplicate");
  if (count <= 0) ospfn_shim::fail("Duplicate: count must be > 0");
  const uint64_t bytes = static_cast<uint64_t>(count) * sizeof(T);
  shim_detail::check_ub_room(dst, bytes, "Duplicate");
  ospfn_shim::touch(*dst.slot(), dst.ub_offset(), bytes, ospfn_shim::kV, true, "Duplicate");
  for (int32_t i = 0; i < count; ++i) std::memcpy(dst.data() + i * sizeof(T), &scalar, sizeof(T));
  ++ospfn_shim::state().stats.vector_ops;
}

}  // namespace AscendC

// ==========================================================================================================
// The launcher: runs every block of a kernel in turn.

namespace ospfn_shim {

// Run `kernel()` once per block (GetBlockIdx() = 0 .. block_num - 1) with fresh UB and pipe state; fails on
// any violation (see the top of this file) and returns the launch's statistics.
template <typename F>
Stats run(const Launch& launch, F&& kernel) {
  State& s = state();
  if (s.active) fail("nested launch");
  struct Guard {
    State& s;
    ~Guard() {
      s.active = false;
      s.slots.clear();
      s.pipe = nullptr;
    }
  } guard{s};
  s.active = true;
  s.launch = launch;
  s.writes.clear();
  s.stats = Stats{};
  s.stats.blocks = launch.block_num;
  s.ub_words.assign((launch.ub_bytes + 7) / 8, 0);
  for (uint64_t b = 0; b < launch.block_num; ++b) {
    s.block_idx = static_cast<int64_t>(b);
    std::memset(s.ub(), kPoison, s.ub_words.size() * 8);
    s.ub_used = 0;
    s.slots.clear();
    s.tick = 0;
    std::memset(s.synced_upto, 0, sizeof(s.synced_upto));
    std::memset(s.pending_set, 0, sizeof(s.pending_set));
    s.pipe = nullptr;
    kernel();
    check_all_idle("end of kernel");
    for (int a = 0; a < kPipes; ++a)
      for (int c = 0; c < kPipes; ++c)
        for (int id = 0; id < 8; ++id)
          if (s.pending_set[a][c][id] != 0)
            fail(std::string("end of kernel: SetFlag ") + pipe_name(a) + " -> " + pipe_name(c) + " without its WaitFlag");
  }
  // every GM byte written at most once per launch; count bytes per buffer and 32-byte lines shared by blocks
  std::sort(s.writes.begin(), s.writes.end(), [](const Write& a, const Write& b) { return a.begin < b.begin; });
  s.stats.written.assign(launch.regions.size(), 0);
  for (size_t i = 0; i < s.writes.size(); ++i) {
    const Write& w = s.writes[i];
    if (i > 0 && s.writes[i - 1].end > w.begin)
      fail("GM bytes written twice in one launch (blocks " + std::to_string(s.writes[i - 1].block) + " and " +
           std::to_string(w.block) + ")");
    if (i > 0 && s.writes[i - 1].block != w.block && (s.writes[i - 1].end - 1) / kGranule == w.begin / kGranule)
      ++s.stats.shared_lines;
    for (size_t r = 0; r < launch.regions.size(); ++r) {
      const Region& reg = launch.regions[r];
      if (w.begin >= reg.base && w.end <= reg.base + reg.bytes) s.stats.written[r] += w.end - w.begin;
    }
  }
  return s.stats;
}

}  // namespace ospfn_shim
