// cuda_emu.h: run CUDA C++ kernels on the CPU, for kbit's tests of its CUDA backend.
//
// A generated translation unit includes this header, then a kernel file (.cu), then one
// KBIT_EMU_REGISTER(name) per extern "C" kernel; kbit_cuda.emulator builds it with g++
// into a shared library and launches kernels through the C API at the end of this file.
//
// Execution model. The blocks of a grid are taken, in order, by a few OS threads. Within
// a block every CUDA thread is a fiber with its own stack (a PROT_NONE guard page below
// it), and fibers switch only at synchronisation points: __syncthreads*, __syncwarp,
// warp shuffles and votes, atomicCAS/atomicExch. Between two such points a fiber runs
// alone, so the schedule (forward, reverse or random order of the fibers) decides which
// unsynchronised shared-memory accesses win: running a kernel under all three exposes
// most missing barriers. Warps never run in lockstep, as on Volta and later.
//
// Strict mode (the default) turns undefined behaviour that hardware often forgives into
// an error naming the block, the thread and the .cu line: a barrier reached at two
// different places, a barrier after some threads exited, a thread exiting while others
// wait, a warp intrinsic whose mask names exited lanes or that reads a lane outside it,
// lanes of one mask meeting in different intrinsics, and deadlock.
//
// Memory. Device pointers are host pointers. __shared__ variables are thread_local (one
// block at a time runs per OS thread); dynamic shared memory is a per-worker buffer,
// filled with 0xFF (NaN) before every block so reading it uninitialised shows.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#if defined(KBIT_EMU_UCONTEXT) || !defined(__x86_64__)
#include <ucontext.h>
#define KBIT_EMU_USE_UCONTEXT 1
#endif

// ------------------------------------------------------------------------ qualifiers
// The build scans the preprocessed source for kernels with KBIT_EMU_SCAN defined.
#ifdef KBIT_EMU_SCAN
#define __global__ kbit_emu_kernel_marker
#else
#define __global__
#endif
#define __device__
#define __host__
#define __constant__
#define __shared__ thread_local
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define warpSize 32
// Kernel files declare dynamic shared memory through this macro (plain C++ has no
// `extern __shared__ T name[]`); on the GPU the kernel file defines it itself.
#define KBIT_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::kbit_emu::current_worker()->dynamic_smem)

// ---------------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
#define KBIT_EMU_VEC2(T, N, ALIGN) \
  struct __attribute__((aligned(ALIGN))) N { T x, y; }; \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define KBIT_EMU_VEC4(T, N, ALIGN) \
  struct __attribute__((aligned(ALIGN))) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
KBIT_EMU_VEC2(float, float2, 8)
KBIT_EMU_VEC4(float, float4, 16)
KBIT_EMU_VEC2(int, int2, 8)
KBIT_EMU_VEC4(int, int4, 16)
KBIT_EMU_VEC2(unsigned, uint2, 8)
KBIT_EMU_VEC4(unsigned, uint4, 16)
KBIT_EMU_VEC4(unsigned char, uchar4, 4)
KBIT_EMU_VEC4(signed char, char4, 4)
KBIT_EMU_VEC2(unsigned short, ushort2, 4)
KBIT_EMU_VEC4(unsigned short, ushort4, 8)

namespace kbit_emu {

enum Schedule { FORWARD = 0, REVERSE = 1, RANDOM = 2 };

struct Config {
  int os_threads = 1;               // OS threads taking blocks
  int schedule = FORWARD;           // fiber order between synchronisation points
  unsigned seed = 1;                // of the random schedule
  size_t stack_bytes = 64 * 1024;   // per CUDA thread
  bool strict = true;               // report undefined behaviour (see the header comment)
  long long max_sweeps = 50000000;  // watchdog for spin loops that never finish
};
inline Config& config() { static Config c; return c; }

struct Kernel {
  std::string name;
  std::string signature;  // one code per parameter, e.g. "c8,p8,f4,i8" (see arg_code)
  void (*invoke)(void* const* args, void* fn);
  void* fn;
};
inline std::vector<Kernel>& kernels() { static std::vector<Kernel> k; return k; }

struct Fiber {
#ifdef KBIT_EMU_USE_UCONTEXT
  ucontext_t context;
#endif
  void* stack_pointer = nullptr;
  uint3 tid{};
  unsigned lane = 0, warp = 0;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // runnable again once *wait_on != wait_value
  uint64_t wait_value = 0;
};

enum WarpOp { OP_SHUFFLE = 1, OP_VOTE, OP_SYNCWARP };

// One warp-synchronous operation in flight, per distinct member mask. The buffer is
// double-buffered by generation: a lane released from generation g may still read it
// while lanes of generation g + 1 already deposit theirs.
struct WarpMeeting {
  uint32_t mask = 0, arrived = 0, released[2] = {0, 0};
  uint64_t generation = 0;
  int op = 0;
  uint64_t values[2][32];
};
struct Warp {
  uint32_t live = 0;
  int meetings_used = 0;
  WarpMeeting meetings[8];
};

struct Launch {
  const Kernel* kernel;
  void* const* args;
  dim3 grid, block;
  size_t dynamic_smem;
  std::atomic<long long> next_block{0};
  std::atomic<bool> failed{false};
  std::atomic_flag error_lock = ATOMIC_FLAG_INIT;
  std::string error;
};

struct Worker {
  Launch* launch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  std::vector<Warp> warps;
  char* stacks = nullptr;
  size_t stack_stride = 0;
  std::vector<unsigned char> dynamic_buffer;
  void* dynamic_smem = nullptr;
  uint3 block_id{};
  dim3 block_dim, grid_dim;
  unsigned threads = 0, live = 0, exited = 0;
  // The block barrier: who arrived, where, and the count/and/or accumulator.
  unsigned barrier_arrived = 0, barrier_count = 0, barrier_result = 0;
  uint64_t barrier_generation = 0;
  const char* barrier_file = "";
  int barrier_line = 0;
  bool aborted = false;
  void* scheduler_stack_pointer = nullptr;
#ifdef KBIT_EMU_USE_UCONTEXT
  ucontext_t scheduler_context;
#endif
  std::mt19937 rng;
};

inline thread_local Worker* tl_worker = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;
inline Worker* current_worker() { return tl_worker; }
inline Fiber* current_fiber() { return tl_fiber; }

// ------------------------------------------------------------------ context switching
#ifndef KBIT_EMU_USE_UCONTEXT
// Save the callee-saved registers on the current stack, store the stack pointer in
// *save, switch to `load` and restore the registers saved there. A fresh fiber's stack
// is prepared (prepare_fiber) so that this `ret`s into fiber_entry.
extern "C" void kbit_emu_switch(void** save, void* load);
__asm__(
    ".text\n.p2align 4\n.globl kbit_emu_switch\n.hidden kbit_emu_switch\n"
    ".type kbit_emu_switch,@function\nkbit_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size kbit_emu_switch, .-kbit_emu_switch\n");
#endif

inline void yield_to_scheduler(Worker* w, Fiber* f) {
#ifdef KBIT_EMU_USE_UCONTEXT
  swapcontext(&f->context, &w->scheduler_context);
#else
  kbit_emu_switch(&f->stack_pointer, w->scheduler_stack_pointer);
#endif
}
inline void resume(Worker* w, Fiber* f) {
  tl_fiber = f;
#ifdef KBIT_EMU_USE_UCONTEXT
  swapcontext(&w->scheduler_context, &f->context);
#else
  kbit_emu_switch(&w->scheduler_stack_pointer, f->stack_pointer);
#endif
  tl_fiber = nullptr;
}

// ---------------------------------------------------------------------------- errors
inline void record_error(Launch* L, const std::string& message) {
  while (L->error_lock.test_and_set()) {
  }
  if (L->error.empty()) L->error = message;
  L->error_lock.clear();
  L->failed = true;
}

// Report an error for the running thread and abandon its block (the fiber never resumes).
[[noreturn]] inline void fail(const char* format, ...) {
  char text[1024];
  va_list ap;
  va_start(ap, format);
  vsnprintf(text, sizeof text, format, ap);
  va_end(ap);
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  std::string message(text);
  if (f) {
    char where[160];
    snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", w->block_id.x, w->block_id.y,
             w->block_id.z, f->tid.x, f->tid.y, f->tid.z);
    message += where;
  }
  record_error(w->launch, message);
  w->aborted = true;
  if (f) {
    f->done = true;
    yield_to_scheduler(w, f);
  }
  abort();
}

inline void wait_for_change(Worker* w, Fiber* f, const uint64_t* counter) {
  f->wait_on = counter;
  f->wait_value = *counter;
  yield_to_scheduler(w, f);
}

// ---------------------------------------------------------------------- block barrier
inline void release_barrier(Worker* w) {
  w->barrier_arrived = 0;
  w->barrier_result = w->barrier_count;
  w->barrier_count = 0;
  ++w->barrier_generation;
}

inline unsigned block_barrier(const char* file, int line, unsigned contribution) {
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  if (config().strict) {
    if (w->exited)
      fail("__syncthreads at %s:%d after %u thread(s) of the block exited (a barrier in divergent code, "
           "such as after an early return)", file, line, w->exited);
    if (w->barrier_arrived && (w->barrier_line != line || strcmp(w->barrier_file, file) != 0))
      fail("divergent __syncthreads: %s:%d reached while %u thread(s) wait at %s:%d", file, line,
           w->barrier_arrived, w->barrier_file, w->barrier_line);
  }
  if (!w->barrier_arrived) {
    w->barrier_file = file;
    w->barrier_line = line;
  }
  w->barrier_count += contribution;
  if (++w->barrier_arrived == w->live) {
    release_barrier(w);
    return w->barrier_result;
  }
  wait_for_change(w, f, &w->barrier_generation);
  return w->barrier_result;
}

// ------------------------------------------------------------------ warp-level meeting
// The calling lane deposits 8 bytes and waits until every live lane of `mask` has; the
// result is that generation's values, and *present receives the lanes that took part.
inline const uint64_t* warp_meeting(unsigned mask, int op, uint64_t value, const char* what, uint32_t* present) {
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  Warp& warp = w->warps[f->warp];
  const uint32_t me = 1u << f->lane;
  if (!(mask & me)) fail("%s: the calling lane %u is not in mask 0x%08x", what, f->lane, mask);
  if ((mask & ~warp.live) && config().strict)
    fail("%s: mask 0x%08x names lanes that exited or do not exist (live lanes 0x%08x)", what, mask, warp.live);
  WarpMeeting* m = nullptr;
  for (int i = 0; i < warp.meetings_used; ++i)
    if (warp.meetings[i].mask == mask) m = &warp.meetings[i];
  if (!m) {
    if (warp.meetings_used == 8) fail("%s: more than 8 distinct masks used in one warp", what);
    m = &warp.meetings[warp.meetings_used++];
    *m = WarpMeeting();
    m->mask = mask;
  }
  if (!m->arrived)
    m->op = op;
  else if (m->op != op && config().strict)
    fail("%s: lanes of warp %u meet in different warp intrinsics with mask 0x%08x", what, f->warp, mask);
  const uint64_t generation = m->generation;
  m->values[generation & 1][f->lane] = value;
  m->arrived |= me;
  const uint32_t needed = mask & warp.live;
  if ((m->arrived & needed) == needed) {
    m->released[generation & 1] = m->arrived;
    m->arrived = 0;
    ++m->generation;
  } else {
    wait_for_change(w, f, &m->generation);
  }
  if (present) *present = m->released[generation & 1];
  return m->values[generation & 1];
}

[[noreturn]] inline void fiber_exit() {
  Worker* w = tl_worker;
  Fiber* f = tl_fiber;
  f->done = true;
  --w->live;
  ++w->exited;
  Warp& warp = w->warps[f->warp];
  warp.live &= ~(1u << f->lane);
  if (w->barrier_arrived) {
    if (config().strict)
      fail("thread exited while %u thread(s) wait at __syncthreads (%s:%d)", w->barrier_arrived, w->barrier_file,
           w->barrier_line);
    if (w->barrier_arrived == w->live) release_barrier(w);
  }
  for (int i = 0; i < warp.meetings_used; ++i) {
    WarpMeeting& m = warp.meetings[i];
    if (!m.arrived || !(m.mask & (1u << f->lane))) continue;
    if (config().strict)
      fail("thread exited while lanes 0x%08x of its warp wait in a warp intrinsic with mask 0x%08x", m.arrived,
           m.mask);
    const uint32_t needed = m.mask & warp.live;
    if ((m.arrived & needed) == needed) {
      m.released[m.generation & 1] = m.arrived;
      m.arrived = 0;
      ++m.generation;
    }
  }
  yield_to_scheduler(w, f);
  abort();  // never resumed
}

inline void fiber_entry() {
  Launch* L = tl_worker->launch;
  L->kernel->invoke(L->args, L->kernel->fn);
  fiber_exit();
}

// ------------------------------------------------------------------------ block runner
inline void prepare_fiber(Worker* w, Fiber& f, unsigned index) {
  char* low = w->stacks + (size_t)index * w->stack_stride + 4096;  // above the guard page
  const size_t size = w->stack_stride - 4096;
#ifdef KBIT_EMU_USE_UCONTEXT
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = low;
  f.context.uc_stack.ss_size = size;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_entry, 0);
#else
  void** sp = (void**)(((uintptr_t)(low + size)) & ~(uintptr_t)15);
  *--sp = nullptr;                    // fiber_entry's (never used) return address
  *--sp = (void*)&fiber_entry;        // where kbit_emu_switch's `ret` goes
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
  f.stack_pointer = sp;
#endif
}

inline std::string stuck_message(Worker* w, bool watchdog) {
  std::string message = watchdog ? "watchdog: the block did not finish (a spin loop that never ends?)"
                                 : "deadlock: every live thread of the block waits";
  char text[256];
  snprintf(text, sizeof text, " [block (%u,%u,%u)]; %u thread(s) at __syncthreads (%s:%d)", w->block_id.x,
           w->block_id.y, w->block_id.z, w->barrier_arrived, w->barrier_file, w->barrier_line);
  message += text;
  for (size_t i = 0; i < w->warps.size(); ++i)
    for (int j = 0; j < w->warps[i].meetings_used; ++j)
      if (w->warps[i].meetings[j].arrived) {
        snprintf(text, sizeof text, "; warp %zu: lanes 0x%08x wait in a warp intrinsic with mask 0x%08x", i,
                 w->warps[i].meetings[j].arrived, w->warps[i].meetings[j].mask);
        message += text;
      }
  return message;
}

inline void run_block(Worker* w, long long linear_block) {
  const dim3 g = w->launch->grid, b = w->launch->block;
  w->block_id = uint3{(unsigned)(linear_block % g.x), (unsigned)((linear_block / g.x) % g.y),
                      (unsigned)(linear_block / ((long long)g.x * g.y))};
  const unsigned n = w->threads;
  w->live = n;
  w->exited = 0;
  w->barrier_arrived = w->barrier_count = 0;
  for (unsigned i = 0; i < w->warps.size(); ++i) {
    const unsigned lanes = std::min(32u, n - 32 * i);
    w->warps[i].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    w->warps[i].meetings_used = 0;
  }
  if (w->launch->dynamic_smem) memset(w->dynamic_smem, 0xff, w->launch->dynamic_smem);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w->fibers[i];
    f.tid = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    f.lane = i & 31;
    f.warp = i >> 5;
    f.done = false;
    f.wait_on = nullptr;
    prepare_fiber(w, f, i);
    w->order[i] = config().schedule == REVERSE ? n - 1 - i : i;
  }
  long long sweeps = 0;
  while (w->live && !w->aborted) {
    if (config().schedule == RANDOM) std::shuffle(w->order.begin(), w->order.end(), w->rng);
    bool progressed = false;
    for (unsigned k = 0; k < n && !w->aborted; ++k) {
      Fiber& f = w->fibers[w->order[k]];
      if (f.done) continue;
      if (f.wait_on) {
        if (*f.wait_on == f.wait_value) continue;
        f.wait_on = nullptr;
      }
      resume(w, &f);
      progressed = true;
    }
    if (w->aborted) break;
    if (!progressed || ++sweeps > config().max_sweeps) {
      record_error(w->launch, stuck_message(w, progressed));
      w->aborted = true;
    }
  }
}

// Fiber stacks are mapped once per OS thread and kept: mapping them per launch would
// cost more than running a small kernel.
struct StackPool {
  char* base = nullptr;
  size_t stride = 0, count = 0;
  ~StackPool() {
    if (base) munmap(base, stride * count);
  }
  bool reserve(size_t want_stride, size_t want_count) {
    if (base && stride == want_stride && count >= want_count) return true;
    if (base) munmap(base, stride * count);
    base = nullptr;
    void* m = mmap(nullptr, want_stride * want_count, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    base = (char*)m;
    stride = want_stride;
    count = want_count;
    for (size_t i = 0; i < count; ++i) mprotect(base + i * stride, 4096, PROT_NONE);
    return true;
  }
};

inline void worker_main(Launch* L, int worker_index) {
  Worker w;
  w.launch = L;
  w.rng.seed(config().seed + 7919u * (unsigned)worker_index);
  w.block_dim = L->block;
  w.grid_dim = L->grid;
  w.threads = L->block.x * L->block.y * L->block.z;
  w.fibers.resize(w.threads);
  w.order.resize(w.threads);
  w.warps.resize((w.threads + 31) / 32);
  w.stack_stride = 4096 + ((config().stack_bytes + 4095) & ~(size_t)4095);
  static thread_local StackPool pool;
  if (!pool.reserve(w.stack_stride, w.threads)) {
    record_error(L, "mmap of the fiber stacks failed");
    return;
  }
  w.stacks = pool.base;
  w.dynamic_buffer.resize(L->dynamic_smem + 64);
  w.dynamic_smem = (void*)(((uintptr_t)w.dynamic_buffer.data() + 63) & ~(uintptr_t)63);
  Worker* saved = tl_worker;
  tl_worker = &w;
  const long long total = (long long)L->grid.x * L->grid.y * L->grid.z;
  while (!L->failed) {
    const long long b = L->next_block.fetch_add(1);
    if (b >= total) break;
    run_block(&w, b);
    if (w.aborted) break;
  }
  tl_worker = saved;
}

inline std::string launch(const Kernel* k, dim3 grid, dim3 block, size_t dynamic_smem, void* const* args) {
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (!threads || threads > 1024 || block.z > 64 || !grid.x || !grid.y || !grid.z || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u)
    return "cudaErrorInvalidConfiguration: invalid grid or block dimensions";
  if (dynamic_smem > 227 * 1024) return "cudaErrorInvalidValue: more than 227 KiB of dynamic shared memory";
  Launch L;
  L.kernel = k;
  L.args = args;
  L.grid = grid;
  L.block = block;
  L.dynamic_smem = dynamic_smem;
  const long long total = (long long)grid.x * grid.y * grid.z;
  const long long workers = std::max(1LL, std::min((long long)std::max(1, config().os_threads), total));
  std::vector<std::thread> others;  // the calling thread is worker 0 and keeps its stack pool
  for (long long i = 1; i < workers; ++i) others.emplace_back(worker_main, &L, (int)i);
  worker_main(&L, 0);
  for (auto& t : others) t.join();
  return L.failed ? L.error : std::string();
}

// ----------------------------------------------------------------------- registration
// Parameter codes: 'c' pointer to const, 'p' pointer, 'f' floating, 'i' signed integer,
// 'u' unsigned integer, 'b' bool, 's' anything else; then the size in bytes.
template <class T>
std::string arg_code() {
  using U = std::remove_cv_t<std::remove_reference_t<T>>;
  const char kind = std::is_pointer<U>::value ? (std::is_const<std::remove_pointer_t<U>>::value ? 'c' : 'p')
                    : std::is_same<U, bool>::value     ? 'b'
                    : std::is_floating_point<U>::value ? 'f'
                    : std::is_integral<U>::value       ? (std::is_signed<U>::value ? 'i' : 'u')
                                                       : 's';
  return kind + std::to_string(sizeof(U));
}

template <class... A>
struct Invoker {
  template <size_t... I>
  static void call(void (*f)(A...), void* const* p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
  }
  static void invoke(void* const* p, void* fn) {
    call(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
  }
};

template <class... A>
int register_kernel(const char* name, void (*f)(A...)) {
  std::string signature;
  for (const std::string& code : {std::string(), arg_code<A>()...})
    if (!code.empty()) signature += (signature.empty() ? "" : ",") + code;
  kernels().push_back({name, signature, &Invoker<A...>::invoke, (void*)f});
  return 0;
}

}  // namespace kbit_emu

#define KBIT_EMU_CAT2(a, b) a##b
#define KBIT_EMU_CAT(a, b) KBIT_EMU_CAT2(a, b)
#define KBIT_EMU_REGISTER(k) \
  static int KBIT_EMU_CAT(kbit_emu_registered_, __LINE__) = ::kbit_emu::register_kernel(#k, &k);

// ---------------------------------------------------------------------- built-in variables
#define threadIdx (::kbit_emu::tl_fiber->tid)
#define blockIdx (::kbit_emu::tl_worker->block_id)
#define blockDim (::kbit_emu::tl_worker->block_dim)
#define gridDim (::kbit_emu::tl_worker->grid_dim)

// ------------------------------------------------------------------------- synchronisation
#define __syncthreads() ((void)::kbit_emu::block_barrier(__FILE__, __LINE__, 0))
#define __syncthreads_count(p) ::kbit_emu::block_barrier(__FILE__, __LINE__, (p) != 0)
#define __syncthreads_and(p) \
  (::kbit_emu::block_barrier(__FILE__, __LINE__, (p) != 0) == ::kbit_emu::tl_worker->live)
#define __syncthreads_or(p) (::kbit_emu::block_barrier(__FILE__, __LINE__, (p) != 0) != 0)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::kbit_emu::warp_meeting(mask, ::kbit_emu::OP_SYNCWARP, 0, "__syncwarp", nullptr);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// Let the other threads of the block run (what a spin loop on the GPU relies on).
inline void kbit_emu_yield() {
  ::kbit_emu::Fiber* f = ::kbit_emu::tl_fiber;
  f->wait_on = nullptr;
  ::kbit_emu::yield_to_scheduler(::kbit_emu::tl_worker, f);
}
inline void __nanosleep(unsigned) { kbit_emu_yield(); }

// --------------------------------------------------------------------------- warp shuffles
namespace kbit_emu {
enum ShuffleMode { SHUFFLE_IDX, SHUFFLE_UP, SHUFFLE_DOWN, SHUFFLE_XOR };

// The PTX shfl.sync lane computation, with c = ((32 - width) << 8) | (up ? 0 : 31).
template <class T>
T shuffle(unsigned mask, T value, int b, int width, int mode, const char* what) {
  static_assert(sizeof(T) <= 8, "the emulator shuffles values of at most 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("%s: width %d is not a power of two <= 32", what, width);
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  const int lane = (int)tl_fiber->lane;
  uint32_t present = 0;
  const uint64_t* values = warp_meeting(mask, OP_SHUFFLE, bits, what, &present);
  const int segment = 32 - width, offset = b & 31, clamp = mode == SHUFFLE_UP ? 0 : 31;
  const int max_lane = (lane & segment) | (clamp & ~segment), min_lane = lane & segment;
  int source;
  bool in_range;
  switch (mode) {
    case SHUFFLE_UP: source = lane - offset; in_range = source >= max_lane; break;
    case SHUFFLE_DOWN: source = lane + offset; in_range = source <= max_lane; break;
    case SHUFFLE_XOR: source = lane ^ offset; in_range = source <= max_lane; break;
    default: source = min_lane | (offset & ~segment); in_range = source <= max_lane; break;
  }
  if (!in_range) source = lane;
  if (!((present >> source) & 1u)) {
    if (config().strict) fail("%s: lane %d reads lane %d, which is not in mask 0x%08x", what, lane, source, mask);
    memset(&bits, 0xff, sizeof bits);  // undefined on hardware
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
  }
  T r;
  memcpy(&r, &values[source], sizeof(T));
  return r;
}
}  // namespace kbit_emu

template <class T> T __shfl_sync(unsigned m, T v, int src, int w = 32) {
  return kbit_emu::shuffle(m, v, src, w, kbit_emu::SHUFFLE_IDX, "__shfl_sync");
}
template <class T> T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
  return kbit_emu::shuffle(m, v, (int)d, w, kbit_emu::SHUFFLE_UP, "__shfl_up_sync");
}
template <class T> T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
  return kbit_emu::shuffle(m, v, (int)d, w, kbit_emu::SHUFFLE_DOWN, "__shfl_down_sync");
}
template <class T> T __shfl_xor_sync(unsigned m, T v, int lane_mask, int w = 32) {
  return kbit_emu::shuffle(m, v, lane_mask, w, kbit_emu::SHUFFLE_XOR, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  uint32_t present = 0;
  const uint64_t* v = kbit_emu::warp_meeting(mask, kbit_emu::OP_VOTE, predicate != 0, "__ballot_sync", &present);
  unsigned result = 0;
  for (int i = 0; i < 32; ++i)
    if (((present >> i) & 1u) && v[i]) result |= 1u << i;
  return result;
}
inline int __all_sync(unsigned mask, int p) {
  return __ballot_sync(mask, p) == (mask & kbit_emu::tl_worker->warps[kbit_emu::tl_fiber->warp].live);
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }

// ------------------------------------------------------------------------------- atomics
// Real atomics: blocks run on several OS threads. atomicCAS/atomicExch also yield, so a
// spin lock inside one block lets its holder run.
#define KBIT_EMU_ATOMIC_INT(T)                                                                              \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                       \
  inline T atomicExch(T* p, T v) {                                                                         \
    T old = __atomic_exchange_n(p, v, __ATOMIC_RELAXED);                                                   \
    kbit_emu_yield();                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicCAS(T* p, T expected, T v) {                                                              \
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);               \
    kbit_emu_yield();                                                                                      \
    return expected;                                                                                       \
  }                                                                                                        \
  inline T atomicMax(T* p, T v) {                                                                          \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                          \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMin(T* p, T v) {                                                                          \
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                          \
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }
KBIT_EMU_ATOMIC_INT(int)
KBIT_EMU_ATOMIC_INT(unsigned)
KBIT_EMU_ATOMIC_INT(unsigned long long)
inline float atomicAdd(float* p, float v) {
  uint32_t* q = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(q, __ATOMIC_RELAXED), next;
  float f;
  do {
    memcpy(&f, &old, 4);
    f += v;
    memcpy(&next, &f, 4);
  } while (!__atomic_compare_exchange_n(q, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  memcpy(&f, &old, 4);
  return f;
}

// --------------------------------------------------------------------- math and intrinsics
// The host build uses -ffp-contract=off and no fast-math: every operation below rounds
// once, to nearest even, as the GPU does with --fmad=false and -ftz=false.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __float2int_rn(float x) {
  // Saturating, NaN -> 0, like cvt.rni.s32.f32.
  if (x != x) return 0;
  if (x >= 2147483648.0f) return 2147483647;
  if (x < -2147483648.0f) return (-2147483647 - 1);
  return (int)lrintf(x);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// ------------------------------------------------------------------- half and bfloat16
namespace kbit_emu {
inline unsigned short float_to_half_bits(float f) {  // round to nearest even, like __float2half_rn
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return (unsigned short)(sign | 0x7fffu);  // NaN
  if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds past 65504: inf
  if (a < 0x38800000u) {                                          // half subnormal or zero
    float magnitude;
    memcpy(&magnitude, &a, 4);
    return (unsigned short)(sign | (uint32_t)lrintf(magnitude * 16777216.0f));
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return (unsigned short)(sign | h);
}
inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    float f = (float)m * (1.0f / 16777216.0f);
    memcpy(&x, &f, 4);
    x |= sign;
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}
inline unsigned short float_to_bfloat16_bits(float f) {  // round to nearest even
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
  return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bfloat16_bits_to_float(unsigned short h) {
  const uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}
}  // namespace kbit_emu

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline __half __float2half_rn(float f) { return __half{kbit_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return kbit_emu::half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{kbit_emu::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return kbit_emu::bfloat16_bits_to_float(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }

// ------------------------------------------------------------------------------- C API
extern "C" {
__attribute__((visibility("default"))) int kbit_emu_kernel_count() { return (int)kbit_emu::kernels().size(); }
__attribute__((visibility("default"))) const char* kbit_emu_kernel_name(int i) {
  return kbit_emu::kernels()[i].name.c_str();
}
__attribute__((visibility("default"))) const char* kbit_emu_kernel_signature(int i) {
  return kbit_emu::kernels()[i].signature.c_str();
}
__attribute__((visibility("default"))) void kbit_emu_configure(int os_threads, int schedule, unsigned seed,
                                                               unsigned long long stack_bytes, int strict) {
  kbit_emu::Config& c = kbit_emu::config();
  c.os_threads = os_threads;
  c.schedule = schedule;
  c.seed = seed;
  c.stack_bytes = stack_bytes;
  c.strict = strict != 0;
}
__attribute__((visibility("default"))) int kbit_emu_launch(int kernel, unsigned gx, unsigned gy, unsigned gz,
                                                           unsigned bx, unsigned by, unsigned bz,
                                                           unsigned long long dynamic_smem, void** args, char* error,
                                                           unsigned long long error_size) {
  const std::string e =
      kbit_emu::launch(&kbit_emu::kernels().at(kernel), dim3(gx, gy, gz), dim3(bx, by, bz), dynamic_smem, args);
  if (e.empty()) return 0;
  snprintf(error, error_size, "%s", e.c_str());
  return 1;
}
}
