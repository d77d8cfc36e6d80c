// trace.h: the global-memory accesses of the CUDA kernels run by the SIMT lane (build.py's "trace"
// build). Each csrc .cu file is compiled there with
//   -fsanitize=thread --param tsan-instrument-func-entry-exit=0
// so that gcc turns every load, store and atomic of the kernels' code into a call of
// __tsan_{read,write}{1,2,4,8,16}(address) (or an atomic's), which trace.cpp (not instrumented)
// defines; no TSan runtime is linked. (AddressSanitizer's instrumentation, the other way to get the
// addresses, skips a store to an address the same block has just loaded: a read-modify-write would
// lose its write.) While a trace is on, an access made by a CUDA thread (a fiber of simt_cuda.h) that falls inside
// one of the traced buffers is recorded with its launch, block, thread, call site and occurrence
// (the how-many-th access of that thread at that site: lanes of a warp at one site and occurrence
// make one warp-level request). Accesses of the emulator itself, of the stack (the kernels'
// registers and parameters) and of shared memory fall outside the traced buffers and are dropped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace simt_trace {

// One recorded access (32 bytes; the layout Python reads: tests/simt/traffic.py EVENT_DTYPE).
struct Event {
  uint64_t address;
  uint64_t site;        // return address of the instrumentation call, relative to the module's base
  uint32_t launch;      // index of the launch since clear_launches()
  uint32_t block;       // linear block index
  uint32_t occurrence;  // the thread's how-many-th access at this site in this launch
  uint16_t thread;      // linear thread index in the block
  uint8_t size;         // bytes
  uint8_t store;        // 1 for a store
};
static_assert(sizeof(Event) == 32, "Event is read by numpy with a fixed layout");

// Starts recording the accesses inside [address, address + bytes) of each buffer.
void begin(const std::vector<std::pair<uintptr_t, size_t>>& buffers);
// Stops recording; returns the events as raw bytes (Event after Event).
std::string end();
// The events recorded so far are dropped (the next launches start a fresh count).
void clear();

}  // namespace simt_trace
