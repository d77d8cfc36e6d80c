// The recorder of trace.h: the __tsan_* functions that gcc's ThreadSanitizer instrumentation calls
// for every load, store and atomic of the csrc .cu files (this file itself is not instrumented, and
// no TSan runtime is linked). Only accesses made inside a kernel (a block of simt_cuda.h is running on this OS
// thread) to one of the traced buffers are kept.
#include "trace.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace simt_trace {
namespace {

struct Range {
  uintptr_t lo, hi;
};

std::atomic<bool> tracing{false};
std::vector<Range> ranges;  // written only while tracing is off
std::mutex events_mutex;
std::vector<std::vector<Event>*> all_events;  // one list per OS thread that recorded

uintptr_t module_base() {
  static const uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&begin), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

struct ThreadState {
  std::vector<Event>* events = nullptr;
  uint32_t launch = ~0u, block = ~0u;
  std::unordered_map<uint64_t, uint32_t> occurrences;  // (thread, site) -> accesses so far, this block
};
thread_local ThreadState state;

inline void record(uintptr_t address, size_t size, bool store, uintptr_t pc) {
  if (!tracing.load(std::memory_order_relaxed) || simt::current_block == nullptr) return;
  bool inside = false;
  for (const Range& r : ranges)
    if (address >= r.lo && address < r.hi) {
      inside = true;
      break;
    }
  if (!inside) return;
  ThreadState& s = state;
  if (s.events == nullptr) {
    s.events = new std::vector<Event>();
    std::lock_guard<std::mutex> lock(events_mutex);
    all_events.push_back(s.events);
  }
  const uint32_t launch = static_cast<uint32_t>(simt::launches().size() - 1);
  const uint32_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (launch != s.launch || block != s.block) {  // a block runs on one OS thread from start to end
    s.occurrences.clear();
    s.launch = launch;
    s.block = block;
  }
  const uint32_t thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const uint64_t site = pc - module_base();
  const uint32_t occurrence = s.occurrences[site ^ (uint64_t(thread) << 48) ^ (uint64_t(store) << 47)]++;
  s.events->push_back(Event{address, site, launch, block, occurrence, static_cast<uint16_t>(thread),
                            static_cast<uint8_t>(size < 255 ? size : 255), static_cast<uint8_t>(store)});
}

}  // namespace

void begin(const std::vector<std::pair<uintptr_t, size_t>>& buffers) {
  tracing = false;
  ranges.clear();
  for (const auto& [address, bytes] : buffers)
    if (address != 0 && bytes > 0) ranges.push_back(Range{address, address + bytes});
  tracing = true;
}

std::string end() {
  tracing = false;
  std::string out;
  std::lock_guard<std::mutex> lock(events_mutex);
  for (auto* events : all_events) {
    out.append(reinterpret_cast<const char*>(events->data()), events->size() * sizeof(Event));
    events->clear();
  }
  return out;
}

void clear() {
  std::lock_guard<std::mutex> lock(events_mutex);
  for (auto* events : all_events) events->clear();
}

}  // namespace simt_trace

// The instrumentation's entry points (ThreadSanitizer's interface, without its runtime). The
// return address of each call is the access's call site.
#define SIMT_TRACE_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define SIMT_TRACE_ACCESS(n)                                                                              \
  extern "C" void __tsan_read##n(void* p) { simt_trace::record(reinterpret_cast<uintptr_t>(p), n, false, SIMT_TRACE_PC); } \
  extern "C" void __tsan_write##n(void* p) { simt_trace::record(reinterpret_cast<uintptr_t>(p), n, true, SIMT_TRACE_PC); } \
  extern "C" void __tsan_unaligned_read##n(void* p) {                                                    \
    simt_trace::record(reinterpret_cast<uintptr_t>(p), n, false, SIMT_TRACE_PC);                          \
  }                                                                                                       \
  extern "C" void __tsan_unaligned_write##n(void* p) {                                                   \
    simt_trace::record(reinterpret_cast<uintptr_t>(p), n, true, SIMT_TRACE_PC);                           \
  }
SIMT_TRACE_ACCESS(1)
SIMT_TRACE_ACCESS(2)
SIMT_TRACE_ACCESS(4)
SIMT_TRACE_ACCESS(8)
SIMT_TRACE_ACCESS(16)
extern "C" void __tsan_read_range(void* p, size_t n) {
  simt_trace::record(reinterpret_cast<uintptr_t>(p), n, false, SIMT_TRACE_PC);
}
extern "C" void __tsan_write_range(void* p, size_t n) {
  simt_trace::record(reinterpret_cast<uintptr_t>(p), n, true, SIMT_TRACE_PC);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

// Atomics: done here (sequentially consistent), recorded as a read and a write of the location.
#define SIMT_TRACE_ATOMICS(bits, T)                                                                       \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) {                                    \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), false, SIMT_TRACE_PC);                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                          \
  }                                                                                                       \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                                 \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), true, SIMT_TRACE_PC);                  \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                       \
  SIMT_TRACE_RMW(bits, T, exchange, __atomic_exchange_n)                                                  \
  SIMT_TRACE_RMW(bits, T, fetch_add, __atomic_fetch_add)                                                  \
  SIMT_TRACE_RMW(bits, T, fetch_sub, __atomic_fetch_sub)                                                  \
  SIMT_TRACE_RMW(bits, T, fetch_and, __atomic_fetch_and)                                                  \
  SIMT_TRACE_RMW(bits, T, fetch_or, __atomic_fetch_or)                                                    \
  SIMT_TRACE_RMW(bits, T, fetch_xor, __atomic_fetch_xor)                                                  \
  SIMT_TRACE_RMW(bits, T, fetch_nand, __atomic_fetch_nand)                                                \
  extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {     \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), false, SIMT_TRACE_PC);                 \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), true, SIMT_TRACE_PC);                  \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
  }                                                                                                       \
  extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {       \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), false, SIMT_TRACE_PC);                 \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), true, SIMT_TRACE_PC);                  \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                       \
  extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {           \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), false, SIMT_TRACE_PC);                 \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), true, SIMT_TRACE_PC);                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
    return c;                                                                                             \
  }
#define SIMT_TRACE_RMW(bits, T, name, builtin)                                                            \
  extern "C" T __tsan_atomic##bits##_##name(volatile T* a, T v, int) {                                   \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), false, SIMT_TRACE_PC);                 \
    simt_trace::record(reinterpret_cast<uintptr_t>(a), sizeof(T), true, SIMT_TRACE_PC);                  \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                                               \
  }
SIMT_TRACE_ATOMICS(8, uint8_t)
SIMT_TRACE_ATOMICS(16, uint16_t)
SIMT_TRACE_ATOMICS(32, uint32_t)
SIMT_TRACE_ATOMICS(64, uint64_t)
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
