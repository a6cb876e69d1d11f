// moe_raw/kernels/chunks.cu: sort_chunks_by_idxs, the chunk regrouping after an expert-parallel all-to-all.
//
// What it computes. The rows [0, n_rows) of `in` hold S chunks back to back, chunk i of split_sizes[i] rows
// (rows past sum(split_sizes) belong to no chunk). The output holds the chunks in the order sorted_idxs gives:
// out = cat(chunk[sorted_idxs[0]], chunk[sorted_idxs[1]], ...), and rows past sum(split_sizes) stay where they
// are. With src_start[i] = sizes[0] + ... + sizes[i-1] (input order) and dst_start[sorted_idxs[j]] =
// sizes[sorted_idxs[0]] + ... + sizes[sorted_idxs[j-1]] (output order), row r of chunk i moves to
//   dst(r) = dst_start[i] + (r - src_start[i]),     dst(r) = r past the chunks.
//   chunk_sort<VB>, gather = 0:  out[dst(r)] = in[r]   (forward; probs_out[dst(r)] = probs_in[r])
//   chunk_sort<VB>, gather = 1:  out[r] = in[dst(r)]   (backward: the inverse permutation, same tables)
// Every block rebuilds src_start / dst_start in shared memory from the device tensors (S <= 4096), so the
// op is one launch with no workspace and no host sync; for S up to a few thousand that is a few loads per thread.
//
// Launch shape: grid = ceil(n_rows / kChunkRows), block = kChunkThreads (8 warps; each warp moves one row at a
// time in VB-byte packs, lanes striding over the row), dynamic shared memory 8 * S bytes.
// Preconditions (moe_raw/chunks.py and moe_raw/_kernels/dispatch.py check the host-side ones): VB divides
// row_bytes, both row strides and both base addresses; n_rows < 2^31; 1 <= S <= 4096; sizes and sorted_idxs are
// int32 or int64 device tensors.
// Values are not checked on the device (that would need a host sync; MOE_RAW_DEBUG=1 checks them in Python),
// but bad values cannot write out of bounds: sizes are clamped to [0, n_rows], indices outside [0, S) are
// skipped, and a destination past n_rows is dropped. With a valid permutation every output row is written.
// Bytes moved: read n_rows * row_bytes, write n_rows * row_bytes (+ probs: n_rows * probs_bytes each way).

#include "common.cuh"

namespace moe_raw {

constexpr int kChunkThreads = 256;
// Rows per block: one a warp. With 32 (four a warp) DeepSeek-V3's 32768 rows made 1024 blocks, 1.3 waves at 6 blocks
// a SM on 132 SMs, so a quarter of the kernel ran with two blocks a SM; 8 makes 4096 blocks, and each block's table
// rebuild (S <= 4096 entries, L2 hits) hides behind the other blocks' copies. H100, same run: 0.343 -> 0.335 ms
// (DeepSeek-V3), 0.103 -> 0.100 (Qwen3-30B-A3B), both directions (bench/results/2026-12-07-h100-twentysecond-ab).
constexpr int kChunkRows = 8;
// At most kMaxSplits chunks (mirrored by moe_raw/_kernels/dispatch.py MAX_SPLITS, tests/test_kernel_constants.py):
// the two int32 tables of S entries then fill 32 KiB of shared memory.
constexpr int kMaxSplits = 4096;
static_assert(2 * kMaxSplits * sizeof(int) <= 32 * 1024,
              "the chunk tables must fit the shared memory the launch asks for");

__device__ __forceinline__ int64_t load_index(const void* p, int bytes, int64_t i) {
  return bytes == 4 ? static_cast<int64_t>(static_cast<const int32_t*>(p)[i]) : static_cast<const int64_t*>(p)[i];
}

// src_start / dst_start (int32, clamped to n_rows) for every chunk; returns the rows covered by chunks.
__device__ int build_tables(const void* sizes, int sizes_bytes, const void* sorted_idxs, int idx_bytes, int n_splits,
                            int64_t n_rows, int* src_start, int* dst_start) {
  // A chunk that sorted_idxs never names keeps n_rows: its rows map past the end and are dropped.
  for (int i = threadIdx.x; i < n_splits; i += kChunkThreads) dst_start[i] = static_cast<int>(n_rows);
  __syncthreads();
  int64_t carry_src = 0, carry_dst = 0;
  for (int base = 0; base < n_splits; base += kChunkThreads) {
    const int i = base + threadIdx.x;
    int64_t size = 0, size_sorted = 0, j = -1;
    if (i < n_splits) {
      size = min(max(load_index(sizes, sizes_bytes, i), int64_t(0)), n_rows);
      j = load_index(sorted_idxs, idx_bytes, i);
      if (j >= 0 && j < n_splits) size_sorted = min(max(load_index(sizes, sizes_bytes, j), int64_t(0)), n_rows);
    }
    int64_t sum_src, sum_dst;
    const int64_t pre_src = block_exclusive_scan(size, &sum_src);
    const int64_t pre_dst = block_exclusive_scan(size_sorted, &sum_dst);
    if (i < n_splits) src_start[i] = static_cast<int>(min(carry_src + pre_src, n_rows));
    if (j >= 0 && j < n_splits) dst_start[j] = static_cast<int>(min(carry_dst + pre_dst, n_rows));
    carry_src += sum_src;
    carry_dst += sum_dst;
  }
  __syncthreads();
  return static_cast<int>(min(carry_src, n_rows));
}

// At least 6 blocks a SM (<= 40 registers): the ncu record on the H200 showed 48 registers and 5 blocks (53%
// occupancy, warps waiting on loads). ptxas (nvcc 13.0) fits the bound with no spills on sm_80 .. sm_90, where the
// unbounded build of chunk_sort<16> used 40 registers plus 8 bytes of spills; on sm_100 / sm_120 the bound spills
// (40 / 16 bytes), so those keep ptxas' choice (32-48 registers; a minimum of 1 block made it take 56-108).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
#define MOE_RAW_CHUNK_BOUNDS __launch_bounds__(kChunkThreads)
#else
#define MOE_RAW_CHUNK_BOUNDS __launch_bounds__(kChunkThreads, 6)
#endif

template <int VB>
__global__ void MOE_RAW_CHUNK_BOUNDS
    chunk_sort(const uint8_t* __restrict__ in, int64_t in_stride, uint8_t* __restrict__ out, int64_t out_stride,
               int64_t n_rows, int64_t row_bytes, const void* __restrict__ sizes, int sizes_bytes,
               const void* __restrict__ sorted_idxs, int idx_bytes, int n_splits, const uint8_t* __restrict__ probs_in,
               int64_t probs_in_stride, uint8_t* __restrict__ probs_out, int probs_bytes, int gather) {
  using V = typename Vec<VB>::type;
  extern __shared__ int tables[];
  int* src_start = tables;
  int* dst_start = tables + n_splits;
  const int covered = build_tables(sizes, sizes_bytes, sorted_idxs, idx_bytes, n_splits, n_rows, src_start, dst_start);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_vec = row_bytes / VB;
  for (int64_t r = blockIdx.x * int64_t(kChunkRows) + warp; r < min(n_rows, (blockIdx.x + 1) * int64_t(kChunkRows));
       r += kChunkThreads / 32) {
    int64_t d = r;
    if (r < covered) {
      int lo = 0, hi = n_splits;  // the last chunk whose start is <= r (zero-size chunks share starts)
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (src_start[mid] <= r) lo = mid; else hi = mid;
      }
      d = int64_t(dst_start[lo]) + (r - src_start[lo]);
      if (d >= n_rows) continue;  // a chunk sorted_idxs does not name, or sizes past n_rows: nothing to move
    }
    const int64_t from = gather ? d : r, to = gather ? r : d;
    const V* src = reinterpret_cast<const V*>(in + from * in_stride);
    V* dst = reinterpret_cast<V*>(out + to * out_stride);
    // Four loads in flight a lane before their stores (ncu on the H200, DeepSeek-V3: one at a time left the warps
    // waiting on L1TEX 69% of their cycles at 80% of the DRAM peak).
    // (A row's pack count fits an int: the row offsets above stay 64-bit.)
    const int packs = static_cast<int>(n_vec);
    int k = lane;
    for (; k + 3 * 32 < packs; k += 4 * 32) {
      const V a = src[k], b = src[k + 32], c = src[k + 64], e = src[k + 96];
      dst[k] = a, dst[k + 32] = b, dst[k + 64] = c, dst[k + 96] = e;
    }
    for (; k < packs; k += 32) dst[k] = src[k];
    if (probs_out != nullptr && lane == 0) {
      const uint8_t* ps = probs_in + from * probs_in_stride * probs_bytes;
      uint8_t* pd = probs_out + to * probs_bytes;
      for (int b = 0; b < probs_bytes; ++b) pd[b] = ps[b];
    }
  }
}

}  // namespace moe_raw

#ifdef MOE_RAW_NVCC_CHECK
// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
namespace moe_raw {
#define MOE_RAW_CHUNK_SORT(VB)                                                                                  \
  template __global__ void chunk_sort<VB>(const uint8_t*, int64_t, uint8_t*, int64_t, int64_t, int64_t,        \
                                          const void*, int, const void*, int, int, const uint8_t*, int64_t,    \
                                          uint8_t*, int, int);
MOE_RAW_CHUNK_SORT(16)
MOE_RAW_CHUNK_SORT(8)
MOE_RAW_CHUNK_SORT(4)
MOE_RAW_CHUNK_SORT(2)
MOE_RAW_CHUNK_SORT(1)
}  // namespace moe_raw
#endif
