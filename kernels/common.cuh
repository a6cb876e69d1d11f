// moe_raw/kernels/common.cuh: helpers shared by the moe_raw kernels.
//
// * Scalars (probs, their gradients) travel with a run-time dtype code, so one kernel instance serves
//   fp32/fp16/bf16/fp64 probs for any token dtype; they are a few loads per token, so the switch costs nothing.
// * Row data moves in packs of VB bytes (16 where the row allows it); the pack, not the dtype, sets the vector width.
// * Every element offset is 64-bit: row * row_len passes 2^31 at DeepSeek-V3 sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__  // NVRTC ships no libc headers
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

namespace moe_raw {

// Run-time dtype codes of scalar tensors; must match moe_raw/_launch.py SCALAR_CODE.
enum ScalarCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Accumulator type: fp32 for every 16/32-bit dtype, fp64 for fp64 (gradcheck runs in fp64).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T x) { return static_cast<typename Acc<T>::type>(x); }
template <> __device__ __forceinline__ float to_acc<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }

template <typename A>
__device__ __forceinline__ A load_scalar(const void* p, int code, int64_t i) {
  switch (code) {
    case kF32: return static_cast<A>(static_cast<const float*>(p)[i]);
    case kF16: return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default: return static_cast<A>(static_cast<const double*>(p)[i]);
  }
}

template <typename A>
__device__ __forceinline__ void store_scalar(void* p, int code, int64_t i, A v) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

// A routing-map entry is "routed" when nonzero; the map may be bool/uint8/int8 (1 byte), int16, int32 or int64.
__device__ __forceinline__ bool map_entry(const void* m, int bytes, int64_t off) {
  switch (bytes) {
    case 1: return static_cast<const uint8_t*>(m)[off] != 0;
    case 2: return static_cast<const uint16_t*>(m)[off] != 0;
    case 4: return static_cast<const uint32_t*>(m)[off] != 0;
    default: return static_cast<const uint64_t*>(m)[off] != 0;
  }
}

// Row data moves in VB-byte vectors (LDG.128 / STG.128 for VB = 16); Pack views one as VB / sizeof(T) elements.
template <int VB> struct Vec;
template <> struct Vec<16> { using type = uint4; };
template <> struct Vec<8> { using type = uint2; };
template <> struct Vec<4> { using type = uint32_t; };
template <> struct Vec<2> { using type = uint16_t; };
template <> struct Vec<1> { using type = uint8_t; };

template <typename T, int VB>
union Pack {
  static constexpr int N = VB / static_cast<int>(sizeof(T));
  typename Vec<VB>::type raw;
  T v[N];
};

// Block-wide exclusive scan of one integer (int or int64_t) per thread (blockDim.x a multiple of 32, <= 1024).
// Returns the thread's exclusive prefix; *total gets the block sum. Contains __syncthreads: call from every thread.
template <typename I>
__device__ __forceinline__ I block_exclusive_scan(I x, I* total) {
  __shared__ I warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  I inc = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const I y = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += y;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    I w = lane < nwarps ? warp_sums[lane] : I(0);
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const I y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const I warp_base = warp == 0 ? I(0) : warp_sums[warp - 1];
  *total = warp_sums[nwarps - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return warp_base + inc - x;
}

// Hopper's bulk-copy engine (cp.async.bulk, sm_90+), global <- shared: MOE_RAW_BULK_COPY is defined where the
// kernels may use it. The test emulator (tests/cuda_emu/cuda_emu.h) defines it and these six functions itself, so
// the bulk paths run there too (with the ordering rules below checked). Protocol of a thread:
//   stage rows in shared memory (any threads), bulk_fence_shared() by each writer, a barrier to the issuers,
//   bulk_store(...) per destination, bulk_commit(), bulk_wait_read() before the stage is written again or the
//   thread exits. Sizes and both addresses must be multiples of 16 bytes.
#if !defined(MOE_RAW_BULK_COPY) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_RAW_BULK_COPY 1
// Makes this thread's generic stores to shared memory visible to the bulk-copy engine (the async proxy).
__device__ __forceinline__ void bulk_fence_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Starts copying `bytes` of shared memory at `stage` to global `dst`, in this thread's open bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* stage, int bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(stage));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(s), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until every committed bulk copy of this thread has read its source (the stage may be reused).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Starts copying 16 bytes of global `src` to shared `dst` (cp.async, through L2 only), holding no register for the
// data; stage_fill_wait() waits for all of this thread's fills. Then bulk_fence_shared() and a barrier, as for any
// stage writer, before the bulk copies read the stage.
__device__ __forceinline__ void stage_fill16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void stage_fill_wait() {
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
}
#endif

// Programmatic dependent launch (sm_90+). A kernel launched with overlap (moe_raw/_launch.py launch(...,
// overlap=True)) may start while the kernel before it on the stream is still running: before pdl_wait() it must
// not read anything that kernel writes, nor write anything that kernel reads; pdl_wait() returns once that kernel
// has completed and its writes are visible. pdl_trigger() in the kernel before lets such a launch start at once
// instead of when its blocks exit. Both are no-ops below sm_90, for a launch without overlap, and in the emulator.
// What that kernel writes must reach the overlapped kernel through pointers without `const __restrict__`: those
// become read-only loads (ld.global.nc, LDG.CONSTANT), which ptxas may schedule above griddepcontrol.wait, since
// read-only data cannot change during the kernel. nvcc 13.0 did so for sm_90 in permute_grouped's first version
// (its first reads of the tables came before the wait, and 7 GPU tests failed, on an H100:
// bench/results/2026-12-06-h100-main); plain pointers kept them after it (bench/results/2026-12-06-h100-grouped).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Compaction across a warp (all 32 lanes call it): the lanes with `has` set take consecutive slots from n on, in
// lane order (*slot); returns n plus their count. A warp-a-token kernel builds its token's row list with it, 32
// experts at a time, in ascending expert order and with no block barrier.
__device__ __forceinline__ int warp_slots(bool has, int n, int* slot) {
  const uint32_t mask = __ballot_sync(0xffffffffu, has);
  *slot = n + __popc(mask & ((1u << (threadIdx.x & 31)) - 1u));
  return n + __popc(mask);
}

}  // namespace moe_raw
