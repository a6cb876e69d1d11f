// moe_raw/kernels/topk.cu: top-k router output -> the dense routing the mask-form kernels read, in one launch.
//
// What it computes. For token t with experts idx[t, 0..K) (int32 or int64; -1 = not routed) and, optionally,
// their probabilities p[t, 0..K):
//   routing_map[t, e] = 1 if some k has idx[t, k] == e, else 0            (e < map_width: the padded row)
//   probs[t, e]       = p[t, k] for the first such k, else 0              (e < E)
// Entries outside [0, E) are skipped (-1 means "not routed"; other values are routing errors that moe_raw/topk.py
// reports where it reads the host anyway, or with MOE_RAW_DEBUG=1). An expert named twice in a row is written by
// its first k only, so even a bad input gives one deterministic result. The probabilities are copied, not
// converted: the kernel moves Word-sized bit patterns (Word = an unsigned integer of the probs' element size).
// torch would need about eight launches for the same (two comparisons, where, two zero fills, two scatters, a
// cast); at small T the launches, not the bytes, are the cost (bench/bench_dispatch.py, permute_topk rows).
//
// Launch shape: grid = ceil(T / kTokensPerBlock), block = 32 * kTokensPerBlock: one warp per token. The lanes
// zero the token's map row (16 bytes a lane) and probs row (one element a lane), __syncwarp() (which also orders
// the warp's memory accesses), then lane k sets the token's k-th entry (k strides by 32 when K > 32).
// Preconditions (checked in moe_raw/topk.py): map rows contiguous with a row stride of map_width bytes, a multiple
// of 16, and a 16-byte aligned base (a fresh allocation); E <= map_width; idx and p rows contiguous, [T, K];
// probs contiguous [T, E]; T * max(map_width, E, K) < 2^63.
// Bytes moved: read T * K * (index + prob bytes) (each index up to K times, from L1), write T * map_width +
// T * E * prob bytes.

#include "common.cuh"

namespace moe_raw {

constexpr int kTokensPerBlock = 8;

template <typename Index, typename Word>
__global__ void __launch_bounds__(32 * kTokensPerBlock)
    topk_dense(const Index* __restrict__ idx, const Word* __restrict__ p, int64_t num_tokens, int k_slots,
               int num_experts, unsigned char* __restrict__ routing_map, int64_t map_width, Word* __restrict__ probs) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + (threadIdx.x >> 5);
  if (t >= num_tokens) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  uint4* map_row = reinterpret_cast<uint4*>(routing_map + t * map_width);
  for (int64_t v = lane; v < map_width / 16; v += 32) map_row[v] = make_uint4(0u, 0u, 0u, 0u);
  Word* probs_row = probs != nullptr ? probs + t * num_experts : nullptr;
  if (probs_row != nullptr)
    for (int e = lane; e < num_experts; e += 32) probs_row[e] = Word(0);
  __syncwarp();
  const Index* idx_row = idx + t * k_slots;
  for (int k = lane; k < k_slots; k += 32) {
    const int64_t e = static_cast<int64_t>(idx_row[k]);
    if (e < 0 || e >= num_experts) continue;
    bool first = true;
    for (int j = 0; j < k && first; ++j) first = static_cast<int64_t>(idx_row[j]) != e;
    if (!first) continue;
    reinterpret_cast<unsigned char*>(map_row)[e] = 1;
    if (probs_row != nullptr) probs_row[e] = p[t * k_slots + k];
  }
}

}  // namespace moe_raw

// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
#ifdef MOE_RAW_NVCC_CHECK
namespace moe_raw {
#define MOE_RAW_TOPK_DENSE(INDEX, WORD)                                                                      \
  template __global__ void topk_dense<INDEX, WORD>(const INDEX*, const WORD*, int64_t, int, int, unsigned char*, \
                                                   int64_t, WORD*);
MOE_RAW_TOPK_DENSE(int32_t, uint16_t)
MOE_RAW_TOPK_DENSE(int32_t, uint32_t)
MOE_RAW_TOPK_DENSE(int32_t, uint64_t)
MOE_RAW_TOPK_DENSE(int64_t, uint16_t)
MOE_RAW_TOPK_DENSE(int64_t, uint32_t)
MOE_RAW_TOPK_DENSE(int64_t, uint64_t)
}  // namespace moe_raw
#endif
