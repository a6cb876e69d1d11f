// tests/cuda_emu/cuda_emu.h: run moe_raw's CUDA C kernels on the CPU, for tests on machines without a GPU.
//
// The kernel sources (kernels/*.cu, common.cuh inlined) are compiled as host C++ (g++) after this header, with two
// textual rewrites done by tests/cuda_emu/__init__.py: `__shared__` becomes `static` (one copy a block: blocks run
// one after another) and `extern __shared__ T name[];` becomes a pointer to this launch's dynamic shared memory.
//
// Execution model. A launch runs its blocks one after another (blockIdx.x fastest); a block's threads are fibers
// (ucontext) on the calling thread, scheduled cooperatively and deterministically: each runs until it reaches a
// barrier, a warp-collective or its end. Then
//   * a warp collective (__ballot_sync, __any_sync, __shfl*_sync, __syncwarp) completes once every live lane of its
//     mask waits at a collective of the same kind and mask; the results are computed from the lanes' values by the
//     PTX ISA's shfl.sync rules (width segments: up / down / idx stay in the lane's segment, bfly (xor) may read an
//     earlier segment but not a later one; out of reach returns the lane's own value);
//   * __syncthreads completes once every live thread of the block waits at it (exited threads do not count, as on
//     Volta and later).
// Errors the hardware would leave undefined are reported instead (the launch fails with a message): a collective
// whose mask names an exited lane or a lane waiting elsewhere, a shuffle reading a lane outside the mask, a
// deadlock (threads waiting at different barriers), a write past the dynamic shared memory asked for (a canary
// after it), a launch shape the hardware refuses, an access to unmapped memory (SIGSEGV; the thread is named), a
// misaligned vector access (the GPU faults on one; x86 would not), a shift past the width or a signed overflow
// (UBSan checks built in as traps).
// Dynamic shared memory starts as 0xA5 garbage in every block, so a read before a write shows up. Threads are
// resumed in one of three orders (schedule()); a missing barrier one order hides, another shows. Not modelled:
// other interleavings, timing, the memory model, bounds of global memory (a wild access to mapped memory passes),
// inline PTX (the bulk-copy engine of sm_90 is modelled instead: see bulk_store below).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The CUDA headers define these for host compilers in their own way; the kernels need them as plain C++.
#undef __device__
#undef __global__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

enum State { kRunnable, kAtBarrier, kAtWarpOp, kDone };
enum Op { kBallot, kAny, kAll, kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp };

struct Fiber {
  ucontext_t ctx;  // the first entry only (makecontext gives the fiber its stack)
  jmp_buf jump;    // every later switch: _setjmp / _longjmp save no signal mask, so a switch makes no system call
  bool started = false;
  Dim3 tid;
  State state = kRunnable;
  Op op = kSyncWarp;
  uint32_t mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  // Bulk copies this thread issued and has not waited for: destination, source, the source's bytes at issue.
  struct Bulk {
    unsigned char* dst;
    const unsigned char* src;
    std::vector<unsigned char> seen;
    bool committed;
  };
  std::vector<Bulk> bulk;
  // Stage fills (cp.async) this thread started and has not waited for: destination, the source's 16 bytes.
  std::vector<std::pair<unsigned char*, std::vector<unsigned char>>> fills;
};

struct Launch {
  Dim3 grid, block, bid;
  std::vector<Fiber> fibers;
  ucontext_t scheduler_ctx;
  jmp_buf scheduler;
  Fiber* cur = nullptr;
  std::vector<unsigned char> dyn;  // dynamic shared memory + canary
  size_t dyn_bytes = 0;
  void (*body)(void*) = nullptr;  // runs the kernel with its unpacked arguments
  void* body_arg = nullptr;
  std::string error;
};

inline Launch*& current() {
  thread_local Launch* l = nullptr;  // each calling thread runs its own launches
  return l;
}

// The order runnable threads are resumed in: 0 ascending, 1 descending, 2 a fresh pseudo-random order each round
// (seeded by the block index). One order shows one interleaving; a missing barrier that one order hides (the
// writer happens to run first), another exposes.
inline int& schedule() {
  static int mode = 0;
  return mode;
}

inline void fail(const std::string& msg) {
  Launch* l = current();
  if (l->error.empty()) l->error = msg;
}

inline void yield_to_scheduler() {
  Launch* l = current();
  if (!_setjmp(l->cur->jump)) _longjmp(l->scheduler, 1);
}

constexpr size_t kCanary = 4096;
constexpr unsigned char kGarbage = 0xA5, kCanaryByte = 0x5C;
constexpr size_t kStack = 256 * 1024;

// Fiber stacks: one reserved mapping for 1024 threads a calling thread, reused by its launches (pages are committed
// on first touch).
inline char* stacks() {
  thread_local char* base = static_cast<char*>(
      mmap(nullptr, 1024 * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  return base;
}

inline void* dynamic_shared() { return current()->dyn.data(); }

inline void syncthreads() {
  current()->cur->state = kAtBarrier;
  yield_to_scheduler();
}

template <typename T>
inline T warp_op(Op op, uint32_t mask, T value, int arg = 0, int width = 32) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes a lane");
  Fiber* f = current()->cur;
  f->op = op;
  f->mask = mask;
  f->value = 0;
  std::memcpy(&f->value, &value, sizeof(T));
  f->arg = arg;
  f->width = width;
  f->state = kAtWarpOp;
  yield_to_scheduler();
  T out;
  std::memcpy(&out, &f->result, sizeof(T));
  return out;
}

inline std::string lane_name(const Launch& l, unsigned t);

inline void fiber_main() {
  Launch* l = current();
  l->body(l->body_arg);
  if (!l->cur->bulk.empty()) {
    const unsigned t = static_cast<unsigned>(l->cur - l->fibers.data());
    fail(lane_name(*l, t) + ": exited with a bulk copy it did not wait for (bulk_commit + bulk_wait_read)");
  }
  if (!l->cur->fills.empty()) {
    const unsigned t = static_cast<unsigned>(l->cur - l->fibers.data());
    fail(lane_name(*l, t) + ": exited with a stage fill it did not wait for (stage_fill_wait)");
  }
  l->cur->state = kDone;
  _longjmp(l->scheduler, 1);  // never resumed
}

inline std::string lane_name(const Launch& l, unsigned t) {
  return "block (" + std::to_string(l.bid.x) + ", " + std::to_string(l.bid.y) + ") thread " + std::to_string(t);
}

// Completes the warp collectives whose masks have all their lanes waiting; false if none could complete.
inline bool resolve_warp_ops(Launch& l) {
  bool any = false;
  const unsigned n = static_cast<unsigned>(l.fibers.size());
  for (unsigned w = 0; w * 32 < n; ++w) {
    for (unsigned lane = 0; lane < 32 && w * 32 + lane < n; ++lane) {
      Fiber& f = l.fibers[w * 32 + lane];
      if (f.state != kAtWarpOp) continue;
      if (!(f.mask >> lane & 1u)) {
        fail(lane_name(l, w * 32 + lane) + ": a warp collective whose mask leaves out the calling lane");
        return false;
      }
      bool ready = true;
      for (unsigned j = 0; j < 32; ++j) {
        if (!(f.mask >> j & 1u)) continue;
        if (w * 32 + j >= n) {
          fail(lane_name(l, w * 32 + lane) + ": a warp collective's mask names a lane past the block");
          return false;
        }
        const Fiber& g = l.fibers[w * 32 + j];
        if (g.state == kDone) {
          fail(lane_name(l, w * 32 + lane) + ": a warp collective's mask names lane " + std::to_string(j) +
               ", which has exited");
          return false;
        }
        if (g.state != kAtWarpOp) {
          ready = false;
          continue;
        }
        if (g.op != f.op || g.mask != f.mask) {
          fail(lane_name(l, w * 32 + lane) + ": lanes of one mask wait at different warp collectives");
          return false;
        }
      }
      if (!ready) continue;
      const uint32_t mask = f.mask;
      uint32_t votes = 0;
      for (unsigned j = 0; j < 32; ++j)
        if (mask >> j & 1u && l.fibers[w * 32 + j].value != 0) votes |= 1u << j;
      for (unsigned j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        Fiber& g = l.fibers[w * 32 + j];
        const int width = g.width, base = static_cast<int>(j) / width * width, in = static_cast<int>(j) % width;
        int src = static_cast<int>(j);
        switch (g.op) {
          case kBallot: g.result = votes; break;
          case kAny: g.result = votes != 0; break;
          case kAll: g.result = votes == mask; break;
          case kSyncWarp: g.result = 0; break;
          case kShflIdx: src = base + ((g.arg % width) + width) % width; break;
          case kShflUp: src = in >= g.arg ? static_cast<int>(j) - g.arg : static_cast<int>(j); break;
          case kShflDown: src = in + g.arg < width ? static_cast<int>(j) + g.arg : static_cast<int>(j); break;
          case kShflXor:  // PTX shfl.bfly: a lane of a later segment is out of reach, an earlier one is not
            src = (static_cast<int>(j) ^ g.arg) <= base + width - 1 ? static_cast<int>(j) ^ g.arg : static_cast<int>(j);
            break;
        }
        if (g.op >= kShflIdx && g.op <= kShflXor) {
          if (src < 0 || src > 31 || !(mask >> src & 1u)) {
            fail(lane_name(l, w * 32 + j) + ": a shuffle reads lane " + std::to_string(src) + ", outside its mask");
            return false;
          }
          g.result = l.fibers[w * 32 + src].value;
        }
      }
      for (unsigned j = 0; j < 32; ++j)
        if (mask >> j & 1u) l.fibers[w * 32 + j].state = kRunnable;
      any = true;
    }
  }
  return any;
}

// Runs one block to completion (or to its first error).
inline void run_block(Launch& l) {
  const unsigned n = l.block.x * l.block.y * l.block.z;
  std::memset(l.dyn.data(), kGarbage, l.dyn_bytes);
  std::memset(l.dyn.data() + l.dyn_bytes, kCanaryByte, kCanary);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = l.fibers[t];
    f.tid = {t % l.block.x, t / l.block.x % l.block.y, t / (l.block.x * l.block.y)};
    f.state = kRunnable;
    f.started = false;
    f.bulk.clear();
    f.fills.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks() + static_cast<size_t>(t) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = schedule() == 1 ? n - 1 - t : t;
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(l.bid.y) << 32 | l.bid.x);
  for (;;) {
    if (schedule() == 2) {
      for (unsigned i = n - 1; i > 0; --i) {  // Fisher-Yates with xorshift64
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        std::swap(order[i], order[rng % (i + 1)]);
      }
    }
    bool ran = false;
    for (unsigned t : order) {
      if (l.fibers[t].state != kRunnable) continue;
      Fiber& f = l.fibers[t];
      l.cur = &f;
      if (!_setjmp(l.scheduler)) {
        if (f.started) _longjmp(f.jump, 1);
        f.started = true;
        swapcontext(&l.scheduler_ctx, &f.ctx);  // returns never: the fiber comes back by _longjmp
      }
      ran = true;
      if (!l.error.empty()) return;
    }
    if (ran) continue;
    if (resolve_warp_ops(l)) continue;
    if (!l.error.empty()) return;
    unsigned live = 0, waiting = 0;
    for (unsigned t = 0; t < n; ++t) {
      live += l.fibers[t].state != kDone;
      waiting += l.fibers[t].state == kAtBarrier;
    }
    if (live == 0) break;
    if (waiting == live) {
      for (unsigned t = 0; t < n; ++t)
        if (l.fibers[t].state == kAtBarrier) l.fibers[t].state = kRunnable;
      continue;
    }
    unsigned t = 0;
    while (l.fibers[t].state == kDone) ++t;
    fail(lane_name(l, t) + ": deadlock (" + std::to_string(waiting) + " of " + std::to_string(live) +
         " live threads wait at __syncthreads, the others at warp collectives that cannot complete)");
    return;
  }
  for (size_t i = 0; i < kCanary; ++i) {
    if (l.dyn[l.dyn_bytes + i] != kCanaryByte) {
      fail("block (" + std::to_string(l.bid.x) + ", " + std::to_string(l.bid.y) + "): a write " +
           std::to_string(i) + " bytes past the " + std::to_string(l.dyn_bytes) + " bytes of dynamic shared memory");
      return;
    }
  }
}

// A thread's invalid memory access (SIGSEGV / SIGBUS) ends the launch with an error naming the thread, as the
// GPU's "illegal memory access" would, instead of killing the test process. (An access that lands on mapped memory
// is not caught: bounds are not checked.)
inline sigjmp_buf& fault_jump() {
  thread_local sigjmp_buf jump;
  return jump;
}
inline void*& fault_address() {
  thread_local void* address = nullptr;
  return address;
}
inline void on_fault(int sig, siginfo_t* info, void*) {
  fault_address() = info->si_addr;
  siglongjmp(fault_jump(), sig);
}

// The signal handlers in place before the first launch in flight (SIGSEGV, SIGBUS, SIGILL).
inline struct sigaction* saved_handlers() {
  static struct sigaction saved[3];
  return saved;
}

// The function holding code address pc (demangled), or "".
inline std::string function_at(void* pc) {
  Dl_info info{};
  if (!dladdr(pc, &info) || !info.dli_sname) return "";
  int status = 0;
  char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && name ? name : info.dli_sname;
  std::free(name);
  return out;
}

// Runs the grid; returns "" or the first error.
inline std::string run(Dim3 grid, Dim3 block, size_t dyn_bytes, void (*body)(void*), void* arg) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.x > 2147483647u)
    return "launch shape refused by the hardware: grid (" + std::to_string(grid.x) + ", " +
           std::to_string(grid.y) + "), block " + std::to_string(n);
  if (dyn_bytes > 227 * 1024) return "more dynamic shared memory than an SM has: " + std::to_string(dyn_bytes);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.fibers.resize(n);
  if (stacks() == MAP_FAILED) return "cannot map the fiber stacks";
  l.dyn.resize(dyn_bytes + kCanary);
  l.dyn_bytes = dyn_bytes;
  l.body = body;
  l.body_arg = arg;
  Launch* saved = current();
  current() = &l;
  thread_local char alt_stack[64 * 1024];  // the handler runs here: a fault may come from a fiber's exhausted stack
  stack_t ss{}, old_ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof(alt_stack);
  sigaltstack(&ss, &old_ss);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  static std::mutex handlers_lock;  // the handlers are process-wide: the first launch in flight installs them,
  static int in_flight = 0;         // the last one restores the previous ones
  {
    std::lock_guard<std::mutex> guard(handlers_lock);
    if (in_flight++ == 0) {
      sigaction(SIGSEGV, &sa, &saved_handlers()[0]);
      sigaction(SIGBUS, &sa, &saved_handlers()[1]);
      sigaction(SIGILL, &sa, &saved_handlers()[2]);
    }
  }
  const int sig = sigsetjmp(fault_jump(), 1);
  if (sig == 0) {
    for (unsigned y = 0; y < grid.y && l.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && l.error.empty(); ++x) {
        l.bid = {x, y, 0};
        run_block(l);
      }
  } else {
    char where[64];
    std::snprintf(where, sizeof(where), "%p", fault_address());
    const std::string thread = lane_name(l, static_cast<unsigned>(l.cur - l.fibers.data()));
    if (sig == SIGILL) {  // the -fsanitize traps the library is built with (tests/cuda_emu/__init__.py)
      l.error = thread + ": undefined behaviour in " + function_at(fault_address()) +
                " (a misaligned vector access, a shift past the type's width or a signed overflow)";
    } else {
      l.error = thread + ": invalid memory access (address " + where + ")";
    }
  }
  {
    std::lock_guard<std::mutex> guard(handlers_lock);
    if (--in_flight == 0) {
      sigaction(SIGSEGV, &saved_handlers()[0], nullptr);
      sigaction(SIGBUS, &saved_handlers()[1], nullptr);
      sigaction(SIGILL, &saved_handlers()[2], nullptr);
    }
  }
  sigaltstack(&old_ss, nullptr);
  current() = saved;
  return l.error;
}

// Kernel arguments from a cuLaunchKernel parameter buffer: each at its natural alignment, in order.
template <typename... A, size_t... I>
std::tuple<A...> unpack(const unsigned char* params, std::index_sequence<I...>) {
  std::tuple<A...> out;
  size_t off = 0;
  auto take = [&](auto& slot) {
    using T = std::remove_reference_t<decltype(slot)>;
    off = (off + alignof(T) - 1) / alignof(T) * alignof(T);
    std::memcpy(&slot, params + off, sizeof(T));
    off += sizeof(T);
  };
  (take(std::get<I>(out)), ...);
  return out;
}

template <typename... A>
std::string launch(void (*kernel)(A...), Dim3 grid, Dim3 block, size_t dyn_bytes, const unsigned char* params) {
  struct Call {
    void (*kernel)(A...);
    std::tuple<A...> args;
  } call{kernel, unpack<A...>(params, std::index_sequence_for<A...>{})};
  auto body = [](void* p) {
    Call* c = static_cast<Call*>(p);
    std::apply(c->kernel, c->args);
  };
  return run(grid, block, dyn_bytes, body, &call);
}

}  // namespace emu

// The built-in variables: the current fiber's thread index and the current block.
#define threadIdx (::emu::current()->cur->tid)
#define blockIdx (::emu::current()->bid)
#define blockDim (::emu::current()->block)
#define gridDim (::emu::current()->grid)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op<int>(emu::kSyncWarp, mask, 0); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::warp_op<int>(emu::kBallot, mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return emu::warp_op<int>(emu::kAny, mask, pred != 0); }
inline int __all_sync(unsigned mask, int pred) { return emu::warp_op<int>(emu::kAll, mask, pred != 0); }
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::warp_op<T>(emu::kShflIdx, mask, v, src, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::warp_op<T>(emu::kShflUp, mask, v, static_cast<int>(d), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::warp_op<T>(emu::kShflDown, mask, v, static_cast<int>(d), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::warp_op<T>(emu::kShflXor, mask, v, lane_mask, width);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division, round to nearest (SSE on the host)
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned __vcmpne4(unsigned a, unsigned b) {
  unsigned r = 0;
  for (int i = 0; i < 4; ++i)
    if ((a >> (8 * i) & 0xffu) != (b >> (8 * i) & 0xffu)) r |= 0xffu << (8 * i);
  return r;
}
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// Hopper's bulk-copy engine (kernels/common.cuh defines these for sm_90+ and leaves them to us here), so the
// kernels' bulk paths run on the emulator. A copy's source must lie in the dynamic shared memory; its bytes are
// taken at bulk_store and compared at the thread's next bulk_wait_read (which first lets the other runnable threads
// run, as the engine may read late), where the copy lands: a source written
// between the two (the stage reused too early, or still being filled when the copy was issued) fails the launch,
// as does a thread that exits with copies it did not wait for. Not modelled: bulk_fence_shared (a no-op).
#define MOE_RAW_BULK_COPY 1
inline void bulk_fence_shared() {}
inline void bulk_store(void* dst, const void* stage, int bytes) {
  emu::Launch* l = emu::current();
  const auto* src = static_cast<const unsigned char*>(stage);
  const unsigned t = static_cast<unsigned>(l->cur - l->fibers.data());
  if (src < l->dyn.data() || src + bytes > l->dyn.data() + l->dyn_bytes)
    return emu::fail(emu::lane_name(*l, t) + ": bulk_store's source is not in the dynamic shared memory");
  if (bytes <= 0 || bytes % 16 || reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    return emu::fail(emu::lane_name(*l, t) + ": bulk_store of " + std::to_string(bytes) +
                     " bytes: size and addresses must be multiples of 16");
  l->cur->bulk.push_back({static_cast<unsigned char*>(dst), src, std::vector<unsigned char>(src, src + bytes), false});
}
inline void bulk_commit() {
  for (auto& b : emu::current()->cur->bulk) b.committed = true;
}
inline void bulk_wait_read() {
  emu::Launch* l = emu::current();
  auto& pending = l->cur->bulk;
  const unsigned t = static_cast<unsigned>(l->cur - l->fibers.data());
  // The engine may read the source any time up to the wait: let every other runnable thread run first.
  emu::yield_to_scheduler();
  std::vector<emu::Fiber::Bulk> open;  // not committed: bulk_wait_read does not wait for them
  for (auto& b : pending) {
    if (!b.committed) {
      open.push_back(std::move(b));
    } else if (std::memcmp(b.src, b.seen.data(), b.seen.size())) {
      emu::fail(emu::lane_name(*l, t) + ": the shared memory a bulk copy reads changed between its bulk_store and "
                "bulk_wait_read (a missing barrier)");
    } else {
      std::memcpy(b.dst, b.seen.data(), b.seen.size());
    }
  }
  pending = std::move(open);
}
// cp.async's 16-byte fills of shared memory (kernels/common.cuh): a fill lands only at its thread's
// stage_fill_wait, so the stage holds its 0xA5 garbage (or older bytes) until then and a read of it before the wait,
// by any thread, sees them. A thread that exits with fills it did not wait for fails the launch.
inline void stage_fill16(void* dst, const void* src) {
  emu::Launch* l = emu::current();
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const unsigned t = static_cast<unsigned>(l->cur - l->fibers.data());
  if (d < l->dyn.data() || d + 16 > l->dyn.data() + l->dyn_bytes)
    return emu::fail(emu::lane_name(*l, t) + ": stage_fill16's destination is not in the dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(d) % 16 || reinterpret_cast<uintptr_t>(s) % 16)
    return emu::fail(emu::lane_name(*l, t) + ": stage_fill16's addresses must be multiples of 16");
  l->cur->fills.emplace_back(d, std::vector<unsigned char>(s, s + 16));
}
inline void stage_fill_wait() {
  auto& fills = emu::current()->cur->fills;
  for (auto& f : fills) std::memcpy(f.first, f.second.data(), 16);
  fills.clear();
}
// CUDA's min / max overloads: both arguments converted to their common type (int and int64_t -> int64_t).
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
  return static_cast<std::common_type_t<A, B>>(a) < static_cast<std::common_type_t<A, B>>(b) ? a : b;
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
  return static_cast<std::common_type_t<A, B>>(a) < static_cast<std::common_type_t<A, B>>(b) ? b : a;
}
using std::isfinite;
using std::isinf;
using std::isnan;
