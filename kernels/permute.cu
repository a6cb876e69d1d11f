// moe_raw/kernels/permute.cu: MoE token permute / unpermute and their backward passes.
//
// What it computes (T tokens, H hidden, E experts, N permuted rows; row order is expert-major, token-ascending):
//   routing_pack + routing_scan  routing_map [T, E] -> per-expert bit columns and their prefix sums (the "tables"),
//                                from which any (token, expert) pair's permuted row follows in O(1).
//   permute_scatter              one block per token: finds the token's rows from the tables, writes its row-map
//                                line, sorted_indices / permuted_probs entries, and copies the token to each row
//                                (on sm_90 with 16-byte rows: staged in shared memory, written by bulk copies).
//   permute_grouped              permute_scatter for up to 32 consecutive tokens a block (sm_90, 16-byte rows of
//                                8-16 KiB, K >= 4: where it won), all their rows staged, looked up at once, then
//                                bulk-copied. With the row count given and T <= 16 tiles it runs after routing_pack
//                                alone: each block counts its experts' starts from the tile sums (tile_bases), no
//                                routing_scan.
//   permute_small                permute_scatter without the tables, for small maps with the row count given: each
//                                block counts the whole map in shared memory (T * E reads a block), so a small
//                                permute is one launch, not two.
//   gather_reduce                one block per token: out[t] = sum over its rows of w * row (fp32 accumulation in
//                                ascending expert order: bitwise deterministic, no atomics). Unpermute forward and
//                                permute backward (optionally also the permuted-probs gradient).
//   gather_warp                  gather_reduce with a warp a token and no block barrier, the same sums in the same
//                                order (MOE_RAW_BLOCK_KERNELS=0, where each warp's row list fits the default shared
//                                memory; gather_reduce is the default: faster on the H100).
//   unpermute_bwd                one block per token: d_row = g[t] * w for each of its rows, and
//                                dprobs[t, e] = dot(g[t], row) (fixed-order block reduction) for routed pairs.
//                                Rows two a step; the LONE instance (16-byte packs, N < 2 T: K 1) takes a lone
//                                row two packs a step, the QUAD one (bf16 / fp16 16-byte packs, N >= 4 T) four rows.
//   scatter_rows                 one block per token: copies row t of any [T, ...] tensor (e.g. FP8 scales) to every
//                                row its row-map line names, zeroing spare and padding rows: permute's layout
//                                applied to more per-token data, with no routing tables.
//   pad_offsets                  aligned layout: each expert's kept count c_e, padded count roundup(c_e, align),
//                                its padding range (row map lines T + 1, T + 2) and the padded total. One block.
//
// The row map (int32 [T + 1, E]) is moe_raw's own index format (moe_raw/reference.py documents it):
//   r >= 0 routed to row r; -1 not routed or dropped; -2 - r padding copy in row r (drop_and_pad);
//   row_map[T, 0] = rows holding routed or padding tokens ("kept"); rows after it are spare zero rows.
//   Aligned layout (permute_and_pad): two more lines, row_map[T + 1, e] / row_map[T + 2, e] = the first / one past
//   the last zero padding row of expert e (each expert's rows padded to a multiple of align); kept = padded total.
//
// Workspace (int32, one allocation, W = ceil(T / 32) bit words, NB = ceil(T / 256) tiles per expert):
//   words [E, W] (uint32 bit columns) | word_prefix [E, W] (exclusive popcount prefix inside a tile) |
//   tile_sums [E, NB] | tile_base [E, NB] (exclusive scan over all tiles in expert-major order) |
//   expert_start [E + 1] (expert_start[E] = routed pairs in the map).
// The permuted row of routed pair (t, e) is tile_base[e, t/256] + word_prefix[e, t/32] + popc(bits of
// words[e, t/32] below t): a flat exclusive scan of the bit matrix in expert-major order. Two launches build the
// tables with no host sync (one when T <= 256); TE's mask path needs three and a dense int32 [T, E] scan.
//
// Launch shapes: routing_pack: grid = NB, block = 256 (one warp per 32 tokens, loops over experts).
//   routing_scan, pad_offsets: grid = 1, block = 1024 (routing_scan: a 33 KiB static stage of tile sums, unused
//   where E * NB <= 1024: one entry a thread).
//   Row kernels: block = 128 threads striding over the row in VB-byte packs; grid = T token blocks (gather_warp:
//   ceil(T / 4), a warp a token; permute_grouped: 256 threads, ceil(T / group) blocks of `group` tokens and
//   group * row bytes of stage), then tail blocks that zero spare rows (permute without the aligned layout: at most
//   256, striding over 32-row chunks; else one a chunk) and, in the aligned layout, P blocks per
//   expert that zero its padding rows. Dynamic shared memory holds the token's row list (gather_warp: one a warp;
//   permute_scatter's Hopper path: also a 16 KiB stage of the row; permute_small: (3 * E + 2) & ~1 ints of counts
//   in front).
//   Overlap: on sm_90, with 16-byte rows totalling >= 4 MiB and no host read since the map kernels (N given), the
//   host launches permute_scatter as a programmatic dependent launch. Its blocks start their row's stage fill and
//   read their token's routing-map entries (an input the map kernels only read), then pdl_wait() before reading
//   the tables; routing_pack / routing_scan / pad_offsets call pdl_trigger() first. Where the scan is one load a
//   thread (E * tiles <= 1024 tile sums), routing_scan is launched with overlap too, after routing_pack (pdl_wait()
//   before the tile sums): its launch is then under routing_pack, and the row kernel's blocks start during it.
// Preconditions (checked in moe_raw/permutation.py and moe_raw/_kernels/dispatch.py): rows contiguous in their
//   last dim, VB divides the row bytes, the row stride and both base addresses; T * E < 2^31; E <= 4096;
//   N < 2^31 - 2.
// Bytes moved (the benchmark's model): permute T*H*s + N*H*s (+ maps, probs); unpermute N*H*s + T*H*s;
//   unpermute backward with probs grad T*H*s + 2*N*H*s; map build ~T*E bytes of routing map + O(E*T/8);
//   permute_small adds T * E map reads a block (at most 4096 entries, L2 hits after the first block).

#include "common.cuh"

namespace moe_raw {

constexpr int kTileTokens = 256;  // routing_pack block: 8 warps x 32 tokens
constexpr int kRowThreads = 128;  // row kernels
constexpr int kTailRows = 32;     // spare rows zeroed per tail block

// Exclusive scan of count(i), i < m, by the whole block: each thread sums a contiguous run of i, one block scan
// of the run sums, then write(i, prefix) along each run (count(i) is read again after write(i, ...): not in place).
// Returns the total. Contains __syncthreads: call from every thread.
template <typename CountFn, typename WriteFn>
__device__ __forceinline__ int block_scan_runs(int64_t m, CountFn count, WriteFn write) {
  const int64_t per = (m + blockDim.x - 1) / blockDim.x;
  const int64_t beg = min(m, static_cast<int64_t>(threadIdx.x) * per), end = min(m, beg + per);
  int local = 0;
  for (int64_t i = beg; i < end; ++i) local += count(i);
  int total;
  int run = block_exclusive_scan(local, &total);
  for (int64_t i = beg; i < end; ++i) {
    write(i, run);
    run += count(i);
  }
  return total;
}

struct Tables {
  const uint32_t* words;
  const int* word_prefix;
  const int* tile_sums;
  const int* tile_base;
  const int* expert_start;
  int64_t n_words;
  int64_t n_tiles;
  __device__ Tables(const int* ws, int64_t num_tokens, int num_experts) {
    n_words = (num_tokens + 31) / 32;
    n_tiles = (num_tokens + kTileTokens - 1) / kTileTokens;
    const int64_t ew = n_words * num_experts, et = n_tiles * num_experts;
    words = reinterpret_cast<const uint32_t*>(ws);
    word_prefix = ws + ew;
    tile_sums = ws + 2 * ew;
    tile_base = ws + 2 * ew + et;
    expert_start = ws + 2 * ew + 2 * et;
  }
  // Routed pairs that precede (t, e) in expert-major order, counting every expert before e.
  __device__ __forceinline__ int flat_prefix(int e, int64_t t) const {
    return tile_base[e * n_tiles + (t >> 8)] + in_tile(e, t);
  }
  // Routed pairs of expert e among the tokens of t's 256-token tile before t (what routing_pack alone gives).
  __device__ __forceinline__ int in_tile(int e, int64_t t) const {
    const int64_t w = t >> 5;
    const uint32_t below = (1u << (t & 31)) - 1u;
    return word_prefix[e * n_words + w] + __popc(words[e * n_words + w] & below);
  }
  // Routed pairs of experts before e; start(E) = all routed pairs.
  __device__ __forceinline__ int start(int e) const { return expert_start[e]; }
};

// Aligned layout (pad_ranges = row map line T + 1): what to add to a pair's flat prefix for its row, since expert
// e's rows start where expert e - 1's padding ends. 0 without the aligned layout (pad_ranges null).
template <typename Prefix>
__device__ __forceinline__ int aligned_offset(const Prefix& tab, const int* pad_ranges, int num_experts, int e) {
  return pad_ranges ? (e ? pad_ranges[num_experts + e - 1] : 0) - tab.start(e) : 0;
}

// What Tables gives, for one token t only, counted by the whole block straight from the routing map (T * E map
// reads per block: the host uses it for small maps only). smem: 3 * E + 1 ints, count[E] (routed tokens of each
// expert), start[E + 1] (their exclusive scan; start[E] = all routed pairs), before[E] (the routed tokens of each
// expert before t). The constructor contains __syncthreads: build it in every thread.
struct MapPrefix {
  const int* start_;
  const int* before_;
  __device__ MapPrefix(int* smem, const void* routing_map, int map_bytes, int64_t map_st, int64_t map_se,
                       int num_tokens, int num_experts, int64_t t) {
    int* count = smem;
    int* start = smem + num_experts;
    int* before = smem + 2 * num_experts + 1;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) count[e] = before[e] = 0;
    __syncthreads();
    const int entries = num_tokens * num_experts;  // T * E < 2^31 (checked on the host)
#pragma unroll 4
    for (int i = threadIdx.x; i < entries; i += blockDim.x) {
      const int tt = i / num_experts, e = i - tt * num_experts;
      if (map_entry(routing_map, map_bytes, tt * map_st + e * map_se)) {
        atomicAdd(&count[e], 1);  // integer counts: the same whatever the order (deterministic)
        if (tt < t) atomicAdd(&before[e], 1);
      }
    }
    __syncthreads();
    const int total = block_scan_runs(
        num_experts, [&](int64_t e) { return count[e]; }, [&](int64_t e, int prefix) { start[e] = prefix; });
    if (threadIdx.x == 0) start[num_experts] = total;
    __syncthreads();
    start_ = start;
    before_ = before;
  }
  __device__ __forceinline__ int flat_prefix(int e, int64_t) const { return start_[e] + before_[e]; }
  __device__ __forceinline__ int start(int e) const { return start_[e]; }
};

// Exclusive scan of tile_sums in flat order -> tile_base, expert_start. Run by one whole block of kThreads, in
// rounds of kScanPerThread * kThreads entries staged in shared memory: global loads and stores coalesced (a warp
// moves 128 contiguous bytes an instruction), each thread's run of kScanPerThread entries read from the stage, one
// block scan of the run sums a round. Reading runs straight from global memory (block_scan_runs) made each warp load
// touch 32 lines: the one SM's L1 throughput bound it, 10.7 us for Qwen3-30B-A3B's 8192 entries on an H100 against
// 4.2 us for Mixtral's 512 (ncu, bench/results/2026-12-05-h100-phased), on permute's critical path.
constexpr int kScanPerThread = 8;
// Stage index of entry j: one word of padding every 32, so that a warp reading its 32 runs (j = 8 * lane + k) hits 32
// different banks.
__device__ __forceinline__ int scan_slot(int j) { return j + (j >> 5); }

// kThreads: blockDim.x, which sizes the stage (routing_scan 1024: 33 KiB; routing_pack 256: 8.25 KiB).
template <int kThreads>
__device__ void scan_tiles(int* ws, int64_t num_tokens, int num_experts) {
  constexpr int kStage = kScanPerThread * kThreads;
  __shared__ int stage[kStage + kStage / 32];
  const int64_t n_words = (num_tokens + 31) / 32, n_tiles = (num_tokens + kTileTokens - 1) / kTileTokens;
  const int64_t ew = n_words * num_experts, m = n_tiles * num_experts;
  const int* tile_sums = ws + 2 * ew;
  int* tile_base = ws + 2 * ew + m;
  int* expert_start = ws + 2 * ew + 2 * m;
  const int beg = kScanPerThread * static_cast<int>(threadIdx.x);
  if (m <= kThreads) {  // one entry a thread, straight from global memory (coalesced): no stage, one block scan
    const int i = threadIdx.x;
    const int v = i < m ? tile_sums[i] : 0;
    int total;
    const int prefix = block_exclusive_scan(v, &total);
    if (i < m) {
      tile_base[i] = prefix;
      if (i % n_tiles == 0) expert_start[i / n_tiles] = prefix;
    }
    if (threadIdx.x == 0) expert_start[num_experts] = total;
    return;
  }
  int carry = 0;
  for (int64_t base = 0; base < m; base += kStage) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kStage), m - base));
    for (int j = threadIdx.x; j < n; j += kThreads) stage[scan_slot(j)] = tile_sums[base + j];
    __syncthreads();
    int v[kScanPerThread];
    int local = 0;
#pragma unroll
    for (int k = 0; k < kScanPerThread; ++k) {
      v[k] = beg + k < n ? stage[scan_slot(beg + k)] : 0;
      local += v[k];
    }
    int total;
    int run = carry + block_exclusive_scan(local, &total);
#pragma unroll
    for (int k = 0; k < kScanPerThread; ++k) {  // each thread overwrites only its own run
      if (beg + k < n) stage[scan_slot(beg + k)] = run;
      run += v[k];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += kThreads) tile_base[base + j] = stage[scan_slot(j)];
    // expert e starts at entry e * n_tiles: those of this round
    for (int64_t e = (base + n_tiles - 1) / n_tiles + threadIdx.x; e * n_tiles < base + n; e += kThreads)
      expert_start[e] = stage[scan_slot(static_cast<int>(e * n_tiles - base))];
    carry += total;
    __syncthreads();  // the stage is refilled next round
  }
  if (threadIdx.x == 0) expert_start[num_experts] = carry;
}

// Bit j of the result: byte j of the 16 bytes is nonzero.
__device__ __forceinline__ uint32_t nonzero_byte_mask(uint4 v) {
  uint32_t m = 0;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t b = __vcmpne4(w[k], 0u);  // 0xff in each nonzero byte
    m |= (((b >> 7) & 1u) | ((b >> 14) & 2u) | ((b >> 21) & 4u) | ((b >> 28) & 8u)) << (4 * k);
  }
  return m;
}

// Block (tile, group): 256 tokens x 32-expert groups (grid.y strides over groups). Writes the bit columns, the
// in-tile word prefixes and the tile sums. A single-block grid (T <= 256) also runs the scan: one launch in all.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) routing_pack(const void* __restrict__ routing_map, int map_bytes,
                                                         int64_t map_st, int64_t map_se, int64_t num_tokens,
                                                         int num_experts, int* __restrict__ ws) {
  static_assert(kThreads == kTileTokens, "one thread per token of the tile");
  pdl_trigger();  // a single-block pack is the last map kernel: the row kernel may start loading rows now
  __shared__ int warp_count[kThreads / 32][32];
  const int64_t n_words = (num_tokens + 31) / 32, n_tiles = (num_tokens + kTileTokens - 1) / kTileTokens;
  uint32_t* words = reinterpret_cast<uint32_t*>(ws);
  int* word_prefix = ws + n_words * num_experts;
  int* tile_sums = ws + 2 * n_words * num_experts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x;
  const int64_t t = tile * kTileTokens + threadIdx.x;
  const int64_t w = tile * (kTileTokens / 32) + warp;
  const bool have_token = t < num_tokens;
  // A byte map with unit expert stride and 16-byte aligned rows is read 32 experts in two 16-byte loads.
  const bool vector_rows = map_bytes == 1 && map_se == 1 && map_st % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(routing_map) % 16 == 0;
  for (int e0 = blockIdx.y * 32; e0 < num_experts; e0 += gridDim.y * 32) {
    const int ne = min(32, num_experts - e0);
    uint32_t bits = 0;  // bit j: token t routes to expert e0 + j
    if (have_token) {
      if (vector_rows && ne == 32) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(routing_map) + t * map_st + e0);
        bits = nonzero_byte_mask(p[0]) | (nonzero_byte_mask(p[1]) << 16);
      } else {
        for (int j = 0; j < ne; ++j)
          bits |= static_cast<uint32_t>(map_entry(routing_map, map_bytes, t * map_st + (e0 + j) * map_se)) << j;
      }
    }
    uint32_t my_word = 0;  // lane j keeps the word of expert e0 + j
    for (int j = 0; j < ne; ++j) {
      const uint32_t word = __ballot_sync(0xffffffffu, (bits >> j) & 1u);
      if (lane == j) my_word = word;
    }
    if (lane < ne && w < n_words) words[(e0 + lane) * n_words + w] = my_word;
    warp_count[warp][lane] = __popc(my_word);
    __syncthreads();
    if (threadIdx.x < ne) {
      const int e = e0 + threadIdx.x;
      int run = 0;
      for (int k = 0; k < kThreads / 32; ++k) {
        const int64_t ww = tile * (kTileTokens / 32) + k;
        if (ww < n_words) word_prefix[e * n_words + ww] = run;
        run += warp_count[k][threadIdx.x];
      }
      tile_sums[e * n_tiles + tile] = run;
    }
    __syncthreads();
  }
  if (gridDim.x == 1 && gridDim.y == 1) scan_tiles<kThreads>(ws, num_tokens, num_experts);
}

// ws without __restrict__: launched with overlap, routing_pack (the kernel ahead) writes its tile sums (common.cuh).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) routing_scan(int* ws, int64_t num_tokens, int num_experts) {
  pdl_trigger();  // the row kernel, launched with overlap after it, loads its first rows while this block scans
  pdl_wait();     // launched with overlap after routing_pack: the tile sums are complete from here on
  scan_tiles<kThreads>(ws, num_tokens, num_experts);
}

// Aligned layout, after the tables: expert e keeps c_e of its routed pairs (those among the first n_keep in
// expert-major order) and gets roundup(c_e, align) rows. Writes tokens_per_expert[e] = c_e, padded_counts[e],
// pad_ranges[e] / pad_ranges[E + e] = its first / one-past-last padding row (the row map's lines T + 1, T + 2)
// and the padded total to kept_out (the row map's [T, 0]). One block; the sums fit int32 (checked on the host).
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    pad_offsets(const int* __restrict__ ws, int64_t num_tokens, int num_experts, int64_t n_keep, int align,
                int* __restrict__ pad_ranges, int* __restrict__ kept_out, int64_t* __restrict__ tokens_per_expert,
                int64_t* __restrict__ padded_counts) {
  pdl_trigger();  // the aligned layout's last map kernel: the row kernel may start loading rows now
  const Tables tab(ws, num_tokens, num_experts);
  int carry = 0;
  for (int e0 = 0; e0 < num_experts; e0 += kThreads) {
    const int e = e0 + threadIdx.x;
    int count = 0, padded = 0;
    if (e < num_experts) {
      const int64_t end = tab.expert_start[e + 1], start_e = tab.expert_start[e];
      count = static_cast<int>(min(end, n_keep) - min(start_e, n_keep));
      padded = (count + align - 1) / align * align;
    }
    int total;
    const int start = carry + block_exclusive_scan(padded, &total);
    if (e < num_experts) {
      tokens_per_expert[e] = count;
      padded_counts[e] = padded;
      pad_ranges[e] = start + count;
      pad_ranges[num_experts + e] = start + padded;
    }
    carry += total;
  }
  if (threadIdx.x == 0) *kept_out = carry;
}

// Zero rows [r0, r1) of a [n, row_bytes] tensor (and their sorted_indices / permuted_probs entries) with one block.
template <int VB>
__device__ void zero_rows(uint8_t* dst, int64_t row_bytes, int64_t r0, int64_t r1, int64_t* sorted_indices,
                          void* permuted_probs, int probs_code) {
  using V = typename Vec<VB>::type;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    if (sorted_indices) sorted_indices[r] = 0;
    if (permuted_probs) store_scalar<float>(permuted_probs, probs_code, r, 0.f);
  }
  if (!dst) return;
  const int64_t nvec = row_bytes / VB;
  const V zero{};
  for (int64_t r = r0; r < r1; ++r) {
    V* d = reinterpret_cast<V*>(dst + r * row_bytes);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) d[v] = zero;
  }
}

// Blocks past the T token blocks of a row kernel (`block` counts from the first of them; the grid ends with them).
// Without the aligned layout they zero the spare rows [kept, n_rows) in 32-row chunks, chunk i by tail block i mod
// (the tail blocks): the host may launch fewer than the ceil(n_rows / 32) chunks (permute launches at most 256:
// one a chunk was thousands of blocks that, with no spare row, only read the routed count, each holding a row
// kernel's shared memory while it did). In the aligned layout the first ceil(n_rows / 32) take a chunk each, then P
// blocks per expert zero its padding rows, P = (the blocks left) / E, chosen by the host: block j of expert e takes
// rows j * 32 .. j * 32 + 31 of the range, then every P * 32 rows after. One block per expert (P = 1) left an
// expert's whole padding (up to align - 1 rows) to one block, the grid's last ones: a long tail at align 128.
// Aligned layout: expert e's padding rows are [pad_ranges[e], pad_ranges[E + e]) (fewer than align rows).
template <int VB>
__device__ void zero_unowned_rows(uint8_t* dst, int64_t row_bytes, int64_t kept, int64_t n_rows, int64_t block,
                                  const int* pad_ranges, int num_experts, int64_t* sorted_indices,
                                  void* permuted_probs, int probs_code) {
  const int64_t n_tail = (n_rows + kTailRows - 1) / kTailRows;
  if (!pad_ranges) {
    const int64_t tail_grid = gridDim.x - (static_cast<int64_t>(blockIdx.x) - block);
    for (int64_t i = block; i < n_tail; i += tail_grid)
      zero_rows<VB>(dst, row_bytes, max(kept, i * kTailRows), min(n_rows, (i + 1) * kTailRows), sorted_indices,
                    permuted_probs, probs_code);
    return;
  }
  if (block < n_tail) {  // tail block i takes rows [32 i, 32 i + 32) past kept
    zero_rows<VB>(dst, row_bytes, max(kept, block * kTailRows), min(n_rows, (block + 1) * kTailRows), sorted_indices,
                  permuted_probs, probs_code);
  } else {
    const int64_t grid = gridDim.x, first = static_cast<int64_t>(blockIdx.x) - block;  // the first non-token block
    const int64_t per_expert = (grid - first - n_tail) / num_experts;                   // P
    const int64_t i = block - n_tail;
    const int e = static_cast<int>(i / per_expert);
    const int64_t end = pad_ranges[num_experts + e];
    for (int64_t r = pad_ranges[e] + (i % per_expert) * kTailRows; r < end; r += per_expert * kTailRows)
      zero_rows<VB>(dst, row_bytes, r, min(end, r + kTailRows), sorted_indices, permuted_probs, probs_code);
  }
}

// Routed or padding pair (t, e): its permuted row (-1 if none: not routed, dropped, or no padding slot), with its
// row-map entry, sorted_indices and permuted_probs entries written. Tab: Tables or MapPrefix.
template <class Prefix>
__device__ __forceinline__ int place_pair(const Prefix& tab, int64_t t, int e, bool routed, int num_experts,
                                          int drop_and_pad, int64_t capacity, int* __restrict__ row_map,
                                          int64_t* __restrict__ sorted_indices, const void* __restrict__ probs,
                                          int probs_code, int64_t probs_st, int64_t probs_se,
                                          void* __restrict__ permuted_probs, int64_t n_keep,
                                          const int* pad_ranges) {
  int row = -1;  // this pair's permuted row, -1 if none
  // The prob is loaded with the table words (one trip to memory for both, not one after them), and only where the
  // map routes: an off-route NaN never reaches the output. A double carries every probs dtype exactly.
  const double p =
      routed && permuted_probs ? load_scalar<double>(probs, probs_code, t * probs_st + e * probs_se) : 0.0;
  if (!drop_and_pad) {
    if (routed) {
      const int before = tab.flat_prefix(e, t);  // routed pairs before (t, e), experts < e included
      if (before < n_keep) row = before + aligned_offset(tab, pad_ranges, num_experts, e);
    }
  } else {
    const int start = tab.start(e), count = tab.start(e + 1) - start;
    if (routed || count < capacity) {  // an unrouted token matters only if the expert has padding slots
      const int rank = tab.flat_prefix(e, t) - start;  // routed tokens of expert e before t
      if (routed) {
        if (rank < capacity) row = static_cast<int>(e * capacity + rank);
      } else {
        // The seed's stable descending argsort: after the routed tokens, the lowest unrouted ids pad.
        const int64_t slot = static_cast<int64_t>(count) + (t - rank);
        if (slot < capacity) row = static_cast<int>(e * capacity + slot);
      }
    }
  }
  if (row_map) row_map[t * num_experts + e] = row < 0 ? -1 : (routed ? row : -2 - row);
  if (row >= 0) {
    if (sorted_indices) sorted_indices[row] = t;
    if (permuted_probs) store_scalar<double>(permuted_probs, probs_code, row, p);
  }
  return row;
}

// Permute forward (pure byte move) of one block: block t < T takes token t; blocks t >= T zero spare rows
// (num_out_tokens above the routed count). With src == nullptr it only writes the row map (unpermute(fused=False)
// rebuilding it). Aligned layout (pad_ranges = row map line T + 1, filled by pad_offsets): routed pair (t, e) among
// the first n_keep goes to row pad_start(e) + its rank in expert e; blocks after the tail blocks zero each expert's
// padding. Prefix (Tables or MapPrefix) gives each pair's place in expert-major order; dest_rows: 2 * E ints of
// shared memory (this token's rows in ascending expert order, then scratch), then (Hopper, 16-byte rows) the stage.
template <int VB, class Prefix>
__device__ __forceinline__ void scatter_token(
    const Prefix& tab, int* dest_rows, const uint8_t* __restrict__ src, int64_t src_stride, uint8_t* __restrict__ dst,
    int64_t row_bytes, int64_t num_tokens, int num_experts, int64_t n_rows, int drop_and_pad, int64_t capacity,
    const void* __restrict__ routing_map, int map_bytes, int64_t map_st, int64_t map_se, int* __restrict__ row_map,
    int64_t* __restrict__ sorted_indices, const void* __restrict__ probs, int probs_code, int64_t probs_st,
    int64_t probs_se, void* __restrict__ permuted_probs, int64_t n_keep, const int* pad_ranges) {
  using V = typename Vec<VB>::type;
  const int64_t t = blockIdx.x;
#ifdef MOE_RAW_BULK_COPY
  // Hopper, 16-byte rows: the stage (kStageBytes of the row at a time) after the 2 * E ints. Its first fill starts
  // here, before the places are looked up (map entry -> tables -> row map: two dependent trips to memory that the
  // row does not depend on), so the row's load overlaps them instead of following them. It starts before pdl_wait
  // too: launched with overlap, the first blocks load their rows while the map kernels finish (they write only the
  // tables, ws).
  constexpr int kStageBytes = 16384;  // moe_raw/_kernels/dispatch.py _STAGE_BYTES sizes the shared memory
  uint8_t* stage = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(dest_rows + 2 * num_experts) + 127) & ~static_cast<uintptr_t>(127));
  auto fill_stage = [&](int64_t off, int bytes) {  // starts this thread's share of the stage fill (cp.async)
    const uint8_t* s = src + t * src_stride + off;
    for (int v = threadIdx.x; v < bytes / 16; v += blockDim.x) stage_fill16(stage + 16 * v, s + 16 * v);
  };
  if constexpr (VB == 16) {
    if (src && t < num_tokens) fill_stage(0, static_cast<int>(min(static_cast<int64_t>(kStageBytes), row_bytes)));
  }
#endif
  // This thread's experts (a contiguous run of at most 32: E <= 4096, 128 threads) and whether token t routes to
  // each, read before pdl_wait: the routing map is an input the map kernels only read, so launched with overlap the
  // first blocks have it when the tables are done, and later blocks issue it with the stage fill.
  const int per = (num_experts + blockDim.x - 1) / blockDim.x;
  const int e_beg = min(num_experts, static_cast<int>(threadIdx.x) * per), e_end = min(num_experts, e_beg + per);
  uint32_t routed = 0;  // bit e - e_beg
  if (t < num_tokens)
    for (int e = e_beg; e < e_end; ++e)
      routed |= static_cast<uint32_t>(map_entry(routing_map, map_bytes, t * map_st + e * map_se)) << (e - e_beg);
  pdl_wait();  // the tables (and, in the aligned layout, pad_ranges) are complete from here on
  const int64_t total = tab.start(num_experts);
  const int64_t kept =
      drop_and_pad ? n_rows : (pad_ranges ? pad_ranges[2 * num_experts - 1] : min(total, n_rows));
  if (t >= num_tokens) {
    zero_unowned_rows<VB>(dst, row_bytes, kept, n_rows, t - num_tokens, pad_ranges, num_experts, sorted_indices,
                          permuted_probs, probs_code);
    return;
  }
  if (t == 0 && row_map) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) row_map[num_tokens * num_experts + e] = e == 0 ? kept : 0;
  }
  // Each thread places a contiguous run of experts: the bulk-copy path sends the row to those rows itself; the
  // register path compacts all of them with one block scan in ascending expert order whatever E is (a scan per 128
  // experts cost DeepSeek-V3's E = 256 a second round of barriers).
  int* scratch = dest_rows + num_experts;  // [num_experts]: the row of each expert, -1 if none
  int mine = 0;
  for (int e = e_beg; e < e_end; ++e) {
    const int row = place_pair(tab, t, e, (routed >> (e - e_beg)) & 1u, num_experts, drop_and_pad, capacity, row_map,
                               sorted_indices, probs, probs_code, probs_st, probs_se, permuted_probs, n_keep,
                               pad_ranges);
    if (row >= 0) ++mine;
    scratch[e] = row;
  }
  if (!src) return;
#ifdef MOE_RAW_BULK_COPY
  if constexpr (VB == 16) {
    // Hopper: the token row goes through the stage in shared memory (kStageBytes at a time, the first fill started
    // above), then each thread has the bulk-copy engine write it to the rows of its own experts
    // (scratch[e_beg, e_end), which this thread wrote): one instruction per destination, and no block scan to
    // gather the row list (its barriers held half the warps' cycles, ncu on the H200). One barrier per chunk: the
    // stage is complete.
    for (int64_t off = 0; off < row_bytes; off += kStageBytes) {
      const int bytes = static_cast<int>(min(static_cast<int64_t>(kStageBytes), row_bytes - off));
      if (off) fill_stage(off, bytes);
      stage_fill_wait();
      bulk_fence_shared();
      __syncthreads();
      if (mine) {
        for (int e = e_beg; e < e_end; ++e)
          if (scratch[e] >= 0) bulk_store(dst + static_cast<int64_t>(scratch[e]) * row_bytes + off, stage, bytes);
        bulk_commit();
        bulk_wait_read();
      }
      if (off + kStageBytes < row_bytes) __syncthreads();  // every copy has read the stage before it is refilled
    }
    return;
  }
#endif
  // Register stores: one block scan compacts the token's rows in ascending expert order for every thread.
  int n;
  int pos = block_exclusive_scan(mine, &n);
  for (int e = e_beg; e < e_end; ++e)
    if (scratch[e] >= 0) dest_rows[pos++] = scratch[e];
  __syncthreads();
  const int64_t nvec = row_bytes / VB;
  const V* s = reinterpret_cast<const V*>(src + t * src_stride);
  constexpr int kUnroll = 4;  // loads in flight per thread before the K stores
  int64_t v = threadIdx.x;
  for (; v + (kUnroll - 1) * blockDim.x < nvec; v += kUnroll * blockDim.x) {
    V x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = s[v + u * blockDim.x];
    for (int j = 0; j < n; ++j) {
      V* d = reinterpret_cast<V*>(dst + static_cast<int64_t>(dest_rows[j]) * row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) __stcs(d + v + u * blockDim.x, x[u]);  // streaming: no reuse in L2
    }
  }
  for (; v < nvec; v += blockDim.x) {
    const V x = s[v];
    for (int j = 0; j < n; ++j) __stcs(reinterpret_cast<V*>(dst + static_cast<int64_t>(dest_rows[j]) * row_bytes) + v, x);
  }
}

// permute_scatter: the row kernel of permute / permute_and_pad, places from the routing tables (routing_pack +
// routing_scan, or pad_offsets after them).
template <int VB>
__global__ void __launch_bounds__(kRowThreads, 12)  // <= 40 registers: 12 blocks per SM (48 registers allowed only 10)
    permute_scatter(const uint8_t* __restrict__ src, int64_t src_stride, uint8_t* __restrict__ dst, int64_t row_bytes,
                    int64_t num_tokens, int num_experts, int64_t n_rows, int drop_and_pad, int64_t capacity,
                    const void* __restrict__ routing_map, int map_bytes, int64_t map_st, int64_t map_se,
                    const int* ws, int* __restrict__ row_map, int64_t* __restrict__ sorted_indices,
                    const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                    void* __restrict__ permuted_probs, int64_t n_keep, const int* pad_ranges) {
  // ws and pad_ranges without __restrict__: the kernel ahead writes them (common.cuh pdl_wait)
  extern __shared__ int smem[];  // scatter_token's 2 * E ints and stage
  const Tables tab(ws, num_tokens, num_experts);
  scatter_token<VB>(tab, smem, src, src_stride, dst, row_bytes, num_tokens, num_experts, n_rows, drop_and_pad,
                    capacity, routing_map, map_bytes, map_st, map_se, row_map, sorted_indices, probs, probs_code,
                    probs_st, probs_se, permuted_probs, n_keep, pad_ranges);
}

// permute_grouped: permute_scatter's work for `group` consecutive tokens a block (group divides 32, so they are bits
// [t0 % 32, t0 % 32 + group) of one bit word of the tables), on sm_90 with 16-byte rows of at most kStageBytes, E <=
// kGroupThreads * kGroupExperts, and no drop_and_pad (the host checks all of it; permute_scatter serves the rest). Why:
// staging several whole rows a block is what lifted a lookup-free mover to 91-97% of copy (bench.probe_permute
// --phased, H100), and fused per-token lookups took that gain away when they grew with the batch. Here the lookups do
// not grow with it: each thread reads three words per expert it owns (the bit word, its word prefix, its tile base;
// launched unscanned it sums the expert's tile sums instead, tile_bases), and every (token, expert) row of the group
// follows in registers from them (the Tables formula: tile_base + word_prefix + popc of the word's bits below the
// token). Order: start the cp.async fill of the group's rows; look up; write the group's row-map lines (coalesced),
// sorted_indices and permuted_probs; wait for the fill; bulk-store every routed row from the stage. Blocks after ceil(T
// / group) zero spare and padding rows as permute_scatter's tail blocks do. Shared memory: group * row_bytes (the
// stage, 128-aligned).
// KE: the experts a thread owns (1 where E <= kGroupThreads, else kGroupExperts). At KE 1 the kernel takes 38-40
// registers, at KE 4 60 (before KE every E took 62). Registers would allow 6 blocks of 256 a SM at KE 1, but where the
// host takes this kernel the stage sets it: 2 blocks at DeepSeek-V3's 112 KiB, 3 at T16k-E128-K6's 64 KiB, 21.5-21.9%
// achieved occupancy and 82.6-82.9% of the DRAM peak under ncu on an H100 (bench/results/2026-12-06-h100-nineteenth).
constexpr int kGroupThreads = 256;
constexpr int kGroupExperts = 4;  // experts a thread owns at most: E <= 1024
static_assert(kGroupThreads * kGroupExperts == 1024, "moe_raw/_kernels/dispatch.py _GROUP_MAX_EXPERTS");

// What routing_scan writes, for one block's experts, counted from routing_pack's tile sums in the block itself (the
// host skips routing_scan for permute_grouped with the row count given and at most 16 tiles, so that no row waits for a
// one-block kernel's launch and latency, 4-6 us under ncu on an H100, whatever the scan's size): expert e_k =
// threadIdx.x + k * blockDim.x sums its row of tile sums (n_tiles ints, L2 hits: routing_pack has just written them)
// whole and up to `tile`, and one block scan per round of blockDim.x experts, in expert order, gives each expert's
// start. base[k] = tile_base[e_k, tile]: the routed pairs before the first token of `tile` in expert-major order.
// Returns all routed pairs (expert_start[E]). Contains __syncthreads: call from every thread.
template <int KE>
__device__ __forceinline__ int64_t tile_bases(const Tables& tab, int num_experts, int64_t tile, int (&base)[KE]) {
  int carry = 0;
#pragma unroll
  for (int k = 0; k < KE; ++k) {
    base[k] = 0;
    if (k * static_cast<int>(blockDim.x) >= num_experts) continue;  // the same k for every thread: barriers agree
    const int e = threadIdx.x + k * blockDim.x;
    int sum = 0, before = 0;
    if (e < num_experts) {
      const int* row = tab.tile_sums + static_cast<int64_t>(e) * tab.n_tiles;
      constexpr int kLoads = 8;  // loads in flight a thread (16 took 8 more registers at KE 1)
      for (int64_t i0 = 0; i0 < tab.n_tiles; i0 += kLoads) {
        int c[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) c[u] = i0 + u < tab.n_tiles ? row[i0 + u] : 0;
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          sum += c[u];
          if (i0 + u < tile) before += c[u];
        }
      }
    }
    int round_total;
    base[k] = carry + block_exclusive_scan(sum, &round_total) + before;
    carry += round_total;
  }
  return carry;
}

template <int VB, int KE>
__global__ void __launch_bounds__(kGroupThreads)
    permute_grouped(const uint8_t* __restrict__ src, int64_t src_stride, uint8_t* __restrict__ dst, int64_t row_bytes,
                    int64_t num_tokens, int num_experts, int64_t n_rows, int drop_and_pad, int64_t capacity,
                    const void* __restrict__ routing_map, int map_bytes, int64_t map_st, int64_t map_se,
                    const int* ws, int* __restrict__ row_map, int64_t* __restrict__ sorted_indices,
                    const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                    void* __restrict__ permuted_probs, int64_t n_keep, const int* pad_ranges, int group, int scanned) {
  // ws and pad_ranges without __restrict__: the kernel ahead writes them (common.cuh pdl_wait)
  static_assert(VB == 16, "16-byte rows only");
  static_assert(KE == 1 || KE == kGroupExperts, "KE: 1 or kGroupExperts");
#ifdef MOE_RAW_BULK_COPY
  {
    extern __shared__ __align__(128) uint8_t group_stage[];
    const int64_t token_blocks = (num_tokens + group - 1) / group;
    const int64_t t0 = static_cast<int64_t>(blockIdx.x) * group;
    const int n = blockIdx.x < token_blocks ? static_cast<int>(min(static_cast<int64_t>(group), num_tokens - t0)) : 0;
    const int vecs = static_cast<int>(row_bytes / 16);
    // The fill starts before pdl_wait: launched with overlap, the first blocks load their rows while the map
    // kernels finish (those write only the tables and pad_ranges, which nothing here reads before the wait).
    for (int i = threadIdx.x; i < n * vecs; i += blockDim.x) {
      const int j = i / vecs, v = i - j * vecs;
      stage_fill16(group_stage + static_cast<int64_t>(j) * row_bytes + 16 * v, src + (t0 + j) * src_stride + 16 * v);
    }
    pdl_wait();
    const Tables tab(ws, num_tokens, num_experts);
    int base[KE] = {};  // scanned == 0: tile_base[e_k, t0's tile], counted here
    const int64_t total = scanned ? tab.start(num_experts) : tile_bases<KE>(tab, num_experts, t0 >> 8, base);
    const int64_t kept = pad_ranges ? pad_ranges[2 * num_experts - 1] : min(total, n_rows);
    if (blockIdx.x >= token_blocks) {
      zero_unowned_rows<VB>(dst, row_bytes, kept, n_rows, blockIdx.x - token_blocks, pad_ranges, num_experts,
                            sorted_indices, permuted_probs, probs_code);
      return;
    }
    if (t0 == 0 && row_map) {
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
        row_map[num_tokens * num_experts + e] = e == 0 ? static_cast<int>(kept) : 0;
    }
    // This thread's experts e = threadIdx.x + k * blockDim.x: the group's bits of e's word (bit j: token t0 + j
    // routes to e), the routed pairs before (t0, e) in expert-major order, and the row offset of e's layout.
    const int64_t w = t0 >> 5;
    const int shift = static_cast<int>(t0 & 31);
    const uint32_t group_mask = n == 32 ? 0xffffffffu : (1u << n) - 1u;
    uint32_t bits[KE];
    int before[KE], offset[KE];
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = threadIdx.x + k * blockDim.x;
      bits[k] = 0u;
      before[k] = offset[k] = 0;
      if (e < num_experts) {
        bits[k] = (tab.words[e * tab.n_words + w] >> shift) & group_mask;
        before[k] = (scanned ? tab.tile_base[e * tab.n_tiles + (t0 >> 8)] : base[k]) + tab.in_tile(e, t0);
        offset[k] = aligned_offset(tab, pad_ranges, num_experts, e);
      }
    }
    // The row of (t0 + j, e_k), -1 if not routed or past n_keep.
    auto row_of = [&](int k, int j) {
      if (!((bits[k] >> j) & 1u)) return -1;
      const int b = before[k] + __popc(bits[k] & ((1u << j) - 1u));
      return b < n_keep ? b + offset[k] : -1;
    };
    // kLookupBatch tokens at a time: their probs loads are issued together, then their stores, so a thread waits
    // one load latency a batch rather than one a token (a group of 16-32 tokens was a chain of 16-32 dependent
    // load -> store steps).
    constexpr int kLookupBatch = 4;  // 8 took 8 more registers at KE 1
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = threadIdx.x + k * blockDim.x;
      if (e >= num_experts) continue;
      for (int j0 = 0; j0 < n; j0 += kLookupBatch) {
        int rows[kLookupBatch];
        double p[kLookupBatch];  // a double carries every probs dtype exactly
#pragma unroll
        for (int u = 0; u < kLookupBatch; ++u) {
          rows[u] = j0 + u < n ? row_of(k, j0 + u) : -1;
          p[u] = permuted_probs && rows[u] >= 0
                     ? load_scalar<double>(probs, probs_code, (t0 + j0 + u) * probs_st + e * probs_se)
                     : 0.0;
        }
#pragma unroll
        for (int u = 0; u < kLookupBatch; ++u) {
          const int64_t t = t0 + j0 + u;
          if (row_map && j0 + u < n) row_map[t * num_experts + e] = rows[u];
          if (rows[u] >= 0) {
            if (sorted_indices) sorted_indices[rows[u]] = t;
            if (permuted_probs) store_scalar<double>(permuted_probs, probs_code, rows[u], p[u]);
          }
        }
      }
    }
    stage_fill_wait();
    bulk_fence_shared();
    __syncthreads();
    bool issued = false;
    for (int j = 0; j < n; ++j) {
#pragma unroll
      for (int k = 0; k < KE; ++k) {
        const int row = row_of(k, j);
        if (row >= 0) {
          bulk_store(dst + static_cast<int64_t>(row) * row_bytes, group_stage + static_cast<int64_t>(j) * row_bytes,
                     static_cast<int>(row_bytes));
          issued = true;
        }
      }
    }
    if (issued) {
      bulk_commit();
      bulk_wait_read();
    }
  }
#else
  __trap();  // the host launches it only where the bulk-copy path is compiled (sm_90+)
#endif
}

// permute_small: permute_scatter without the tables, for small maps (the host takes it when T * E <= 4096, E <=
// 1024 and there is no aligned layout): each block counts the whole map itself (MapPrefix), so a small permute is
// one launch instead of two. Same parameters (ws unused); shared memory (3 * E + 2) & ~1 more ints, in front.
template <int VB>
__global__ void __launch_bounds__(kRowThreads)
    permute_small(const uint8_t* __restrict__ src, int64_t src_stride, uint8_t* __restrict__ dst, int64_t row_bytes,
                  int64_t num_tokens, int num_experts, int64_t n_rows, int drop_and_pad, int64_t capacity,
                  const void* __restrict__ routing_map, int map_bytes, int64_t map_st, int64_t map_se,
                  const int* __restrict__ ws, int* __restrict__ row_map, int64_t* __restrict__ sorted_indices,
                  const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                  void* __restrict__ permuted_probs, int64_t n_keep, const int* __restrict__ pad_ranges) {
  extern __shared__ int smem[];  // MapPrefix's 3 * E + 1 ints (rounded up to even), then scatter_token's
  const MapPrefix tab(smem, routing_map, map_bytes, map_st, map_se, static_cast<int>(num_tokens), num_experts,
                      blockIdx.x);
  scatter_token<VB>(tab, smem + ((3 * num_experts + 2) & ~1), src, src_stride, dst, row_bytes, num_tokens,
                    num_experts, n_rows, drop_and_pad, capacity, routing_map, map_bytes, map_st, map_se, row_map,
                    sorted_indices, probs, probs_code, probs_st, probs_se, permuted_probs, n_keep, pad_ranges);
}

// dst[row] = src[t] for every row of token t in the row map (routed r, padding copy -2 - r); blocks t >= T zero the
// spare rows [kept, n_rows) and, in the aligned layout (pad_ranges = row map line T + 1), each expert's padding.
template <int VB>
__global__ void __launch_bounds__(kRowThreads)
    scatter_rows(const uint8_t* __restrict__ src, int64_t src_stride, uint8_t* __restrict__ dst, int64_t row_bytes,
                 int64_t num_tokens, int num_experts, int64_t n_rows, const int* __restrict__ row_map,
                 const int* __restrict__ pad_ranges) {
  using V = typename Vec<VB>::type;
  extern __shared__ int dest_rows[];  // [num_experts]
  const int64_t t = blockIdx.x;
  if (t >= num_tokens) {
    zero_unowned_rows<VB>(dst, row_bytes, row_map[num_tokens * num_experts], n_rows, t - num_tokens, pad_ranges,
                          num_experts, nullptr, nullptr, 0);
    return;
  }
  int n = 0;
  for (int e0 = 0; e0 < num_experts; e0 += blockDim.x) {
    const int e = e0 + threadIdx.x;
    int64_t row = -1;
    if (e < num_experts) {
      const int code = row_map[t * num_experts + e];
      row = code >= 0 ? code : (code <= -2 ? -2 - static_cast<int64_t>(code) : -1);
      if (row >= n_rows) row = -1;  // a code past the output: nothing to write
    }
    int count;
    const int pos = block_exclusive_scan(row >= 0 ? 1 : 0, &count);
    if (row >= 0) dest_rows[n + pos] = static_cast<int>(row);
    n += count;
  }
  __syncthreads();
  const int64_t nvec = row_bytes / VB;
  const V* s = reinterpret_cast<const V*>(src + t * src_stride);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const V x = s[v];
    for (int j = 0; j < n; ++j) reinterpret_cast<V*>(dst + static_cast<int64_t>(dest_rows[j]) * row_bytes)[v] = x;
  }
}

// sum_rows for exactly R rows, U of this thread's packs (v, v + step, ...) a step while all U are in the row: the
// R * U loads first, then each pack's sum in ascending j (acc = 0, then acc += w_j * x_j, as sum_rows writes it).
// Returns the first pack it did not write.
template <typename T, int VB, int R, int U, typename RowFn, typename WeightFn>
__device__ __forceinline__ int64_t sum_packs(const T* __restrict__ rows, int64_t rows_stride,
                                             typename Vec<VB>::type* __restrict__ o, int64_t nvec, RowFn row,
                                             WeightFn weight, int64_t v, int step) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VB>;
  using V = typename Vec<VB>::type;
  const V* src[R];
  A w[R];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    src[k] = reinterpret_cast<const V*>(rows + row(k) * rows_stride);
    w[k] = weight(k);
  }
  for (; v + static_cast<int64_t>(U - 1) * step < nvec; v += static_cast<int64_t>(U) * step) {
    P x[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int k = 0; k < R; ++k) x[u][k].raw = src[k][v + u * step];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      P y;
#pragma unroll
      for (int i = 0; i < P::N; ++i) {
        A acc = A(0);
#pragma unroll
        for (int k = 0; k < R; ++k) acc += w[k] * to_acc(x[u][k].v[i]);
        y.v[i] = from_acc<T, A>(acc);
      }
      o[v + u * step] = y.raw;
    }
  }
  return v;
}

// o[v] = sum_j weight(j) * rows[row(j)][v] over j < n, in ascending j (fp32 / fp64), for this thread's packs v;
// first, step: the block's threads (threadIdx.x, blockDim.x) or a warp's lanes (lane, 32).
template <typename T, int VB, typename RowFn, typename WeightFn>
__device__ __forceinline__ void sum_rows(const T* __restrict__ rows, int64_t rows_stride,
                                         typename Vec<VB>::type* __restrict__ o, int64_t hidden, int n, RowFn row,
                                         WeightFn weight, int first, int step) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VB>;
  using V = typename Vec<VB>::type;
  const int64_t nvec = hidden / P::N;
  int64_t v = first;
  // One or two rows (K 1-2; n is uniform over the warp or block): one pack a step leaves a thread one or two loads
  // in flight, too few bytes to cover the DRAM latency (gather_warp lost 4% at K 1 when fewer warps fit:
  // bench/results/2026-12-06-h100-ninth-main/ab). Take 4 (K 1) or 2 (K 2) packs a step, their loads issued first
  // (1.4-2.4% faster at K 1-2 on the H100: 2026-12-06-h100-gather-packs); each pack's sum is the loop's below, term
  // for term, so the same bits. 8- and 16-byte packs only, as kTail.
  if (VB >= 8 && n == 1) v = sum_packs<T, VB, 1, 4>(rows, rows_stride, o, nvec, row, weight, v, step);
  if (VB >= 8 && n == 2) v = sum_packs<T, VB, 2, 2>(rows, rows_stride, o, nvec, row, weight, v, step);
  for (; v < nvec; v += step) {
    A acc[P::N];
#pragma unroll
    for (int i = 0; i < P::N; ++i) acc[i] = A(0);
    int j = 0;
    // Four rows in flight per step; the sum order stays ascending j.
    for (; j + 4 <= n; j += 4) {
      P x[4];
      A w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = weight(j + k);
        x[k].raw = reinterpret_cast<const V*>(rows + row(j + k) * rows_stride)[v];
      }
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int i = 0; i < P::N; ++i) acc[i] += w[k] * to_acc(x[k].v[i]);
    }
    // The last n - j < 4 rows (all of them at K <= 3) kTail at a time: one at a time left a lane one load per step
    // at Mixtral's K = 2 (unpermute 84-86% of copy on the H200). Same order, so the same bits. Two for 8- and
    // 16-byte packs; narrower packs (odd rows) keep one, as two made ptxas spill there (sm_90).
    constexpr int kTail = VB >= 8 ? 2 : 1;
    for (; j + kTail <= n; j += kTail) {
      P x[kTail];
      A w[kTail];
#pragma unroll
      for (int k = 0; k < kTail; ++k) {
        w[k] = weight(j + k);
        x[k].raw = reinterpret_cast<const V*>(rows + row(j + k) * rows_stride)[v];
      }
#pragma unroll
      for (int k = 0; k < kTail; ++k)
#pragma unroll
        for (int i = 0; i < P::N; ++i) acc[i] += w[k] * to_acc(x[k].v[i]);
    }
    if (j < n) {  // kTail 2 and an odd remainder
      const A w = weight(j);
      P x;
      x.raw = reinterpret_cast<const V*>(rows + row(j) * rows_stride)[v];
#pragma unroll
      for (int i = 0; i < P::N; ++i) acc[i] += w * to_acc(x.v[i]);
    }
    P y;
#pragma unroll
    for (int i = 0; i < P::N; ++i) y.v[i] = from_acc<T, A>(acc[i]);
    o[v] = y.raw;
  }
}

// Pair (t, e) of a row-map gather: the row summed into token t (-1 if none) and its weight *w (probs[t, e], or 1),
// with dprobs[t, e] written when asked (g_pprobs[row] for routed pairs, 0 elsewhere).
template <typename A>
__device__ __forceinline__ int gather_pair(int64_t t, int e, int num_experts, int64_t n_rows,
                                           const int* __restrict__ row_map, const void* __restrict__ probs,
                                           int probs_code, int64_t probs_st, int64_t probs_se,
                                           const void* __restrict__ g_pprobs, int g_code, void* __restrict__ dprobs,
                                           int dprobs_code, A* w) {
  int row = -1;
  const int code = row_map[t * num_experts + e];
  const bool routed = code >= 0 && code < n_rows;
  if (routed) {
    row = code;
    if (probs) *w = load_scalar<A>(probs, probs_code, t * probs_st + e * probs_se);
  } else if (code <= -2 && !probs && -2 - static_cast<int64_t>(code) < n_rows) {
    row = -2 - code;  // padding rows count only in an unweighted sum (the seed's scatter_add)
  }
  if (dprobs) {
    const A g = routed ? load_scalar<A>(g_pprobs, g_code, code) : A(0);
    store_scalar<A>(dprobs, dprobs_code, t * num_experts + e, g);
  }
  return row;
}

// out[t] = sum_j w_j * rows[row_j] over token t's rows (fp32 / fp64 accumulation, ascending expert order).
// Row list from the row map (routed rows weighted by probs if given, else routed and padding rows with weight 1),
// or from a CSR list (csr_ptr [T + 1], csr_rows) of an arbitrary sorted_indices (weight 1).
// With g_pprobs: also dprobs[t, e] = g_pprobs[row] for routed pairs, 0 elsewhere (permute's probs gradient).
// 12 blocks a SM (<= 40 registers), as gather_warp: left to itself ptxas gave the fp16 16-byte instance 45 (10
// blocks); under the bound the bf16 / fp16 / fp32 8- and 16-byte instances take 40 with none spilled (sm_90).
template <typename T, int VB>
__global__ void __launch_bounds__(kRowThreads, 12)
    gather_reduce(const T* __restrict__ rows, int64_t rows_stride, int64_t n_rows, T* __restrict__ out, int64_t out_stride, int64_t hidden,
                  int64_t num_tokens, int num_experts, const int* __restrict__ row_map,
                  const int64_t* __restrict__ csr_ptr, const int64_t* __restrict__ csr_rows,
                  const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                  const void* __restrict__ g_pprobs, int g_code, void* __restrict__ dprobs, int dprobs_code) {
  using A = typename Acc<T>::type;
  using V = typename Vec<VB>::type;
  extern __shared__ int smem[];
  int* list_rows = smem;                                        // [num_experts]
  A* list_w = reinterpret_cast<A*>(smem + ((num_experts + 1) & ~1));  // [num_experts], 8-byte aligned
  const int64_t t = blockIdx.x;
  int n = 0;
  int64_t csr_beg = 0;
  if (row_map) {
    for (int e0 = 0; e0 < num_experts; e0 += blockDim.x) {
      const int e = e0 + threadIdx.x;
      int row = -1;
      A w = A(1);
      if (e < num_experts)
        row = gather_pair(t, e, num_experts, n_rows, row_map, probs, probs_code, probs_st, probs_se, g_pprobs, g_code,
                          dprobs, dprobs_code, &w);
      int count;
      const int pos = block_exclusive_scan(row >= 0 ? 1 : 0, &count);
      if (row >= 0) {
        list_rows[n + pos] = row;
        list_w[n + pos] = w;
      }
      n += count;
    }
    __syncthreads();
  } else {
    csr_beg = csr_ptr[t];
    n = static_cast<int>(csr_ptr[t + 1] - csr_beg);
  }
  // One instantiation per row source, not a select per row: the CSR path has no shared row list to read.
  V* o = reinterpret_cast<V*>(out + t * out_stride);
  if (row_map) {
    sum_rows<T, VB>(rows, rows_stride, o, hidden, n, [&](int j) { return static_cast<int64_t>(list_rows[j]); },
                    [&](int j) { return list_w[j]; }, threadIdx.x, blockDim.x);
  } else {
    sum_rows<T, VB>(rows, rows_stride, o, hidden, n, [&](int j) { return csr_rows[csr_beg + j]; },
                    [](int) { return A(1); }, threadIdx.x, blockDim.x);
  }
}

// gather_reduce with a warp a token (kRowThreads / 32 tokens a block) and no block barrier: the warp builds its
// token's row list 32 experts at a time (gather_pair, a ballot keeps ascending expert order), then its lanes sum the
// rows over their packs: the same sums in the same order, so the same bits. Same parameters; shared memory: each
// warp's row list ((E + 1) & ~1 ints) for the 4 warps, then their weight lists (E accumulators each).
template <typename T, int VB>
__global__ void __launch_bounds__(kRowThreads, 12)
    gather_warp(const T* __restrict__ rows, int64_t rows_stride, int64_t n_rows, T* __restrict__ out,
                int64_t out_stride, int64_t hidden, int64_t num_tokens, int num_experts, const int* __restrict__ row_map,
                const int64_t* __restrict__ csr_ptr, const int64_t* __restrict__ csr_rows,
                const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                const void* __restrict__ g_pprobs, int g_code, void* __restrict__ dprobs, int dprobs_code) {
  using A = typename Acc<T>::type;
  using V = typename Vec<VB>::type;
  constexpr int kWarps = kRowThreads / 32;
  extern __shared__ int smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= num_tokens) return;  // no barrier below: a warp without a token leaves
  const int list_ints = (num_experts + 1) & ~1;
  int* list_rows = smem + warp * list_ints;
  A* list_w = reinterpret_cast<A*>(smem + kWarps * list_ints) + warp * num_experts;
  int n = 0;
  int64_t csr_beg = 0;
  if (row_map) {
    for (int e0 = 0; e0 < num_experts; e0 += 32) {
      const int e = e0 + lane;
      A w = A(1);
      const int row = e < num_experts ? gather_pair(t, e, num_experts, n_rows, row_map, probs, probs_code, probs_st,
                                                    probs_se, g_pprobs, g_code, dprobs, dprobs_code, &w)
                                      : -1;
      int slot;
      n = warp_slots(row >= 0, n, &slot);
      if (row >= 0) {
        list_rows[slot] = row;
        list_w[slot] = w;
      }
    }
    __syncwarp();  // the lists are read by every lane
  } else {
    csr_beg = csr_ptr[t];
    n = static_cast<int>(csr_ptr[t + 1] - csr_beg);
  }
  V* o = reinterpret_cast<V*>(out + t * out_stride);
  if (row_map) {
    sum_rows<T, VB>(rows, rows_stride, o, hidden, n, [&](int j) { return static_cast<int64_t>(list_rows[j]); },
                    [&](int j) { return list_w[j]; }, lane, 32);
  } else {
    sum_rows<T, VB>(rows, rows_stride, o, hidden, n, [&](int j) { return csr_rows[csr_beg + j]; },
                    [](int) { return A(1); }, lane, 32);
  }
}

// One pack of a d_rows row: T(gx[i] * w), the product rounded once to T; w == 0 (a padding row's gradient with probs)
// gives zeros, also where g holds inf or NaN.
template <typename T, int VB>
__device__ __forceinline__ typename Vec<VB>::type scaled_pack(const typename Acc<T>::type (&gx)[Pack<T, VB>::N],
                                                             typename Acc<T>::type w) {
  using A = typename Acc<T>::type;
  Pack<T, VB> d;
#pragma unroll
  for (int i = 0; i < Pack<T, VB>::N; ++i) d.v[i] = from_acc<T, A>(w == A(0) ? A(0) : gx[i] * w);
  return d.raw;
}

// Unpermute backward, one block per token t (blocks >= T zero spare rows):
//   d_rows[row] = g[t] * w  (w = probs[t, e] for routed rows, or 1 without probs; padding rows get g[t] without
//   probs and 0 with them), and with dprobs: dprobs[t, e] = dot(g[t], rows[row]) for routed pairs, 0 elsewhere.
// A token's rows go two a step. LONE: a lone row (a token's only row, or the last of an odd group) goes two of its
// packs a step, g's and the row's four loads issued before either pack is used (a pack a step leaves a lane two loads
// in flight, too few for K 1 on the H200: 86.3% of copy). Only where N < 2 T (K 1): with it on every launch the
// two-rows-a-step instances lost 1.5-2.9% at K 2-8 on an H100 (bench/results/2026-12-07-h100-twentysecond-ab).
// The same dot terms in the same order either way: the same bits. LONE's bf16 / fp16 instances spill 12 bytes (sm_90,
// CUDA 13.0): stored before the row loops, reloaded once a step of the lone-row loop and twice a step of the pairs
// loop (L1 hits; the A/B above measured this code).
// ROWS 4 (the QUAD instances, launched where N >= 4 T): a token's rows four a step, four row loads in flight a lane
// instead of two, at 9 blocks a SM (<= 56 registers) instead of 12: 36 row loads in flight a SM against 24, for the
// H200, which needs about 1.4x the H100's bytes in flight (DeepSeek-V3 there: 79.5% of the DRAM peak at 12 blocks).
// Measured (same-run A/Bs, 2026-12-07): on an H200 0.3-0.4% faster at T16k-E128-K6 in three rounds (0.4479-0.4485
// against 0.4492-0.4500 ms), level at DeepSeek-V3 and Qwen3; level on an H100. Four rows a step on every launch
// (55 registers) had lost 6% at K 1 and won under 1% at K 6-8 on an H100.
// 12 blocks a SM (<= 40 registers; left to itself ptxas gave the two-rows-a-step bf16 16-byte instance 48, 10
// blocks), fp64 8 (at 12 it spilled 44-124 bytes; sm_90).
template <typename T, int VB, bool LONE = false, int ROWS = 2>
__global__ void __launch_bounds__(kRowThreads, sizeof(T) == 8 ? 8 : (ROWS == 4 ? 9 : 12))
    unpermute_bwd(const T* __restrict__ g, int64_t g_stride, const T* __restrict__ rows, int64_t rows_stride,
                  T* __restrict__ d_rows,
                  int64_t n_rows, int64_t hidden, int64_t num_tokens, int num_experts, const int* __restrict__ row_map,
                  const void* __restrict__ probs, int probs_code, int64_t probs_st, int64_t probs_se,
                  void* __restrict__ dprobs, int dprobs_code, const int* __restrict__ pad_ranges) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VB>;
  using V = typename Vec<VB>::type;
  constexpr int kGroup = 8;  // dot products reduced per pass
  static_assert(kGroup % ROWS == 0, "rows are taken ROWS a step");
  extern __shared__ int smem[];
  int* list_rows = smem;
  int* list_e = smem + num_experts;
  A* list_w = reinterpret_cast<A*>(smem + 2 * ((num_experts + 1) & ~1));
  __shared__ A red[kRowThreads / 32][kGroup];
  const int64_t t = blockIdx.x;
  if (t >= num_tokens) {
    zero_unowned_rows<VB>(reinterpret_cast<uint8_t*>(d_rows), hidden * static_cast<int64_t>(sizeof(T)),
                          row_map[num_tokens * num_experts], n_rows, t - num_tokens, pad_ranges, num_experts, nullptr,
                          nullptr, 0);
    return;
  }
  int n = 0;
  for (int e0 = 0; e0 < num_experts; e0 += blockDim.x) {
    const int e = e0 + threadIdx.x;
    int row = -1;
    bool routed = false;
    A w = A(1);
    if (e < num_experts) {
      const int code = row_map[t * num_experts + e];
      if (code >= 0 && code < n_rows) {
        row = code;
        routed = true;
        if (probs) w = load_scalar<A>(probs, probs_code, t * probs_st + e * probs_se);
      } else if (code <= -2 && -2 - static_cast<int64_t>(code) < n_rows) {
        row = -2 - code;
        w = probs ? A(0) : A(1);  // a padding row adds nothing to a weighted sum, so its gradient is 0
      }
      if (dprobs) store_scalar<A>(dprobs, dprobs_code, t * num_experts + e, A(0));  // routed pairs overwrite below
    }
    int count;
    const int pos = block_exclusive_scan(row >= 0 ? 1 : 0, &count);
    if (row >= 0) {
      list_rows[n + pos] = row;
      list_w[n + pos] = w;
      list_e[n + pos] = routed ? e : -1;  // only routed rows get a probs gradient
    }
    n += count;
  }
  __syncthreads();
  const int64_t nvec = hidden / P::N;
  const V* gv = reinterpret_cast<const V*>(g + t * g_stride);
  for (int j0 = 0; j0 < n; j0 += kGroup) {
    const int m = min(kGroup, n - j0);
    A dot[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) dot[k] = A(0);
    if (LONE && m == 1) {
      const int64_t r0 = list_rows[j0];
      const A w0 = list_w[j0];
      const bool dot0 = dprobs && list_e[j0] >= 0;
      const V* y = reinterpret_cast<const V*>(rows + r0 * rows_stride);
      V* d = reinterpret_cast<V*>(d_rows + r0 * hidden);
      for (int64_t v = threadIdx.x; v < nvec; v += 2 * static_cast<int64_t>(blockDim.x)) {
        const int64_t v1 = v + blockDim.x;
        const bool has1 = v1 < nvec;
        P x0, x1, y0, y1;
        x1.raw = y0.raw = y1.raw = V{};
        x0.raw = gv[v];
        if (has1) x1.raw = gv[v1];
        if (dot0) {
          y0.raw = y[v];
          if (has1) y1.raw = y[v1];
        }
        // one pack at a time from here: both packs' widened values at once spilled at the 40-register cap
        const auto finish = [&](const P& x, const P& yy, int64_t vv) {
          A gx[P::N];
#pragma unroll
          for (int i = 0; i < P::N; ++i) gx[i] = to_acc(x.v[i]);
          d[vv] = scaled_pack<T, VB>(gx, w0);
          if (dot0) {
#pragma unroll
            for (int i = 0; i < P::N; ++i) dot[0] += gx[i] * to_acc(yy.v[i]);
          }
        };
        finish(x0, y0, v);
        if (has1) finish(x1, y1, v1);
      }
    }
    for (int64_t v = threadIdx.x; (!LONE || m > 1) && v < nvec; v += blockDim.x) {
      P x;
      x.raw = gv[v];
      A gx[P::N];
#pragma unroll
      for (int i = 0; i < P::N; ++i) gx[i] = to_acc(x.v[i]);
      const auto store_scaled = [&](int64_t r, A w) {
        reinterpret_cast<V*>(d_rows + r * hidden)[v] = scaled_pack<T, VB>(gx, w);
      };
      // Two rows a step, both row loads issued before either is used: a row at a time left a lane one load in
      // flight (its first use followed it). Each row's dot sums the same terms in the same order: the same bits.
      if constexpr (ROWS == 2) {
#pragma unroll
        for (int k = 0; k < kGroup; k += 2) {
          if (k < m) {
            const bool two = k + 1 < m;
            const int64_t r0 = list_rows[j0 + k], r1 = two ? list_rows[j0 + k + 1] : r0;
            const bool dot0 = dprobs && list_e[j0 + k] >= 0, dot1 = two && dprobs && list_e[j0 + k + 1] >= 0;
            P y0, y1;
            y0.raw = y1.raw = V{};
            if (dot0) y0.raw = reinterpret_cast<const V*>(rows + r0 * rows_stride)[v];
            if (dot1) y1.raw = reinterpret_cast<const V*>(rows + r1 * rows_stride)[v];
            store_scaled(r0, list_w[j0 + k]);
            if (two) store_scaled(r1, list_w[j0 + k + 1]);
            if (dot0) {
#pragma unroll
              for (int i = 0; i < P::N; ++i) dot[k] += gx[i] * to_acc(y0.v[i]);
            }
            if (dot1) {
#pragma unroll
              for (int i = 0; i < P::N; ++i) dot[k + 1] += gx[i] * to_acc(y1.v[i]);
            }
          }
        }
      } else {
        // QUAD: the same with four rows (written apart: the loop below at ROWS 2 made ptxas spill 16 bytes in the
        // bf16 / fp16 16-byte instances, which the code above does not)
#pragma unroll
        for (int k = 0; k < kGroup; k += ROWS) {
          if (k < m) {
            int64_t r[ROWS];
            bool has_dot[ROWS];
            P y[ROWS];
#pragma unroll
            for (int b = 0; b < ROWS; ++b) {
              const bool in = k + b < m;  // b 0 always is
              r[b] = in ? list_rows[j0 + k + b] : r[0];
              has_dot[b] = in && dprobs && list_e[j0 + k + b] >= 0;
              y[b].raw = V{};
              if (has_dot[b]) y[b].raw = reinterpret_cast<const V*>(rows + r[b] * rows_stride)[v];
            }
#pragma unroll
            for (int b = 0; b < ROWS; ++b) {
              if (k + b < m) store_scaled(r[b], list_w[j0 + k + b]);
            }
#pragma unroll
            for (int b = 0; b < ROWS; ++b) {
              if (has_dot[b]) {
#pragma unroll
                for (int i = 0; i < P::N; ++i) dot[k + b] += gx[i] * to_acc(y[b].v[i]);
              }
            }
          }
        }
      }
    }
    if (dprobs) {
      // Fixed-order block reduction: warp butterfly, then warp 0 sums the warps in order.
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        A s = dot[k];
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (lane == 0) red[warp][k] = s;
      }
      __syncthreads();
      if (threadIdx.x < m) {
        const int k = threadIdx.x;
        A s = A(0);
        for (int wi = 0; wi < kRowThreads / 32; ++wi) s += red[wi][k];
        const int e = list_e[j0 + k];
        if (e >= 0) store_scalar<A>(dprobs, dprobs_code, t * num_experts + e, s);
      }
      __syncthreads();
    }
  }
}

}  // namespace moe_raw

#ifdef MOE_RAW_NVCC_CHECK
// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
namespace moe_raw {
template __global__ void routing_pack<kTileTokens>(const void*, int, int64_t, int64_t, int64_t, int, int*);
template __global__ void routing_scan<1024>(int*, int64_t, int);
template __global__ void pad_offsets<1024>(const int*, int64_t, int, int64_t, int, int*, int*, int64_t*, int64_t*);
#define MOE_RAW_ROW_KERNELS(T, VB)                                                                              \
  template __global__ void gather_reduce<T, VB>(const T*, int64_t, int64_t, T*, int64_t, int64_t, int64_t, int,\
                                                const int*, const int64_t*, const int64_t*, const void*, int,  \
                                                int64_t, int64_t, const void*, int, void*, int);               \
  template __global__ void gather_warp<T, VB>(const T*, int64_t, int64_t, T*, int64_t, int64_t, int64_t, int,  \
                                              const int*, const int64_t*, const int64_t*, const void*, int,    \
                                              int64_t, int64_t, const void*, int, void*, int);                 \
  template __global__ void unpermute_bwd<T, VB>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t,    \
                                                int64_t, int, const int*, const void*, int, int64_t, int64_t,  \
                                                void*, int, const int*);
// Every instance moe_raw/_launch.py KERNELS["permute"] names (tests/test_support_matrix.py checks the two agree):
// each dtype with every pack of 16, 8, 4, 2, 1 bytes that holds whole elements.
MOE_RAW_ROW_KERNELS(float, 16)
MOE_RAW_ROW_KERNELS(float, 8)
MOE_RAW_ROW_KERNELS(float, 4)
MOE_RAW_ROW_KERNELS(__half, 16)
MOE_RAW_ROW_KERNELS(__half, 8)
MOE_RAW_ROW_KERNELS(__half, 4)
MOE_RAW_ROW_KERNELS(__half, 2)
MOE_RAW_ROW_KERNELS(__nv_bfloat16, 16)
MOE_RAW_ROW_KERNELS(__nv_bfloat16, 8)
MOE_RAW_ROW_KERNELS(__nv_bfloat16, 4)
MOE_RAW_ROW_KERNELS(__nv_bfloat16, 2)
MOE_RAW_ROW_KERNELS(double, 16)
MOE_RAW_ROW_KERNELS(double, 8)
// unpermute_bwd's LONE instances (launched where N < 2 T): 16-byte packs only
#define MOE_RAW_LONE_BWD(T)                                                                                     \
  template __global__ void unpermute_bwd<T, 16, true>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, \
                                                      int64_t, int, const int*, const void*, int, int64_t,      \
                                                      int64_t, void*, int, const int*);
MOE_RAW_LONE_BWD(float)
MOE_RAW_LONE_BWD(__half)
MOE_RAW_LONE_BWD(__nv_bfloat16)
MOE_RAW_LONE_BWD(double)
// and its QUAD instances (launched where N >= 4 T): 16-byte packs of bf16 / fp16 (fp32's spilled 8 bytes at 56)
#define MOE_RAW_QUAD_BWD(T)                                                                                     \
  template __global__ void unpermute_bwd<T, 16, false, 4>(const T*, int64_t, const T*, int64_t, T*, int64_t,    \
                                                          int64_t, int64_t, int, const int*, const void*, int,  \
                                                          int64_t, int64_t, void*, int, const int*);
MOE_RAW_QUAD_BWD(__half)
MOE_RAW_QUAD_BWD(__nv_bfloat16)
#define MOE_RAW_SCATTER(VB)                                                                                     \
  template __global__ void permute_scatter<VB>(const uint8_t*, int64_t, uint8_t*, int64_t, int64_t, int,       \
                                               int64_t, int, int64_t, const void*, int, int64_t, int64_t,      \
                                               const int*, int*, int64_t*, const void*, int, int64_t, int64_t, \
                                               void*, int64_t, const int*);                                    \
  template __global__ void permute_small<VB>(const uint8_t*, int64_t, uint8_t*, int64_t, int64_t, int, int64_t, \
                                             int, int64_t, const void*, int, int64_t, int64_t, const int*, int*, \
                                             int64_t*, const void*, int, int64_t, int64_t, void*, int64_t,       \
                                             const int*);
#define MOE_RAW_PERMUTE_GROUPED(KE)                                                                             \
  template __global__ void permute_grouped<16, KE>(const uint8_t*, int64_t, uint8_t*, int64_t, int64_t, int,     \
                                                   int64_t, int, int64_t, const void*, int, int64_t, int64_t,    \
                                                   const int*, int*, int64_t*, const void*, int, int64_t,        \
                                                   int64_t, void*, int64_t, const int*, int, int);
MOE_RAW_PERMUTE_GROUPED(1)
MOE_RAW_PERMUTE_GROUPED(4)
#define MOE_RAW_SCATTER_ROWS(VB)                                                                                \
  template __global__ void scatter_rows<VB>(const uint8_t*, int64_t, uint8_t*, int64_t, int64_t, int, int64_t,  \
                                            const int*, const int*);
MOE_RAW_SCATTER_ROWS(16)
MOE_RAW_SCATTER_ROWS(8)
MOE_RAW_SCATTER_ROWS(4)
MOE_RAW_SCATTER_ROWS(2)
MOE_RAW_SCATTER_ROWS(1)
MOE_RAW_SCATTER(16)
MOE_RAW_SCATTER(8)
MOE_RAW_SCATTER(4)
MOE_RAW_SCATTER(2)
MOE_RAW_SCATTER(1)
}  // namespace moe_raw
#endif
