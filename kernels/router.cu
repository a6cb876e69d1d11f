// moe_raw/kernels/router.cu: the MoE router after the gating GEMM, forward and backward, one launch each.
//
// What it computes (Megatron-LM main's moe_utils.topk_routing_with_score_function and
// compute_routing_scores_for_aux_loss; moe_raw/reference.py transcribes both). For token t with logits x[t, 0..E):
//   score   softmax (before top-k: s = softmax(x); after: top-k on x, then softmax over the K picked logits),
//           sigmoid s = 1 / (1 + exp(-x)), or sqrtsoftplus s = sqrt(softplus(x)) (softplus(x) = x for x > 20);
//   key     the value top-k ranks: s, plus expert_bias[e] for sigmoid / sqrtsoftplus when a bias is given;
//   groups  with num_groups G > 0: experts form G groups of E / G consecutive experts, a group's score is the sum of
//           its top (K / group_topk) keys (rounded to the logits' dtype when the keys are the logits, as Megatron
//           sums them there), the group_topk best groups stay and top-k picks only inside them;
//   top-k   the K largest keys, larger first, the lower expert index first among equal keys (NaN ranks above all);
//   probs   softmax: s of each pick (after: the K-way softmax); sigmoid / sqrtsoftplus: s / (sum of picked s + 1e-20)
//           when K > 1, else s; times scaling (when nonzero); written in the logits' dtype.
// Outputs: idx [T, K] int64 always (the backward reads it), and either probs [T, K] (compact) or probs [T, E] with a
// bool routing_map [T, E] (dense: zero except the picks). Aux mode (compute_routing_scores_for_aux_loss): scores
// [T, E] fp32 = softmax(x), or s / (sum over all E of s + 1e-20), and the map of their top-k (no bias, no groups).
// Backward: d logits [T, E] (logits' dtype) from d probs (dense [T, E], or compact [T, K]) or, in aux mode, from
// d scores [T, E] fp32; the bias gets none (it only ranks). fp32 math for every logits dtype, fp64 included
// (Megatron main converts the logits to fp32 for the score functions and keeps every intermediate in fp32); every
// sum runs in one fixed order, so results repeat bit for bit, and no atomics are used.
//
// Launch shape: block = 32 * kRouterWarps threads; a token takes L lanes (an aligned power-of-two run, 32 / L tokens
// a warp) and its lane s holds the V consecutive experts s * V .. s * V + V - 1 (V = 16 for E <= 512, L the
// smallest power of two with L V >= E; V = 32, L = 32 for E <= 1024), read and written 16 bytes at a time where its
// run is whole and aligned; grid = ceil(T / (kRouterWarps * 32 / L)). Fewer lanes a token than a warp cut the
// shuffles each top-k round costs a token (the first version, a warp a token, was compute-bound at 14-20% of copy on
// the H200). A candidate is one 64-bit key (order-preserving float bits, then the inverted expert index), so a top-k
// round is a 64-bit max over the token's lanes' own best keys, and only the winning lane rescans its V keys.
// Grouped routing: when a group is a power-of-two run of whole lanes (DeepSeek-V3: 32 experts = 2 lanes of 16) each
// lane keeps its top m = K / group_topk keys (M = 1, 2, 4 or 8 slots, a compile-time bound on m) and the group's
// lanes merge them by shuffles; other layouts stage the keys in dynamic shared memory (kRouterWarps * 32 / L * E * 4
// bytes) and the token's first lane scores and chooses the groups.
// Preconditions (moe_raw/router.py checks them): logits [T, E] contiguous, 1 <= K <= min(E, 32); groups: E % G == 0,
// G <= 64, 1 <= group_topk <= G, group_topk <= K, group_topk * E / G >= K; outputs contiguous; T * E < 2^63.
// Bytes moved: forward reads T * E * logits bytes (+ E * bias bytes) and writes T * K * 8 (idx) plus T * K * probs
// bytes (compact) or T * E * (probs bytes + 1) (dense) or T * E * 5 (aux); backward reads T * E * logits bytes (the
// pre-softmax and aux forms; the others read K entries a token) and the gradient, and writes T * E * logits bytes.

#include "common.cuh"

namespace moe_raw {

constexpr int kRouterWarps = 4;
constexpr int kMaxGroupPicks = 8;  // the shuffle-merged group path keeps at most 8 keys a lane
constexpr int kMaxStagedPicks = 32;  // the staged group path: m = K / group_topk <= K <= 32
enum ScoreFn : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };
enum PickProb : int { kAsScored = 0, kSoftmaxOfPicks = 1, kNormalized = 2 };
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// The score s(x) of sigmoid / sqrtsoftplus and its derivative ds/dx given s (torch's softplus: threshold 20).
__device__ __forceinline__ float score_of(float x, int fn) {
  if (fn == kSigmoid) return 1.0f / (1.0f + expf(-x));
  return sqrtf(x > 20.0f ? x : log1pf(expf(x)));
}
__device__ __forceinline__ float score_slope(float x, float s, int fn) {
  if (fn == kSigmoid) return s * (1.0f - s);
  const float dsoftplus = x > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-x));
  return dsoftplus / (2.0f * s);
}

// Rank key of (value, expert): a larger key ranks first. Larger value first (a positive NaN above +inf, as torch.topk
// ranks NaN), then the lower expert; 0 is "no candidate", below every real key.
__device__ __forceinline__ uint64_t rank_key(float v, int e) {
  uint32_t u = __float_as_uint(v);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~e);
}
__device__ __forceinline__ int key_expert(uint64_t k) { return static_cast<int>(~static_cast<uint32_t>(k)); }
__device__ __forceinline__ float key_value(uint64_t k) {
  uint32_t u = static_cast<uint32_t>(k >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __uint_as_float(u);
}

// Sums, maxima and 64-bit key maxima over a token's L lanes (an aligned run of L lanes of the warp; every lane of the
// warp calls them, with its own token's values). One fixed butterfly order: the results repeat bit for bit.
template <int L>
__device__ __forceinline__ float seg_sum(float x) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}
template <int L>
__device__ __forceinline__ float seg_max(float x) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  return x;
}
template <int L>
__device__ __forceinline__ uint64_t seg_max_key(uint64_t k) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFull, k, off);
    k = o > k ? o : k;
  }
  return k;
}

// x rounded to the dtype of code (Megatron sums softmax-after-top-k's group scores in the logits' dtype).
__device__ __forceinline__ float round_to(float x, int code) {
  if (code == kF16) return __half2float(__float2half_rn(x));
  if (code == kBF16) return __bfloat162float(__float2bfloat16_rn(x));
  return x;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// x[j] = p[first + j] in fp32 for j < valid (-inf after): a lane's run of V elements, 16 bytes a load where whole.
template <int V>
__device__ __forceinline__ void load_run(const void* p, int code, int64_t first, int valid, float (&x)[V]) {
  if (valid == V) {
    if constexpr (V % 4 == 0) {
      const float* q = static_cast<const float*>(p) + first;
      if (code == kF32 && aligned16(q)) {
#pragma unroll
        for (int b = 0; b < V / 4; ++b) {
          const uint4 w = reinterpret_cast<const uint4*>(q)[b];
          x[4 * b] = __uint_as_float(w.x), x[4 * b + 1] = __uint_as_float(w.y);
          x[4 * b + 2] = __uint_as_float(w.z), x[4 * b + 3] = __uint_as_float(w.w);
        }
        return;
      }
    }
    if constexpr (V % 8 == 0) {
      const __half* q = static_cast<const __half*>(p) + first;  // 2-byte elements: fp16 or bf16
      if ((code == kBF16 || code == kF16) && aligned16(q)) {
#pragma unroll
        for (int b = 0; b < V / 8; ++b) {
          Pack<__half, 16> pk;
          pk.raw = reinterpret_cast<const uint4*>(q)[b];
#pragma unroll
          for (int i = 0; i < 8; ++i)
            x[8 * b + i] = code == kF16 ? __half2float(pk.v[i])
                                        : __bfloat162float(__ushort_as_bfloat16(__half_as_ushort(pk.v[i])));
        }
        return;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = j < valid ? load_scalar<float>(p, code, first + j) : neg_inf();
}

// p[first + j] = x[j] in code's dtype for j < valid, 16 bytes a store where the run is whole and aligned.
template <int V>
__device__ __forceinline__ void store_run(void* p, int code, int64_t first, int valid, const float (&x)[V]) {
  if (valid == V) {
    if constexpr (V % 4 == 0) {
      float* q = static_cast<float*>(p) + first;
      if (code == kF32 && aligned16(q)) {
#pragma unroll
        for (int b = 0; b < V / 4; ++b)
          reinterpret_cast<uint4*>(q)[b] = make_uint4(__float_as_uint(x[4 * b]), __float_as_uint(x[4 * b + 1]),
                                                      __float_as_uint(x[4 * b + 2]), __float_as_uint(x[4 * b + 3]));
        return;
      }
    }
    if constexpr (V % 8 == 0) {
      __half* q = static_cast<__half*>(p) + first;
      if ((code == kBF16 || code == kF16) && aligned16(q)) {
#pragma unroll
        for (int b = 0; b < V / 8; ++b) {
          Pack<__half, 16> pk;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            pk.v[i] = code == kF16 ? __float2half_rn(x[8 * b + i])
                                   : __ushort_as_half(__bfloat16_as_ushort(__float2bfloat16_rn(x[8 * b + i])));
          reinterpret_cast<uint4*>(q)[b] = pk.raw;
        }
        return;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) store_scalar<float>(p, code, first + j, x[j]);
}

// Four map bytes (0 / 1) from bits start .. start + 3.
__device__ __forceinline__ uint32_t flag_word(unsigned bits, int start) {
  return ((bits >> start) & 1u) | (((bits >> (start + 1)) & 1u) << 8) | (((bits >> (start + 2)) & 1u) << 16) |
         (((bits >> (start + 3)) & 1u) << 24);
}

// m[first + j] = bit j of bits for j < valid: one 4-, 8- or 16-byte store a lane where whole and aligned.
template <int V>
__device__ __forceinline__ void store_flags(unsigned char* m, int64_t first, int valid, unsigned bits) {
  unsigned char* q = m + first;
  if (valid == V) {
    if constexpr (V % 16 == 0) {
      if (aligned16(q)) {
#pragma unroll
        for (int b = 0; b < V / 16; ++b)
          reinterpret_cast<uint4*>(q)[b] = make_uint4(flag_word(bits, 16 * b), flag_word(bits, 16 * b + 4),
                                                      flag_word(bits, 16 * b + 8), flag_word(bits, 16 * b + 12));
        return;
      }
    }
    if constexpr (V == 8) {
      if ((reinterpret_cast<uintptr_t>(q) & 7) == 0) {
        *reinterpret_cast<uint2*>(q) = make_uint2(flag_word(bits, 0), flag_word(bits, 4));
        return;
      }
    }
    if constexpr (V == 4) {
      if ((reinterpret_cast<uintptr_t>(q) & 3) == 0) {
        *reinterpret_cast<uint32_t*>(q) = flag_word(bits, 0);
        return;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) q[j] = static_cast<unsigned char>((bits >> j) & 1u);
}

// top: sorted (descending) list of M slots, the first m in use; keeps the m largest of itself and k.
template <int M>
__device__ __forceinline__ void insert_key(uint64_t (&top)[M], uint64_t k, int m) {
#pragma unroll
  for (int i = 0; i < M; ++i)
    if (i < m && k > top[i]) {
      const uint64_t held = top[i];
      top[i] = k;
      k = held;
    }
}

// Whether this lane's group is kept, for groups that are a power-of-two run of `lanes` whole lanes of the token
// (lanes <= L). M: the list length, a compile-time bound on m (1, 2, 4 or 8).
template <int V, int M>
__device__ bool group_kept_by_shuffles(const uint64_t (&key)[V], int num_groups, int group_topk, int lanes, int m,
                                       int key_code, int sub, int base) {
  uint64_t top[M];
#pragma unroll
  for (int i = 0; i < M; ++i) top[i] = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) insert_key<M>(top, key[j], m);
  for (int off = 1; off < lanes; off <<= 1) {  // lanes is the same on every lane of the warp
    uint64_t other[M];
#pragma unroll
    for (int i = 0; i < M; ++i) other[i] = __shfl_xor_sync(kFull, top[i], off);
#pragma unroll
    for (int i = 0; i < M; ++i)
      if (i < m) insert_key<M>(top, other[i], m);
  }
  float score = 0.0f;  // the group's top m in rank order, as the reference sums its sorted top-k values
#pragma unroll
  for (int i = 0; i < M; ++i)
    if (i < m) score += key_value(top[i]);
  score = round_to(score, key_code);
  const int g = sub / lanes;
  int rank = 0;  // groups ahead of g: a higher score, or the same score and a lower index
  for (int h = 0; h < num_groups; ++h) {
    const float other = __shfl_sync(kFull, score, base + h * lanes);
    rank += other > score || (other == score && h < g);
  }
  return g < num_groups && rank < group_topk;
}

// Groups of any layout: the token's key values staged in shared memory, then its first lane scores every group (the
// top m in rank order, summed) and chooses the group_topk best. Bit g of the result: group g is kept (every lane of
// the token gets it).
template <int V>
__device__ unsigned long long groups_kept_by_staging(const uint64_t (&key)[V], float* stage, int num_experts,
                                                     int num_groups, int group_topk, int m, int key_code, int e0,
                                                     int valid, int sub, int base) {
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < valid) stage[e0 + j] = key_value(key[j]);
  __syncwarp();
  unsigned long long kept = 0ull;
  if (sub == 0) {
    const int size = num_experts / num_groups;
    uint64_t gkey[64];
    for (int g = 0; g < num_groups; ++g) {
      uint64_t top[kMaxStagedPicks];
      for (int i = 0; i < m; ++i) top[i] = 0;
      for (int e = g * size; e < (g + 1) * size; ++e) {  // insertion keeps the m largest, in rank order
        uint64_t k = rank_key(stage[e], e);
        for (int i = 0; i < m; ++i)
          if (k > top[i]) {
            const uint64_t held = top[i];
            top[i] = k;
            k = held;
          }
      }
      float score = 0.0f;
      for (int i = 0; i < m; ++i) score += key_value(top[i]);
      gkey[g] = rank_key(round_to(score, key_code), g);
    }
    for (int r = 0; r < group_topk; ++r) {
      int best = 0;
      for (int g = 1; g < num_groups; ++g) best = gkey[g] > gkey[best] ? g : best;
      kept |= 1ull << best;
      gkey[best] = 0;
    }
  }
  __syncwarp();  // the stage is read before anyone writes it again
  return __shfl_sync(kFull, kept, base);
}

// The probability of a pick with score v: kAsScored v; kSoftmaxOfPicks exp(v - top) / sum; kNormalized v / sum.
__device__ __forceinline__ float pick_prob(float v, int mode, float top, float sum, double scaling) {
  float p = v;
  if (mode == kSoftmaxOfPicks) p = expf(v - top) / sum;
  if (mode == kNormalized) p = v / sum;
  return scaling != 0.0 ? p * static_cast<float>(scaling) : p;
}

template <int V, int L>
__global__ void __launch_bounds__(32 * kRouterWarps)
    router_fwd(const void* __restrict__ logits, int logits_code, int64_t num_tokens, int num_experts,
               const void* __restrict__ bias, int bias_code, int topk, int score_fn, int pre_softmax, int num_groups,
               int group_topk, double scaling, int aux, void* __restrict__ probs, int dense,
               unsigned char* __restrict__ routing_map, int64_t* __restrict__ idx, float* __restrict__ scores) {
  extern __shared__ float router_stage[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane & (L - 1), base = lane & ~(L - 1);  // this lane within its token's run, the run's first lane
  const int slot = warp * (32 / L) + lane / L;  // the token within the block
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kRouterWarps * 32 / L) + slot;
  const bool live = t < num_tokens;
  if (!__any_sync(kFull, live)) return;  // a warp with no token leaves; others keep every lane for the shuffles
  const int64_t row = live ? t * num_experts : 0;
  const int e0 = sub * V, valid = live ? max(0, min(V, num_experts - e0)) : 0;
  float val[V];  // the score a pick contributes (its key may add the bias)
  load_run<V>(logits, logits_code, row + e0, valid, val);
  if (score_fn == kSoftmax && (pre_softmax || aux)) {
    float m = neg_inf(), sum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) m = fmaxf(m, val[j]);
    m = seg_max<L>(m);
#pragma unroll
    for (int j = 0; j < V; ++j) sum += j < valid ? expf(val[j] - m) : 0.0f;
    sum = seg_sum<L>(sum);
#pragma unroll
    for (int j = 0; j < V; ++j) val[j] = j < valid ? expf(val[j] - m) / sum : 0.0f;
  } else if (score_fn != kSoftmax) {
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      val[j] = j < valid ? score_of(val[j], score_fn) : 0.0f;
      sum += val[j];
    }
    if (aux) {
      sum = seg_sum<L>(sum) + 1e-20f;
#pragma unroll
      for (int j = 0; j < V; ++j) val[j] = val[j] / sum;
    }
  }
  const bool biased = !aux && score_fn != kSoftmax && bias != nullptr;
  uint64_t key[V];
#pragma unroll
  for (int j = 0; j < V; ++j)
    key[j] = j < valid ? rank_key(biased ? val[j] + load_scalar<float>(bias, bias_code, e0 + j) : val[j], e0 + j) : 0;
  if (!aux && group_topk > 0) {
    const int size = num_experts / num_groups, m = topk / group_topk, lanes = size / V;
    const int key_code = score_fn == kSoftmax && !pre_softmax ? logits_code : kF32;
    if (size % V == 0 && (lanes & (lanes - 1)) == 0 && num_groups * lanes <= L && m <= kMaxGroupPicks) {
      bool kept;
      if (m == 1) kept = group_kept_by_shuffles<V, 1>(key, num_groups, group_topk, lanes, m, key_code, sub, base);
      else if (m == 2) kept = group_kept_by_shuffles<V, 2>(key, num_groups, group_topk, lanes, m, key_code, sub, base);
      else if (m <= 4) kept = group_kept_by_shuffles<V, 4>(key, num_groups, group_topk, lanes, m, key_code, sub, base);
      else kept = group_kept_by_shuffles<V, 8>(key, num_groups, group_topk, lanes, m, key_code, sub, base);
      if (!kept) {
#pragma unroll
        for (int j = 0; j < V; ++j) key[j] = 0;
      }
    } else {
      const unsigned long long kept = groups_kept_by_staging<V>(
          key, router_stage + static_cast<int64_t>(slot) * num_experts, num_experts, num_groups, group_topk, m,
          key_code, e0, valid, sub, base);
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < valid && !((kept >> ((e0 + j) / size)) & 1ull)) key[j] = 0;
    }
  }
  // Top-k: a round takes the token's largest key; its owner drops it, records the pick's rank and rescans.
  uint64_t best = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) best = key[j] > best ? key[j] : best;
  unsigned picked = 0u;  // bit j: expert e0 + j is picked
  uint32_t rank[(V + 3) / 4];  // byte j % 4 of rank[j / 4]: the pick's rank r
#pragma unroll
  for (int i = 0; i < (V + 3) / 4; ++i) rank[i] = 0u;
  float top = 0.0f;  // the first pick's key value: the largest logit, for softmax after top-k
  for (int r = 0; r < topk; ++r) {
    const uint64_t win = seg_max_key<L>(best);
    if (r == 0) top = key_value(win);
    const int e = key_expert(win);
    if (live && win != 0 && e / V == sub) {
      best = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (key[j] == win) key[j] = 0, picked |= 1u << j, rank[j / 4] |= static_cast<uint32_t>(r) << (8 * (j % 4));
        best = key[j] > best ? key[j] : best;
      }
      idx[t * topk + r] = e;
    }
  }
  int mode = kAsScored;
  float sum = 1.0f;
  if (!aux && score_fn == kSoftmax && !pre_softmax) {
    mode = kSoftmaxOfPicks;
    float part = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) part += (picked >> j) & 1u ? expf(val[j] - top) : 0.0f;
    sum = seg_sum<L>(part);
  } else if (!aux && score_fn != kSoftmax && topk > 1) {
    mode = kNormalized;
    float part = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) part += (picked >> j) & 1u ? val[j] : 0.0f;
    sum = seg_sum<L>(part) + 1e-20f;
  }
  if (aux) {
    store_run<V>(scores, kF32, row + e0, valid, val);
    store_flags<V>(routing_map, row + e0, valid, picked);
    return;
  }
  if (!dense) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if ((picked >> j) & 1u)
        store_scalar<float>(probs, logits_code, t * topk + ((rank[j / 4] >> (8 * (j % 4))) & 0xffu),
                            pick_prob(val[j], mode, top, sum, scaling));
    return;
  }
  float out[V];
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = (picked >> j) & 1u ? pick_prob(val[j], mode, top, sum, scaling) : 0.0f;
  store_run<V>(probs, logits_code, row + e0, valid, out);
  store_flags<V>(routing_map, row + e0, valid, picked);
}

// d logits from d probs (dense [T, E] or compact [T, K], grad_code its dtype) or, in aux mode, d scores [T, E].
// Lane s of a token takes its picks s, s + L, ... (idx gives their experts).
template <int V, int L>
__global__ void __launch_bounds__(32 * kRouterWarps)
    router_bwd(const void* __restrict__ logits, int logits_code, int64_t num_tokens, int num_experts, int topk,
               int score_fn, int pre_softmax, double scaling, int aux, const void* __restrict__ grad, int grad_code,
               int dense, const int64_t* __restrict__ idx, void* __restrict__ grad_logits) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane & (L - 1);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kRouterWarps * 32 / L) + warp * (32 / L) + lane / L;
  const bool live = t < num_tokens;
  if (!__any_sync(kFull, live)) return;
  const int64_t row = live ? t * num_experts : 0;
  const int e0 = sub * V, valid = live ? max(0, min(V, num_experts - e0)) : 0;
  const int first = live ? sub : topk;  // this lane's picks: first, first + L, ... < topk
  const float scale = scaling != 0.0 ? static_cast<float>(scaling) : 1.0f;
  // Pick r of this token: expert, logit, gradient (times the forward's scaling).
  auto pick = [&](int r, int& e, float& x, float& g) {
    e = static_cast<int>(idx[t * topk + r]);
    x = load_scalar<float>(logits, logits_code, row + e);
    g = load_scalar<float>(grad, grad_code, dense ? row + e : t * topk + r) * scale;
  };
  float d[V];
  if (aux || (score_fn == kSoftmax && pre_softmax)) {  // every logit gets a gradient
    float x[V], s[V], gs[V];
    load_run<V>(logits, logits_code, row + e0, valid, x);
    if (aux) load_run<V>(grad, grad_code, row + e0, valid, gs);
    float m = neg_inf(), sum = 0.0f, dot = 0.0f;
    if (score_fn == kSoftmax) {
#pragma unroll
      for (int j = 0; j < V; ++j) m = fmaxf(m, x[j]);
      m = seg_max<L>(m);
#pragma unroll
      for (int j = 0; j < V; ++j) sum += j < valid ? expf(x[j] - m) : 0.0f;
      sum = seg_sum<L>(sum);
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = j < valid ? expf(x[j] - m) / sum : 0.0f;
    } else {  // aux sigmoid / sqrtsoftplus: scores v / (sum v + 1e-20)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s[j] = j < valid ? score_of(x[j], score_fn) : 0.0f;
        sum += s[j];
      }
      sum = seg_sum<L>(sum) + 1e-20f;
    }
    if (aux) {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < valid) dot += gs[j] * (score_fn == kSoftmax ? s[j] : s[j] / sum);
      dot = seg_sum<L>(dot);
#pragma unroll
      for (int j = 0; j < V; ++j)
        d[j] = score_fn == kSoftmax ? s[j] * (gs[j] - dot) : (gs[j] - dot) / sum * score_slope(x[j], s[j], score_fn);
      store_run<V>(grad_logits, logits_code, row + e0, valid, d);
      return;
    }
    for (int r = first; r < topk; r += L) {  // s of a pick is the forward's value; dot = sum over picks of s g
      int e;
      float xe, g;
      pick(r, e, xe, g);
      dot += expf(xe - m) / sum * g;
    }
    dot = seg_sum<L>(dot);
#pragma unroll
    for (int j = 0; j < V; ++j) d[j] = -s[j] * dot;
    store_run<V>(grad_logits, logits_code, row + e0, valid, d);
    __syncwarp();  // orders the row's stores before the picks' (other lanes' addresses)
    for (int r = first; r < topk; r += L) {
      int e;
      float xe, g;
      pick(r, e, xe, g);
      const float s_pick = expf(xe - m) / sum;
      store_scalar<float>(grad_logits, logits_code, row + e, s_pick * (g - dot));
    }
    return;
  }
  // Only the picks get a gradient: two passes over this lane's picks (the sums, then the gradients).
  float top = 0.0f, sum = 0.0f, dot = 0.0f;
  if (score_fn == kSoftmax && live) {  // pick 0: the largest logit
    top = load_scalar<float>(logits, logits_code, row + idx[t * topk]);
  }
  for (int r = first; r < topk; r += L) {
    int e;
    float xe, g;
    pick(r, e, xe, g);
    sum += score_fn == kSoftmax ? expf(xe - top) : score_of(xe, score_fn);
  }
  sum = seg_sum<L>(sum);
  if (score_fn != kSoftmax) sum += 1e-20f;
  for (int r = first; r < topk; r += L) {
    int e;
    float xe, g;
    pick(r, e, xe, g);
    const float p = score_fn == kSoftmax ? expf(xe - top) / sum : score_of(xe, score_fn) / sum;
    dot += p * g;
  }
  dot = seg_sum<L>(dot);
#pragma unroll
  for (int j = 0; j < V; ++j) d[j] = 0.0f;
  store_run<V>(grad_logits, logits_code, row + e0, valid, d);
  __syncwarp();
  for (int r = first; r < topk; r += L) {
    int e;
    float xe, g;
    pick(r, e, xe, g);
    float dx;
    if (score_fn == kSoftmax) {
      const float p = expf(xe - top) / sum;
      dx = p * (g - dot);
    } else {
      const float v = score_of(xe, score_fn);
      const float dv = topk > 1 ? (g - dot) / sum : g;
      dx = dv * score_slope(xe, v, score_fn);
    }
    store_scalar<float>(grad_logits, logits_code, row + e, dx);
  }
}

}  // namespace moe_raw

// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
#ifdef MOE_RAW_NVCC_CHECK
namespace moe_raw {
#define MOE_RAW_ROUTER(V, L)                                                                                      \
  template __global__ void router_fwd<V, L>(const void*, int, int64_t, int, const void*, int, int, int, int, int,   \
                                            int, double, int, void*, int, unsigned char*, int64_t*, float*);       \
  template __global__ void router_bwd<V, L>(const void*, int, int64_t, int, int, int, int, double, int,           \
                                            const void*, int, int, const int64_t*, void*);
MOE_RAW_ROUTER(16, 1)
MOE_RAW_ROUTER(16, 2)
MOE_RAW_ROUTER(16, 4)
MOE_RAW_ROUTER(16, 8)
MOE_RAW_ROUTER(16, 16)
MOE_RAW_ROUTER(16, 32)
MOE_RAW_ROUTER(32, 32)
}  // namespace moe_raw
#endif
