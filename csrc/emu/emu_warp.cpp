// Warp scheduler of the CUDA host emulation. The 32 lanes of a warp are fibers (ucontext) on the
// calling thread: the scheduler resumes each lane in turn, a lane runs until it meets the others at
// a shuffle (or at its end) and switches back. Once all 32 have arrived the meeting is checked and
// every lane gets its result, so a shuffle that real hardware would execute with missing lanes, a
// partial mask or lanes at different call sites aborts with the sites named. Warps run one after
// another: enough for kernels whose warps share nothing but atomics.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#include "emu_cuda.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {
namespace {

constexpr int kLanes = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = size_t(64) << 10;

[[noreturn]] void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fputs("CUDA emulation: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::abort();
}

struct Lane {
  ucontext_t context;
  void* stack = nullptr;
  void* asan_fake_stack = nullptr;  // AddressSanitizer's record of this fiber's stack
  Arrival arrival;
  uint64_t result = 0;
};

struct Warp {
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
  Lane lanes[kLanes];
  int current = 0;
  unsigned index_in_block = 0;
  const std::function<void()>* body = nullptr;
};

// One warp at a time, for the life of the process (its lane stacks are reused). Below each stack
// lies an inaccessible page, so that a lane overflowing its stack crashes instead of corrupting.
Warp& the_warp() {
  static Warp* warp = [] {
    auto* w = new Warp;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (Lane& lane : w->lanes) {
      void* p = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) fail("cannot map a lane stack");
      lane.stack = static_cast<char*>(p) + page;
    }
    return w;
  }();
  return *warp;
}

unsigned grid_override = 0;
cudaError_t last_error = cudaSuccess;

// AddressSanitizer must be told about every switch between stacks, or it mistakes fiber frames for
// stack overflows. fake_stack == nullptr on the way out of a fiber that never comes back.
void start_switch(void** fake_stack, const void* stack, size_t bytes) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, stack, bytes);
#else
  (void)fake_stack, (void)stack, (void)bytes;
#endif
}

void finish_switch(void* fake_stack, const void** from_stack = nullptr, size_t* from_bytes = nullptr) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, from_stack, from_bytes);
#else
  (void)fake_stack, (void)from_stack, (void)from_bytes;
#endif
}

void resume(Warp& w, int lane) {
  w.current = lane;
  threadIdx = {w.index_in_block * kLanes + lane, 0, 0};
  start_switch(&w.scheduler_fake_stack, w.lanes[lane].stack, kStackBytes);
  swapcontext(&w.scheduler, &w.lanes[lane].context);
  finish_switch(w.scheduler_fake_stack);
}

// From a lane back to the scheduler; returns when the scheduler resumes this lane.
void yield(Warp& w, bool for_good) {
  Lane& lane = w.lanes[w.current];
  start_switch(for_good ? nullptr : &lane.asan_fake_stack, w.scheduler_stack, w.scheduler_stack_bytes);
  swapcontext(&lane.context, &w.scheduler);
  finish_switch(lane.asan_fake_stack);
}

void lane_main() {
  Warp& w = the_warp();
  finish_switch(nullptr, &w.scheduler_stack, &w.scheduler_stack_bytes);
  (*w.body)();
  w.lanes[w.current].arrival = {Op::kExit, kFullMask, 0, kLanes, 0, 0, std::source_location::current()};
  yield(w, true);
  fail("a lane was resumed after the end of its kernel");
}

const char* describe(const Arrival& a) {
  static char text[4][512];
  static int next = 0;
  char* out = text[next++ % 4];
  const char* what = a.op == Op::kExit      ? "the end of the kernel"
                     : a.op == Op::kShuffle ? "__shfl_sync"
                                            : "__shfl_xor_sync";
  std::snprintf(out, sizeof(text[0]), "%s at %s:%u", what, a.site.file_name(), static_cast<unsigned>(a.site.line()));
  return out;
}

bool same_place(const Arrival& a, const Arrival& b) {
  return a.op == b.op && a.site.line() == b.site.line() && a.site.column() == b.site.column() &&
         std::strcmp(a.site.file_name(), b.site.file_name()) == 0;
}

// All 32 lanes have arrived. Returns true when they all ended the kernel, else hands every lane its
// shuffle result.
bool settle(Warp& w) {
  const Arrival& first = w.lanes[0].arrival;
  for (int l = 1; l < kLanes; ++l) {
    if (!same_place(w.lanes[l].arrival, first)) {
      fail("divergent lanes in warp %u of block %u: lane 0 is at %s but lane %d at %s", w.index_in_block,
           blockIdx.x, describe(first), l, describe(w.lanes[l].arrival));
    }
  }
  if (first.op == Op::kExit) return true;
  ++stats().meetings;
  for (int l = 0; l < kLanes; ++l) {
    const Arrival& a = w.lanes[l].arrival;
    if (a.mask != kFullMask) {
      fail("lane %d calls %s with mask 0x%08x: only full-warp shuffles are valid here", l, describe(a), a.mask);
    }
    if (a.width != kLanes) fail("lane %d calls %s with width %d: only width 32 is emulated", l, describe(a), a.width);
    if (a.bytes != first.bytes) fail("lanes shuffle %u and %u bytes at %s", first.bytes, a.bytes, describe(a));
    const int src = a.op == Op::kShuffle ? a.lane_arg : l ^ a.lane_arg;
    // Hardware would wrap a source lane outside the warp; no kernel here means to rely on that.
    if (src < 0 || src >= kLanes) fail("lane %d reads lane %d in %s", l, src, describe(a));
    w.lanes[l].result = w.lanes[src].arrival.bits;
  }
  return false;
}

void run_warp(Warp& w) {
  for (Lane& lane : w.lanes) {
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack;
    lane.context.uc_stack.ss_size = kStackBytes;
    lane.context.uc_link = nullptr;
    makecontext(&lane.context, lane_main, 0);
  }
  do {
    for (int l = 0; l < kLanes; ++l) resume(w, l);
  } while (!settle(w));
}

template <typename V>
V* aligned_or_fail(V* address, const char* type) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(V) != 0) {
    fail("atomicAdd(%s*) at %p, which is not %zu-byte aligned (the GPU raises a misaligned address fault)", type,
         static_cast<void*>(address), alignof(V));
  }
  return address;
}

}  // namespace

uint64_t meet(const Arrival& arrival) {
  Warp& w = the_warp();
  w.lanes[w.current].arrival = arrival;
  yield(w, false);
  return w.lanes[w.current].result;
}

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      block.x * block.y * block.z > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % kLanes != 0 || shared_bytes != 0) {
    fail("only 1-D grids of 1-D blocks of whole warps, without dynamic shared memory, are emulated");
  }
  Warp& w = the_warp();
  gridDim = dim3(grid_override ? grid_override : grid.x);
  blockDim = block;
  w.body = &body;
  for (unsigned b = 0; b < gridDim.x; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned warp = 0; warp < block.x / kLanes; ++warp) {
      w.index_in_block = warp;
      run_warp(w);
    }
  }
}

void set_grid_override(unsigned blocks) { grid_override = blocks; }

Stats& stats() {
  static Stats s;
  return s;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error;
  emu::last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : err == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                                                 : "unknown error";
}

float atomicAdd(float* address, float v) {
  ++emu::stats().scalar_atomics;
  const float old = *address;
  *address = old + v;
  return old;
}

double atomicAdd(double* address, double v) {
  ++emu::stats().scalar_atomics;
  const double old = *address;
  *address = old + v;
  return old;
}

float2 atomicAdd(float2* address, float2 v) {
  float2* p = emu::aligned_or_fail(address, "float2");
  ++emu::stats().float2_atomics;
  const float2 old = *p;
  *p = {old.x + v.x, old.y + v.y};
  return old;
}

float4 atomicAdd(float4* address, float4 v) {
  float4* p = emu::aligned_or_fail(address, "float4");
  ++emu::stats().float4_atomics;
  const float4 old = *p;
  *p = {old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w};
  return old;
}
