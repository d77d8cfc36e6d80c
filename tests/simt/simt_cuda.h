// simt_cuda.h: runs the project's CUDA kernels on the CPU.
//
// build.py compiles a .cu file as C++ with this header force-included (-include simt_cuda.h) and
// -DFUSEDLOSS_SIMT, so the kernels' own code runs, unmodified, under gcc's AddressSanitizer,
// UndefinedBehaviorSanitizer or ThreadSanitizer. The .cu files launch through cuda::launch and
// declare shared arrays with FL_SHARED (csrc/common/cuda_helpers.cuh); both land here.
//
// Execution: a block runs on one OS thread, each of its CUDA threads a fiber (its own stack) that
// runs until it waits at a barrier or a warp collective, or exits; then the next ready one runs.
// SIMT_BLOCKS_IN_FLIGHT blocks (default 2) run at once on their own OS threads, in a shuffled
// order (set_seed). ThreadSanitizer sees every fiber as a thread, with happens-before only where
// CUDA puts it: barriers and warp collectives among their threads, the kernels' atomics and fences,
// and the end of a launch (and, as a cost of reusing stacks, between blocks run one after the other
// on the same OS thread). Blocks in flight together are ordered by nothing but the kernel's code.
//
// What runs like a GPU:
//   * __syncthreads is a barrier of the block's live threads; warp shuffles, votes and __syncwarp
//     exchange values among the lanes in their mask;
//   * shared arrays are per block, on the heap (ASan sees overflows; UBSan an index past a bound),
//     filled with 0xFF bytes (NaN floats, -1 integers, invalid bools for UBSan) so a read before a
//     write shows; at most 48 KiB of them per block, as statically declared shared memory;
//   * atomics are relaxed, as CUDA's are, and ordered by __threadfence; under ThreadSanitizer the
//     fences are modelled (fence() below) so that a last-block reduction that publishes or reads
//     its partials without them is a data race;
//   * device d (cudaSetDevice) has d + 1 SMs, so the kernels' grid sizes (and whether their
//     grid-stride loops iterate) follow set_sm_count; the default device has 2.
// What aborts with a message naming the source line:
//   * a divergent __syncthreads: threads of one phase at different call sites, a thread that exits
//     while others wait, or a block whose waiting threads no thread can release (a deadlock);
//   * a warp collective whose caller is outside its mask, whose mask names lanes that do not exist
//     or have exited, whose lanes meet at different call sites or with different masks, or that
//     reads a lane outside the mask;
//   * more than 48 KiB of shared arrays in a block.
// A bad launch configuration returns cudaErrorInvalidConfiguration, as on a GPU.
// Not modelled: weak memory ordering outside TSan builds (x86 is strongly ordered), lanes in
// lockstep (warp-synchronous code without __syncwarp gets wrong values here, and TSan reports it),
// spin-waiting on another thread of the same block (it never yields), launch bounds, dynamic shared
// memory, streams (a launch runs to completion before it returns), and nvcc's contraction of
// a*b+c into FMAs (results may differ from a GPU's in the last bits).
#pragma once

// AddressSanitizer and ThreadSanitizer proper (build.py's "asan" and "tsan" builds). The "trace"
// build defines SIMT_TRACE and instruments the kernels with -fsanitize=thread, which defines
// __SANITIZE_THREAD__ but links no TSan runtime: its calls go to trace.cpp instead.
#if defined(__SANITIZE_ADDRESS__) && !defined(SIMT_TRACE)
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif
#if defined(__SANITIZE_THREAD__) && !defined(SIMT_TRACE)
#define SIMT_TSAN 1
#else
#define SIMT_TSAN 0
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <ucontext.h>
#if SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if SIMT_TSAN
#include <sanitizer/tsan_interface.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ use_FL_SHARED_to_declare_shared_memory  // (csrc/common/cuda_helpers.cuh)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace simt {

[[noreturn]] inline void fail(const char* fmt, ...) {
  static std::mutex m;
  std::lock_guard<std::mutex> g(m);
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "simt: error [block (%u,%u,%u) thread (%u,%u,%u)]: ", blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// ---- settings of the emulated device (host side) -----------------------------------------------
struct Settings {
  uint64_t seed = static_cast<uint64_t>(env_int("SIMT_SEED", 1));        // block order
  int blocks_in_flight = std::max(1, env_int("SIMT_BLOCKS_IN_FLIGHT", 2));
  int device = std::max(0, env_int("SIMT_SM_COUNT", 2) - 1);             // device d has d + 1 SMs
  bool dry_run = false;  // launches are recorded but not run (their configuration at any size)
};
inline Settings& settings() {
  static Settings s;
  return s;
}
// Block order of the following launches: a fresh permutation per launch, drawn from this seed.
inline std::mt19937_64& block_order_rng() {
  static std::mt19937_64 rng(settings().seed);
  return rng;
}
inline void set_seed(uint64_t seed) {
  settings().seed = seed;
  block_order_rng().seed(seed);
}
inline void set_blocks_in_flight(int n) { settings().blocks_in_flight = std::max(1, n); }
// The kernels cache the SM count per device (cuda::sm_count), so a new count is a new device.
inline void set_sm_count(int sms) { settings().device = std::max(1, sms) - 1; }
inline void set_dry_run(bool dry) { settings().dry_run = dry; }

// Every launch's configuration since the last clear_launches(), for tests of what a case exercises.
struct LaunchRecord {
  dim3 grid, block;
  const void* kernel = nullptr;   // the kernel function (tests/simt/traffic.py names it from the debug info)
  const char* library = nullptr;  // or a library call standing in for its kernels (tests/simt/cub) ...
  uint64_t keys = 0;              // ... of this many keys
  int key_bytes = 0;              // ... of this size
};
inline std::vector<LaunchRecord>& launches() {
  static std::vector<LaunchRecord> v;
  return v;
}
inline void clear_launches() { launches().clear(); }

// ---- sanitizer annotations ----------------------------------------------------------------------
// The CUDA threads of a block are fibers of one OS thread (below). TSan sees each fiber as a
// thread, with happens-before only where these annotations (barriers, warp collectives, the end
// of a block) or the kernels' own atomics put it; ASan is told which stack is live.
inline void sync_release(const void* key) {
#if SIMT_TSAN
  __tsan_release(const_cast<void*>(key));
#else
  (void)key;
#endif
}
inline void sync_acquire(const void* key) {
#if SIMT_TSAN
  __tsan_acquire(const_cast<void*>(key));
#else
  (void)key;
#endif
}

// The emulator's own bookkeeping (the block's queues, its barrier and warp state, the built-in
// variables) is shared by every fiber of a block without happens-before: TSan ignores the memory
// accesses of the code inside a RuntimeSection, and sees the kernels' own.
#if SIMT_TSAN
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
struct RuntimeSection {
  RuntimeSection() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~RuntimeSection() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
};
#else
struct RuntimeSection {};
#endif

// glibc's swapcontext itself: ASan's interceptor only warns that it cannot follow stack switches,
// which the fiber switches below announce to it instead.
__attribute__((no_sanitize("thread"))) inline int swap_context(ucontext_t* from, const ucontext_t* to) {
  using Swap = int (*)(ucontext_t*, const ucontext_t*);
  static const Swap real = [] {
    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    void* f = libc ? dlsym(libc, "swapcontext") : nullptr;
    return f ? reinterpret_cast<Swap>(f) : &swapcontext;
  }();
  return real(from, to);
}

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0); }
  bool operator!=(const Site& o) const { return !(*this == o); }
};

// ---- a block: its CUDA threads as fibers, its barrier, its warps, its shared memory -------------
// One OS thread runs a block: each CUDA thread is a fiber (its own stack and ucontext) that runs
// until it waits (a barrier, a warp collective) or exits; the next ready fiber runs then. So a
// barrier costs a few context switches, not a trip through the OS scheduler, and a kernel that
// can never complete (a divergent barrier, a collective a lane never joins) is found at once.
constexpr size_t kFiberStack = 256 * 1024;

struct Fiber {
  ucontext_t context{};
  char* stack = nullptr;
  void* tsan = nullptr;
  uint3 index{};
  int lane = 0, warp = 0;
  bool ready = true, done = false;
  bool fenced = false;  // has run a __threadfence (TSan builds: its atomics release)
  Site waiting_at;
  const char* waiting_for = nullptr;
};

class Block;
inline thread_local Block* current_block = nullptr;  // the block the calling OS thread runs

// __syncthreads: a barrier of the block's threads. Strict, as compute-sanitizer's synccheck: a
// thread that exits while another waits at (or later reaches) a barrier is an error, as is a
// phase whose threads come from different call sites.
struct BlockBarrier {
  int live, arrived = 0, exited = 0;
  uint64_t phase = 0;
  Site site;
  std::vector<int> waiting;
  char sync_keys[2];  // TSan: arrivals of a phase release to its key, departures acquire from it
};

// One warp's collectives (shuffles, votes, __syncwarp): the lanes of the mask meet, each leaves
// its value in a slot, and each reads the slot of its source lane.
struct Warp {
  uint32_t exists, live, arrived = 0, mask = 0, result_mask = 0;
  int readers = 0;  // lanes yet to read the last result (the next collective waits for them)
  uint64_t generation = 0;
  Site site;
  std::vector<int> waiting, draining;
  alignas(16) unsigned char slots[32][16];
  alignas(16) unsigned char result[32][16];
  char sync_keys[2];
};

constexpr size_t kMaxStaticShared = 48 * 1024;

// What the blocks run by one OS thread reuse: the fibers' stacks and their TSan contexts. TSan
// contexts are never destroyed: a destroyed one's id goes to a new fiber, whose accesses TSan then
// takes to follow the old one's (which hid races between blocks).
struct FiberPool {
  std::vector<char*> stacks;
  std::vector<void*> tsan;
};

class Block {
 public:
  Block(dim3 grid, dim3 block, dim3 index, const std::function<void()>& body, FiberPool& pool)
      : grid_(grid), dim_(block), index_(index), body_(body), fibers_(block.x * block.y * block.z) {
    RuntimeSection runtime;
    const int n = int(fibers_.size());
    barrier.live = n;
    for (int w = 0; w * 32 < n; ++w) {
      const int lanes = std::min(32, n - w * 32);
      warps.push_back(std::make_unique<Warp>());
      warps.back()->exists = warps.back()->live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    while (int(pool.stacks.size()) < n) pool.stacks.push_back(new char[kFiberStack]);
#if SIMT_TSAN
    while (int(pool.tsan.size()) < n) pool.tsan.push_back(__tsan_create_fiber(0));
#endif
    for (int tid = 0; tid < n; ++tid) {
      Fiber& f = fibers_[tid];
      f.index = uint3{unsigned(tid % block.x), unsigned((tid / block.x) % block.y), unsigned(tid / (block.x * block.y))};
      f.lane = tid % 32;
      f.warp = tid / 32;
      f.stack = pool.stacks[tid];
#if SIMT_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f.stack, kFiberStack);  // frames a fiber of an earlier block left
#endif
#if SIMT_TSAN
      f.tsan = pool.tsan[tid];
#endif
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kFiberStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &Block::fiber_main, 0);
      ready_.push_back(tid);
    }
  }
  ~Block() {
    RuntimeSection runtime;
    for (auto& kv : shared) std::free(kv.second);
  }

  // Runs every thread of the block to its end (on the calling OS thread).
  void run() {
    RuntimeSection runtime;
    blockIdx = index_;
    blockDim = dim_;
    gridDim = grid_;
    current_block = this;
#if SIMT_TSAN
    scheduler_tsan_ = __tsan_get_current_fiber();
#endif
    sync_release(&start_key_);  // what this OS thread has seen happens before the block's threads start
    switch_to(&scheduler_, next_ready());
    // Back here when no fiber is ready: all done, or a deadlock.
    current_block = nullptr;
    for (const Fiber& f : fibers_)
      if (!f.done) {
        threadIdx = f.index;
        fail("the block can never finish: this thread waits at %s at %s:%d, and no thread of the block can run "
             "(a barrier or warp collective some threads never reach)", f.waiting_for, f.waiting_at.file,
             f.waiting_at.line);
      }
    sync_acquire(&end_key_);  // the block's writes happen before what this OS thread runs next
  }

  Fiber& self() { return fibers_[current_]; }

  // The calling fiber waits (at `what`, `site`) until wake() makes it ready again.
  void suspend(const char* what, Site site) {
    Fiber& me = self();
    me.ready = false;
    me.waiting_for = what;
    me.waiting_at = site;
    const int from = current_;
    switch_to(&fibers_[from].context, next_ready());
    me.waiting_for = nullptr;
  }
  void wake(int tid) {
    if (!fibers_[tid].ready) {
      fibers_[tid].ready = true;
      ready_.push_back(tid);
    }
  }

  BlockBarrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::map<const void*, void*> shared;  // FL_SHARED declaration -> this block's copy
  size_t shared_bytes = 0;
  std::vector<const void*> atomics;       // locations the block's atomics have touched (TSan builds)

 private:
  int next_ready() {
    if (ready_.empty()) return -1;
    const int tid = ready_.front();
    ready_.pop_front();
    return tid;
  }

  // Switch from the context saved in `from` to fiber `to` (-1: back to run()).
  void switch_to(ucontext_t* from, int to) {
    current_ = to;
    if (to >= 0) threadIdx = fibers_[to].index;
    if (to >= 0) transfer(from, &fibers_[to].context, fibers_[to].stack, kFiberStack, fibers_[to].tsan);
    else transfer(from, &scheduler_, scheduler_stack_, scheduler_stack_size_, scheduler_tsan_);
  }

  // The switch itself, announced to the sanitizers. Not instrumented by TSan: once TSan has moved to
  // the next fiber, every access would be taken for that fiber's.
  __attribute__((no_sanitize("thread"))) static void transfer(ucontext_t* from, const ucontext_t* to,
                                                               const void* stack, size_t stack_size, void* tsan) {
    (void)stack, (void)stack_size, (void)tsan;
#if SIMT_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, stack, stack_size);
#endif
#if SIMT_TSAN
    __tsan_switch_to_fiber(tsan, __tsan_switch_to_fiber_no_sync);
#endif
    swap_context(from, to);
#if SIMT_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  }

  // Not instrumented by TSan: a fiber leaves it by switching away, never by returning, and the TSan
  // context goes on to the next block's fiber (an instrumented frame here would never be popped).
  __attribute__((no_sanitize("thread"))) static void fiber_main() {
    Block* b = current_block;
    sync_acquire(&b->start_key_);
#if SIMT_ASAN
    if (!b->scheduler_stack_)  // the first switch into a fiber tells which stack the OS thread's is
      __sanitizer_finish_switch_fiber(nullptr, &b->scheduler_stack_, &b->scheduler_stack_size_);
    else
      __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    b->body_();
    b->exit_current();
  }

  void exit_current();  // below: the barrier and warp checks of an exiting thread

  dim3 grid_, dim_, index_;
  const std::function<void()>& body_;
  std::vector<Fiber> fibers_;
  std::deque<int> ready_;
  int current_ = -1;
  ucontext_t scheduler_{};
  const void* scheduler_stack_ = nullptr;
  size_t scheduler_stack_size_ = 0;
  void* scheduler_tsan_ = nullptr;
  char start_key_ = 0, end_key_ = 0;
};

inline Block& block(const char* what) {
  if (!current_block) fail("%s called outside a kernel", what);
  return *current_block;
}

__attribute__((no_sanitize("thread"))) inline void Block::exit_current() {
  ucontext_t* next;
  const void* next_stack;
  size_t next_stack_size;
  void* next_tsan;
  {
    RuntimeSection runtime;
    Fiber& me = self();
    Warp& w = *warps[me.warp];
    w.live &= ~(1u << me.lane);
    if (w.arrived && (w.mask & (1u << me.lane)))
      fail("lane %d exited while lanes 0x%08x wait for it in a warp collective at %s:%d (mask 0x%08x)", me.lane,
           w.arrived, w.site.file, w.site.line, w.mask);
    if (barrier.arrived > 0)
      fail("thread exited while %d thread(s) wait at __syncthreads() %s:%d (divergent barrier)", barrier.arrived,
           barrier.site.file, barrier.site.line);
    ++barrier.exited;
    me.done = true;
    sync_release(&end_key_);
    const int to = next_ready();
    current_ = to;
    if (to >= 0) threadIdx = fibers_[to].index;
    next = to >= 0 ? &fibers_[to].context : &scheduler_;
    next_stack = to >= 0 ? fibers_[to].stack : scheduler_stack_;
    next_stack_size = to >= 0 ? kFiberStack : scheduler_stack_size_;
    next_tsan = to >= 0 ? fibers_[to].tsan : scheduler_tsan_;
  }
  (void)next_stack, (void)next_stack_size, (void)next_tsan;
#if SIMT_ASAN  // leaving this stack for good: no fake stack to keep
  __sanitizer_start_switch_fiber(nullptr, next_stack, next_stack_size);
#endif
#if SIMT_TSAN
  __tsan_switch_to_fiber(next_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  setcontext(next);
}

// The block's copy of the shared variable declared where `key` (a static of the declaration) lives.
template <typename T>
T& shared(const void* key, Site s) {
  static_assert(std::is_trivially_default_constructible_v<T>, "shared variables have no constructors");
  RuntimeSection runtime;
  Block& b = block("FL_SHARED");
  void*& p = b.shared[key];
  if (!p) {
    b.shared_bytes += sizeof(T);
    if (b.shared_bytes > kMaxStaticShared)
      fail("%s:%d: the block's shared arrays take %zu bytes, over the %zu of static shared memory", s.file, s.line,
           b.shared_bytes, kMaxStaticShared);
    p = std::malloc(sizeof(T));
    std::memset(p, 0xFF, sizeof(T));
  }
  return *static_cast<T*>(p);
}

inline void syncthreads(Site s) {
  RuntimeSection runtime;
  Block& b = block("__syncthreads");
  Fiber& me = b.self();
  Warp& w = *b.warps[me.warp];
  if (w.arrived && (w.mask & (1u << me.lane)))
    fail("lane %d reached __syncthreads() at %s:%d while lanes 0x%08x wait for it in a warp collective at %s:%d "
         "(mask 0x%08x): divergent warp collective", me.lane, s.file, s.line, w.arrived, w.site.file, w.site.line,
         w.mask);
  BlockBarrier& bar = b.barrier;
  if (bar.exited > 0)
    fail("__syncthreads() at %s:%d reached after %d thread(s) of the block exited (divergent barrier)", s.file,
         s.line, bar.exited);
  if (bar.arrived == 0) bar.site = s;
  else if (bar.site != s)
    fail("divergent __syncthreads(): this thread at %s:%d, %d other thread(s) waiting at %s:%d", s.file, s.line,
         bar.arrived, bar.site.file, bar.site.line);
  const char* key = &bar.sync_keys[bar.phase % 2];
  sync_release(key);
  if (++bar.arrived == bar.live) {
    bar.arrived = 0;
    ++bar.phase;
    for (int tid : bar.waiting) b.wake(tid);
    bar.waiting.clear();
  } else {
    bar.waiting.push_back(me.warp * 32 + me.lane);
    b.suspend("__syncthreads()", s);
  }
  sync_acquire(key);
}

// ---- warp collectives -------------------------------------------------------------------------
// Every lane in mask calls it with its value; read(slots, mask) sees every lane's value.
template <typename Read>
void collective(uint32_t mask, Site s, const void* value, size_t bytes, const char* what, Read&& read) {
  RuntimeSection runtime;
  Block& b = block(what);
  Fiber& me = b.self();
  Warp& w = *b.warps[me.warp];
  const int lane = me.lane, tid = me.warp * 32 + me.lane;
  const uint32_t bit = 1u << lane;
  if (!(mask & bit)) fail("%s at %s:%d: calling lane %d is not in mask 0x%08x", what, s.file, s.line, lane, mask);
  if (mask & ~w.exists)
    fail("%s at %s:%d: mask 0x%08x names lanes that do not exist in this warp (existing 0x%08x)", what, s.file,
         s.line, mask, w.exists);
  while (w.readers > 0) {  // lanes still reading the previous collective's result
    w.draining.push_back(tid);
    b.suspend(what, s);
  }
  if (mask & ~w.live)
    fail("%s at %s:%d: mask 0x%08x names lanes that have exited (live 0x%08x)", what, s.file, s.line, mask, w.live);
  if (w.arrived == 0) {
    w.mask = mask;
    w.site = s;
  } else if (w.mask != mask || w.site != s) {
    fail("divergent warp collective: lane %d at %s:%d with mask 0x%08x, other lanes at %s:%d with mask 0x%08x", lane,
         s.file, s.line, mask, w.site.file, w.site.line, w.mask);
  }
  std::memcpy(w.slots[lane], value, bytes);
  w.arrived |= bit;
  const char* key = &w.sync_keys[w.generation % 2];
  sync_release(key);
  if (w.arrived == w.mask) {
    std::memcpy(w.result, w.slots, sizeof(w.slots));
    w.result_mask = w.mask;
    w.arrived = 0;
    w.readers = __builtin_popcount(w.mask);
    ++w.generation;
    for (int t : w.waiting) b.wake(t);
    w.waiting.clear();
  } else {
    w.waiting.push_back(tid);
    b.suspend(what, s);
  }
  sync_acquire(key);
  read(w.result, w.result_mask);
  if (--w.readers == 0) {
    for (int t : w.draining) b.wake(t);
    w.draining.clear();
  }
}

template <typename T>
T shuffle(Site s, const char* what, uint32_t mask, T v, int width, int (*source)(int, int, int), int arg) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a type over 16 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("%s at %s:%d: width %d is not a power of 2 in [1, 32]", what, s.file, s.line, width);
  int lane;
  {
    RuntimeSection runtime;
    lane = block(what).self().lane;
  }
  const int src = source(lane, arg, width);
  T out = v;
  collective(mask, s, &v, sizeof(T), what, [&](auto slots, uint32_t m) {
    if (src == lane) return;
    if (!(m & (1u << src)))
      fail("%s at %s:%d: lane %d reads lane %d, which is not in mask 0x%08x", what, s.file, s.line, lane, src, m);
    std::memcpy(&out, slots[src], sizeof(T));
  });
  return out;
}
// Source lanes of __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync within groups of width.
inline int source_idx(int lane, int src, int w) { return (lane / w) * w + (((src % w) + w) % w); }
inline int source_up(int lane, int d, int w) { return (lane % w) - d < 0 ? lane : lane - d; }
inline int source_down(int lane, int d, int w) { return (lane % w) + d >= w ? lane : lane + d; }
inline int source_xor(int lane, int m, int w) {
  const int s = lane ^ m;  // a lane may read earlier groups of `width` lanes, never later ones
  return (s >= 0 && s < (lane / w + 1) * w) ? s : lane;
}
inline int width_or(int fallback) { return fallback; }
inline int width_or(int, int width) { return width; }

inline uint32_t ballot(Site s, uint32_t mask, int pred) {
  uint32_t out = 0;
  const int p = pred != 0;
  collective(mask, s, &p, sizeof p, "__ballot_sync", [&](auto slots, uint32_t m) {
    for (int l = 0; l < 32; ++l)
      if (m & (1u << l)) {
        int q;
        std::memcpy(&q, slots[l], sizeof q);
        if (q) out |= 1u << l;
      }
  });
  return out;
}
inline void syncwarp(Site s, uint32_t mask = 0xffffffffu) {
  const char c = 0;
  collective(mask, s, &c, 1, "__syncwarp", [](auto, uint32_t) {});
}

// ---- launches -----------------------------------------------------------------------------------
// The fibers of the r-th block in flight, kept for the next launches (never freed).
inline FiberPool& fiber_pool(size_t r) {
  static std::mutex m;
  static auto* pools = new std::deque<FiberPool>();
  std::lock_guard<std::mutex> lk(m);
  while (pools->size() <= r) pools->emplace_back();
  return (*pools)[r];
}

inline void run_grid(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
  std::shuffle(order.begin(), order.end(), block_order_rng());
  const size_t in_flight = std::min<size_t>(settings().blocks_in_flight, order.size());
  // Blocks in flight run concurrently, each on its own OS thread, which takes every in_flight-th
  // block of the order: however the threads are scheduled, blocks of different threads are
  // ordered by nothing (a work queue would order them through its counter, or let one thread
  // take every block when the other starts late).
  std::vector<std::thread> runners;
  for (size_t r = 0; r < in_flight; ++r)
    runners.emplace_back([&, r] {
      FiberPool& pool = fiber_pool(r);
      for (size_t i = r; i < order.size(); i += in_flight) Block(grid, block_dim, order[i], body, pool).run();
    });
  for (auto& t : runners) t.join();
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

// kernel<<<grid, block, 0, stream>>>(args...), run to completion before it returns.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return last_error() = cudaErrorInvalidConfiguration;
  launches().push_back({grid, block, reinterpret_cast<const void*>(kernel)});
  if (settings().dry_run) return cudaSuccess;
  // The parameters are copied once, at the launch, as on a GPU; each thread calls with copies.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(grid, block, [&] { std::apply(kernel, params); });
  return cudaSuccess;
}

// Memory ordering. CUDA's atomics are relaxed: a __threadfence orders a thread's writes before its
// later atomics, and its reads after its earlier ones. TSan models no standalone fences, so under
// TSan a fence makes the thread's later atomic operations releases (of everything the thread has
// seen), and acquires what was released to every location the block has operated on atomically
// so far. A last-block reduction thus needs both its fences: one before the ticket in every block
// (else the partials are published unordered), one after it in the last block (else they are read
// unordered), or TSan reports a data race on the partials. Elsewhere a fence is a real one.
inline void fence() {
#if SIMT_TSAN
  RuntimeSection runtime;
  if (!current_block) return;
  current_block->self().fenced = true;
  for (const void* location : current_block->atomics) sync_acquire(location);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}
inline void before_atomic(const void* location) {
#if SIMT_TSAN
  RuntimeSection runtime;
  if (!current_block) return;
  if (current_block->self().fenced) sync_release(location);
  auto& seen = current_block->atomics;
  if (std::find(seen.begin(), seen.end(), location) == seen.end()) seen.push_back(location);
#else
  (void)location;
#endif
}

}  // namespace simt

// ---- device functions ---------------------------------------------------------------------------
#define SIMT_SITE ::simt::Site{__FILE__, __LINE__}
#define SIMT_SHARED(type, name, ...)        \
  static char simt_key_##name; \
  auto& name = ::simt::shared<type __VA_ARGS__>(&simt_key_##name, SIMT_SITE)

#define __syncthreads() ::simt::syncthreads(SIMT_SITE)
#define __syncwarp(...) ::simt::syncwarp(SIMT_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) \
  ::simt::shuffle(SIMT_SITE, "__shfl_sync", mask, v, ::simt::width_or(32 __VA_OPT__(, ) __VA_ARGS__), ::simt::source_idx, src)
#define __shfl_up_sync(mask, v, d, ...) \
  ::simt::shuffle(SIMT_SITE, "__shfl_up_sync", mask, v, ::simt::width_or(32 __VA_OPT__(, ) __VA_ARGS__), ::simt::source_up, d)
#define __shfl_down_sync(mask, v, d, ...) \
  ::simt::shuffle(SIMT_SITE, "__shfl_down_sync", mask, v, ::simt::width_or(32 __VA_OPT__(, ) __VA_ARGS__), ::simt::source_down, d)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::simt::shuffle(SIMT_SITE, "__shfl_xor_sync", mask, v, ::simt::width_or(32 __VA_OPT__(, ) __VA_ARGS__), ::simt::source_xor, m)
#define __ballot_sync(mask, p) ::simt::ballot(SIMT_SITE, mask, p)
#define __any_sync(mask, p) (::simt::ballot(SIMT_SITE, mask, p) != 0u)
#define __all_sync(mask, p) (::simt::ballot(SIMT_SITE, mask, p) == (mask))

inline void __threadfence() { ::simt::fence(); }
inline void __threadfence_block() { ::simt::fence(); }
inline void __threadfence_system() { ::simt::fence(); }

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }

// Atomics: relaxed, as CUDA's (ordering comes from __threadfence).
template <typename T> inline std::atomic_ref<T> simt_atomic(T* p) {
  ::simt::before_atomic(p);
  return std::atomic_ref<T>(*p);
}
constexpr auto simt_relaxed = std::memory_order_relaxed;
template <typename T> inline T atomicAdd(T* p, std::type_identity_t<T> v) { return simt_atomic(p).fetch_add(v, simt_relaxed); }
template <typename T> inline T atomicSub(T* p, std::type_identity_t<T> v) { return simt_atomic(p).fetch_sub(v, simt_relaxed); }
template <typename T> inline T atomicExch(T* p, std::type_identity_t<T> v) { return simt_atomic(p).exchange(v, simt_relaxed); }
template <typename T> inline T atomicAnd(T* p, std::type_identity_t<T> v) { return simt_atomic(p).fetch_and(v, simt_relaxed); }
template <typename T> inline T atomicOr(T* p, std::type_identity_t<T> v) { return simt_atomic(p).fetch_or(v, simt_relaxed); }
template <typename T> inline T atomicXor(T* p, std::type_identity_t<T> v) { return simt_atomic(p).fetch_xor(v, simt_relaxed); }
template <typename T> inline T atomicCAS(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> v) {
  simt_atomic(p).compare_exchange_strong(expected, v, simt_relaxed);
  return expected;
}
template <typename T, typename F> inline T simt_atomic_update(T* p, F f) {
  auto a = simt_atomic(p);
  T old = a.load(simt_relaxed);
  while (!a.compare_exchange_weak(old, f(old), simt_relaxed)) {}
  return old;
}
template <typename T> inline T atomicMax(T* p, std::type_identity_t<T> v) {
  return simt_atomic_update(p, [&](T o) { return o < v ? v : o; });
}
template <typename T> inline T atomicMin(T* p, std::type_identity_t<T> v) {
  return simt_atomic_update(p, [&](T o) { return v < o ? v : o; });
}
inline unsigned atomicInc(unsigned* p, unsigned v) {
  return simt_atomic_update(p, [&](unsigned o) { return o >= v ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned v) {
  return simt_atomic_update(p, [&](unsigned o) { return (o == 0 || o > v) ? v : o - 1u; });
}

// CUDA's host+device min and max, and the device math functions libstdc++ declares only in std.
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// ---- host runtime: one device per SM count, everything synchronous ------------------------------
extern "C" inline cudaError_t cudaGetLastError(void) {
  const cudaError_t e = simt::last_error();
  simt::last_error() = cudaSuccess;
  return e;
}
extern "C" inline cudaError_t cudaPeekAtLastError(void) { return simt::last_error(); }
extern "C" inline cudaError_t cudaGetDevice(int* device) {
  *device = simt::settings().device;
  return cudaSuccess;
}
extern "C" inline cudaError_t cudaSetDevice(int device) {
  if (device < 0) return cudaErrorInvalidDevice;
  simt::settings().device = device;
  return cudaSuccess;
}
extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = device + 1; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
extern "C" inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
extern "C" inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
extern "C" inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "error";
  }
}
