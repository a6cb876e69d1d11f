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
// d scores [T, E] fp32; the bias gets none (it only ranks). Math in A = fp32 for every logits dtype, fp64 included
// (Megatron main converts the logits to fp32 for the score functions and keeps every intermediate in fp32; moe_raw
// instantiates A = float only); every warp sum runs in one fixed butterfly order, so results repeat bit for bit and
// no atomics are used.
//
// Launch shape: grid = ceil(T / kRouterWarps), block = 32 * kRouterWarps: one warp per token. Lane l holds experts
// l, l + 32, ... (V = ceil(E / 32) registers, V a template parameter: 1, 2, 4, 8, 16 or 32, so E <= 1024). Top-k is
// K rounds of a warp arg-max over the lanes' candidates; grouped routing stages the keys in dynamic shared memory
// (kRouterWarps * E * sizeof(A) bytes; none otherwise).
// Preconditions (moe_raw/router.py checks them): logits [T, E] contiguous, 1 <= K <= min(E, 32); groups: E % G == 0,
// G <= 64, 1 <= group_topk <= G, group_topk <= K, group_topk * E / G >= K; outputs contiguous; T * E < 2^63.
// Bytes moved: forward reads T * E * logits bytes (+ E * 4 of bias) and writes T * K * 8 (idx) plus T * K * probs
// bytes (compact) or T * E * (probs bytes + 1) (dense) or T * E * 5 (aux); backward reads T * E * logits bytes (the
// pre-softmax and aux forms; the others read K entries a token) and the gradient, and writes T * E * logits bytes.

#include "common.cuh"

namespace moe_raw {

constexpr int kRouterWarps = 4;
enum ScoreFn : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };
constexpr int kNoIndex = 0x7fffffff;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(__int_as_float(0x7f800000)); }

// The score s(x) of sigmoid / sqrtsoftplus and its derivative ds/dx given s (torch's softplus: threshold 20).
template <typename A>
__device__ __forceinline__ A score_of(A x, int fn) {
  if (fn == kSigmoid) return A(1) / (A(1) + exp_(-x));
  return sqrt_(x > A(20) ? x : log1p_(exp_(x)));
}
template <typename A>
__device__ __forceinline__ A score_slope(A x, A s, int fn) {
  if (fn == kSigmoid) return s * (A(1) - s);
  const A dsoftplus = x > A(20) ? A(1) : A(1) / (A(1) + exp_(-x));
  return dsoftplus / (A(2) * s);
}

// Rank order: (v1, i1) comes before (v2, i2). Larger first, NaN above everything (torch.topk's order), the lower
// index first among equal values; i == kNoIndex is "no candidate" and comes after every real one.
template <typename A>
__device__ __forceinline__ bool before(A v1, int i1, A v2, int i2) {
  const bool n1 = isnan(v1), n2 = isnan(v2);
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 > v2;
  return i1 < i2;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Warp arg-max in rank order: every lane ends with the best (v, i) of the warp and its payload p.
template <typename A>
__device__ __forceinline__ void warp_best(A& v, int& i, A& p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, off), op = __shfl_xor_sync(0xffffffffu, p, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (before(ov, oi, v, i)) v = ov, i = oi, p = op;
  }
}

// x rounded to the dtype of code (the group scores of softmax-after-top-k rank logits: Megatron sums them in the
// logits' dtype).
template <typename A>
__device__ __forceinline__ A round_to(A x, int code) {
  if (code == kF16) return static_cast<A>(__half2float(__float2half_rn(static_cast<float>(x))));
  if (code == kBF16) return static_cast<A>(__bfloat162float(__float2bfloat16_rn(static_cast<float>(x))));
  return code == kF32 ? static_cast<A>(static_cast<float>(x)) : x;
}

// Sum of the m largest of keys[0, n) (shared memory), taken in rank order.
template <typename A>
__device__ A top_sum(const A* keys, int n, int m) {
  A total = A(0), pv = A(0);
  int pi = -1;
  for (int r = 0; r < m; ++r) {
    A bv = neg_inf<A>();
    int bi = kNoIndex;
    for (int e = 0; e < n; ++e)
      if ((pi < 0 || before(pv, pi, keys[e], e)) && before(keys[e], e, bv, bi)) bv = keys[e], bi = e;
    total += bv;
    pv = bv, pi = bi;
  }
  return total;
}

// Bit g of the result: group g is kept (the group_topk best group scores, sum of each group's top m keys).
template <typename A, int V>
__device__ unsigned long long kept_groups(const A (&key)[V], A* stage, int num_experts, int num_groups,
                                          int group_topk, int m, int key_code, int lane) {
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j * 32 + lane < num_experts) stage[j * 32 + lane] = key[j];
  __syncwarp();
  const int size = num_experts / num_groups;
  A gscore[2];
  for (int h = 0; h < 2; ++h) {
    const int g = lane + 32 * h;
    gscore[h] = g < num_groups ? round_to(top_sum(stage + g * size, size, m), key_code) : A(0);
  }
  __syncwarp();  // stage is reused by nobody else, but keep its reads ahead of any later writes
  unsigned long long kept = 0ull;
  for (int r = 0; r < group_topk; ++r) {
    A bv = neg_inf<A>(), unused = A(0);
    int bi = kNoIndex;
    for (int h = 0; h < 2; ++h) {
      const int g = lane + 32 * h;
      if (g < num_groups && !((kept >> g) & 1ull) && before(gscore[h], g, bv, bi)) bv = gscore[h], bi = g;
    }
    warp_best(bv, bi, unused);
    kept |= 1ull << bi;
  }
  return kept;
}

template <typename A, int V>
__global__ void __launch_bounds__(32 * kRouterWarps)
    router_fwd(const void* __restrict__ logits, int logits_code, int64_t num_tokens, int num_experts,
               const void* __restrict__ bias, int bias_code, int topk, int score_fn, int pre_softmax, int num_groups,
               int group_topk, double scaling, int aux, void* __restrict__ probs, int dense,
               unsigned char* __restrict__ routing_map, int64_t* __restrict__ idx, float* __restrict__ scores) {
  extern __shared__ unsigned char router_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= num_tokens) return;  // whole warps leave together
  const int64_t row = t * num_experts;
  A key[V], val[V];  // val: the score a pick contributes; key: what ranks it
  unsigned out = 0u;  // bit j: expert j * 32 + lane is no candidate (past E, in a dropped group, or picked)
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = j * 32 + lane;
    val[j] = e < num_experts ? load_scalar<A>(logits, logits_code, row + e) : neg_inf<A>();
    if (e >= num_experts) out |= 1u << j;
  }
  const bool full_softmax = score_fn == kSoftmax && (pre_softmax || aux);
  if (full_softmax) {
    A m = neg_inf<A>(), sum = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) m = fmax(m, val[j]);
    m = warp_max(m);
#pragma unroll
    for (int j = 0; j < V; ++j) sum += (out >> j) & 1u ? A(0) : exp_(val[j] - m);
    sum = warp_sum(sum);
#pragma unroll
    for (int j = 0; j < V; ++j) val[j] = exp_(val[j] - m) / sum;
  } else if (score_fn != kSoftmax) {
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      val[j] = (out >> j) & 1u ? A(0) : score_of(val[j], score_fn);
      sum += val[j];
    }
    if (aux) {
      sum = warp_sum(sum) + A(1e-20);
#pragma unroll
      for (int j = 0; j < V; ++j) val[j] = val[j] / sum;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = j * 32 + lane;
    key[j] = val[j];
    if (!aux && score_fn != kSoftmax && bias != nullptr && e < num_experts)
      key[j] += load_scalar<A>(bias, bias_code, e);
  }
  if (!aux && group_topk > 0) {
    A* stage = reinterpret_cast<A*>(router_smem) + static_cast<int64_t>(warp) * num_experts;
    const unsigned long long kept =
        kept_groups<A, V>(key, stage, num_experts, num_groups, group_topk, topk / group_topk,
                          score_fn == kSoftmax && !pre_softmax ? logits_code : (sizeof(A) == 8 ? kF64 : kF32), lane);
    const int size = num_experts / num_groups;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int e = j * 32 + lane;
      if (e < num_experts && !((kept >> (e / size)) & 1ull)) out |= 1u << j;
    }
  }
  // Top-k: lane r keeps pick r.
  int my_idx = 0;
  A my_key = A(0), my_val = A(0);
  for (int r = 0; r < topk; ++r) {
    A bv = neg_inf<A>(), bval = A(0);
    int bi = kNoIndex;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (!((out >> j) & 1u) && before(key[j], j * 32 + lane, bv, bi)) bv = key[j], bi = j * 32 + lane, bval = val[j];
    warp_best(bv, bi, bval);
    if ((bi & 31) == lane) out |= 1u << (bi >> 5);
    if (lane == r) my_idx = bi, my_key = bv, my_val = bval;
  }
  const bool picked = lane < topk;
  A p = my_val;
  if (!aux) {
    if (score_fn == kSoftmax && !pre_softmax) {  // the K-way softmax of the picked logits; pick 0 is their max
      const A top = __shfl_sync(0xffffffffu, my_key, 0);  // every lane shuffles: a shuffle is not a branch's
      const A ex = picked ? exp_(my_val - top) : A(0);
      p = ex / warp_sum(ex);
    } else if (score_fn != kSoftmax && topk > 1) {
      p = my_val / (warp_sum(picked ? my_val : A(0)) + A(1e-20));
    }
    if (scaling != 0.0) p = p * static_cast<A>(scaling);
  }
  if (picked) idx[t * topk + lane] = my_idx;
  if (aux) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j * 32 + lane < num_experts) scores[row + j * 32 + lane] = static_cast<float>(val[j]);
  }
  if (!dense && !aux) {
    if (picked) store_scalar<A>(probs, logits_code, t * topk + lane, p);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = j * 32 + lane;
    if (e >= num_experts) continue;
    routing_map[row + e] = 0;
    if (!aux) store_scalar<A>(probs, logits_code, row + e, A(0));
  }
  __syncwarp();  // orders the zero fill before the picks' stores (other lanes' addresses)
  if (picked) {
    routing_map[row + my_idx] = 1;
    if (!aux) store_scalar<A>(probs, logits_code, row + my_idx, p);
  }
}

// d logits from d probs (dense [T, E] or compact [T, K], grad_code its dtype) or, in aux mode, d scores [T, E].
template <typename A, int V>
__global__ void __launch_bounds__(32 * kRouterWarps)
    router_bwd(const void* __restrict__ logits, int logits_code, int64_t num_tokens, int num_experts, int topk,
               int score_fn, int pre_softmax, double scaling, int aux, const void* __restrict__ grad, int grad_code,
               int dense, const int64_t* __restrict__ idx, void* __restrict__ grad_logits) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= num_tokens) return;
  const int64_t row = t * num_experts;
  const bool picked = lane < topk;
  const A scale = scaling != 0.0 ? static_cast<A>(scaling) : A(1);
  int e_pick = 0;
  A x_pick = A(0), g = A(0);
  if (picked && !aux) {
    e_pick = static_cast<int>(idx[t * topk + lane]);
    x_pick = load_scalar<A>(logits, logits_code, row + e_pick);
    g = load_scalar<A>(grad, grad_code, dense ? row + e_pick : t * topk + lane) * scale;
  }
  if (aux || (score_fn == kSoftmax && pre_softmax)) {  // every logit gets a gradient
    A x[V], s[V], gs[V];
    A m = neg_inf<A>(), sum = A(0), dot = A(0);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int e = j * 32 + lane;
      x[j] = e < num_experts ? load_scalar<A>(logits, logits_code, row + e) : neg_inf<A>();
      gs[j] = aux && e < num_experts ? load_scalar<A>(grad, grad_code, row + e) : A(0);
      m = fmax(m, x[j]);
    }
    if (score_fn == kSoftmax) {
      m = warp_max(m);
#pragma unroll
      for (int j = 0; j < V; ++j) sum += j * 32 + lane < num_experts ? exp_(x[j] - m) : A(0);
      sum = warp_sum(sum);
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = j * 32 + lane < num_experts ? exp_(x[j] - m) / sum : A(0);
    } else {  // aux sigmoid / sqrtsoftplus: s = v / (sum v + 1e-20)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s[j] = j * 32 + lane < num_experts ? score_of(x[j], score_fn) : A(0);
        sum += s[j];
      }
      sum = warp_sum(sum) + A(1e-20);
    }
    if (aux) {
#pragma unroll
      for (int j = 0; j < V; ++j) dot += gs[j] * (score_fn == kSoftmax ? s[j] : s[j] / sum);
      dot = warp_sum(dot);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int e = j * 32 + lane;
        if (e >= num_experts) continue;
        const A d = score_fn == kSoftmax ? s[j] * (gs[j] - dot) : (gs[j] - dot) / sum * score_slope(x[j], s[j], score_fn);
        store_scalar<A>(grad_logits, logits_code, row + e, d);
      }
      return;
    }
    const A s_pick = picked ? exp_(x_pick - m) / sum : A(0);  // the forward's value of this pick
    dot = warp_sum(s_pick * g);
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j * 32 + lane < num_experts) store_scalar<A>(grad_logits, logits_code, row + j * 32 + lane, -s[j] * dot);
    __syncwarp();
    if (picked) store_scalar<A>(grad_logits, logits_code, row + e_pick, s_pick * (g - dot));
    return;
  }
  // Only the picks get a gradient.
  A d = A(0);
  if (score_fn == kSoftmax) {
    const A top = __shfl_sync(0xffffffffu, x_pick, 0);
    const A ex = picked ? exp_(x_pick - top) : A(0);
    const A p = ex / warp_sum(ex);
    d = p * (g - warp_sum(p * g));
  } else {
    const A v = picked ? score_of(x_pick, score_fn) : A(0);
    A dv = g;
    if (topk > 1) {
      const A sum = warp_sum(v) + A(1e-20);
      dv = (g - warp_sum(g * (v / sum))) / sum;
    }
    d = picked ? dv * score_slope(x_pick, v, score_fn) : A(0);
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j * 32 + lane < num_experts) store_scalar<A>(grad_logits, logits_code, row + j * 32 + lane, A(0));
  __syncwarp();
  if (picked) store_scalar<A>(grad_logits, logits_code, row + e_pick, d);
}

}  // namespace moe_raw

// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
#ifdef MOE_RAW_NVCC_CHECK
namespace moe_raw {
#define MOE_RAW_ROUTER(A, V)                                                                                      \
  template __global__ void router_fwd<A, V>(const void*, int, int64_t, int, const void*, int, int, int, int, int,  \
                                            int, double, int, void*, int, unsigned char*, int64_t*, float*);       \
  template __global__ void router_bwd<A, V>(const void*, int, int64_t, int, int, int, int, double, int,           \
                                            const void*, int, int, const int64_t*, void*);
MOE_RAW_ROUTER(float, 1)
MOE_RAW_ROUTER(float, 2)
MOE_RAW_ROUTER(float, 4)
MOE_RAW_ROUTER(float, 8)
MOE_RAW_ROUTER(float, 16)
MOE_RAW_ROUTER(float, 32)
}  // namespace moe_raw
#endif
