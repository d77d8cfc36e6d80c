// The recorder of trace.h: the __asan_*_noabort functions that gcc's kernel-address
// instrumentation calls for every load and store of the csrc .cu files (this file itself is not
// instrumented). Only accesses made inside a kernel (a block of simt_cuda.h is running on this OS
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
                            static_cast<uint8_t>(size), static_cast<uint8_t>(store)});
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

// The instrumentation's entry points. Their return address is the access's call site.
#define SIMT_TRACE_ACCESS(n)                                                                              \
  extern "C" void __asan_load##n##_noabort(void* p) {                                                    \
    simt_trace::record(reinterpret_cast<uintptr_t>(p), n, false,                                          \
                       reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                         \
  }                                                                                                       \
  extern "C" void __asan_store##n##_noabort(void* p) {                                                   \
    simt_trace::record(reinterpret_cast<uintptr_t>(p), n, true,                                           \
                       reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                         \
  }
SIMT_TRACE_ACCESS(1)
SIMT_TRACE_ACCESS(2)
SIMT_TRACE_ACCESS(4)
SIMT_TRACE_ACCESS(8)
SIMT_TRACE_ACCESS(16)
extern "C" void __asan_loadN_noabort(void* p, size_t n) {
  simt_trace::record(reinterpret_cast<uintptr_t>(p), n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __asan_storeN_noabort(void* p, size_t n) {
  simt_trace::record(reinterpret_cast<uintptr_t>(p), n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
// Called by instrumented code before a noreturn call (nothing to do here).
extern "C" void __asan_handle_no_return() {}
