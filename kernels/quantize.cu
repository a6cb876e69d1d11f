// moe_raw/kernels/quantize.cu: permute that quantizes to FP8 (issue 19), after the row map is built.
//
// What it computes: for token t, its row x = tokens[t, 0..H) (fp32 / fp16 / bf16) quantized once, as
// moe_raw/reference_fp8.py transcribes each recipe, bit for bit:
//   rowwise    one group (the row): scale = amax / fp8_max (IEEE fp32 division; amax 0 -> 1; a nonzero amax whose
//              quotient underflows -> 2^-149; NaN amax -> the NaN 0x7FC00000), q = sat(x / scale) -> fp8 (RNE);
//   blockwise  groups of 128 elements (the last one may be shorter), the same rule per group;
//   mxfp8      groups of 32: X = floor(log2 amax) - emax (frexp: exact), clamped to [-127, 127], scale byte X + 127
//              (amax 0 -> X = 0; NaN / inf amax -> byte 255 and every element NaN), q = sat(x / 2^X) -> fp8 (RNE).
// sat clamps to +-fp8_max; every NaN is written as the byte 0x7F. The token's codes and scales are then written to
// each permuted row r it occupies (row_map[t, e] = r >= 0, or a drop-and-pad copy -2 - r). quantize_fill writes the
// other rows: spare rows (from row_map[T, 0] to N) and, in the aligned layout, each expert's padding rows
// [row_map[T + 1, e], row_map[T + 2, e]): zero codes, scale 1.0 (E8M0 byte 127).
//
// Launch shape: quantize_warp (rows of whole 16-byte packs): grid = ceil(T / 4), block = kWarpQuantThreads = 128
// (a warp a token), dynamic shared memory 4 * E ints. quantize_rows (any rows): grid = T, block = kQuantThreads
// (one block a token), dynamic shared memory round_up(H, 16) code bytes + round_up(H * token bytes, 16) (the row,
// in its dtype) + groups fp32 + E ints + groups bytes. quantize_grad_rows (unpermute's row gradient, quantized):
// grid = T, block = kQuantThreads, dynamic shared memory round_up(H * grad bytes, 16) + groups fp32 + E (fp32 +
// int) + groups bytes. quantize_fill: grid = S + P * E (aligned) or S, S = min(N, 1024) blocks striding over the
// spare rows, then P blocks per expert striding over its padding rows; block kQuantThreads.
// Preconditions (moe_raw/quantize.py): row_map from moe_raw's permute (fused) / permute_and_pad on the same routing,
// its N rows; token rows with unit stride along H; q [N, H] contiguous uint8; scales row-major [N] / [N, G] fp32 or
// [N, H / 32] uint8; H % 32 == 0 for mxfp8; T * E, N * H < 2^63.
// Bytes moved: read T * H * token bytes (once) + T * E * 4 of the map; write R * H code bytes + R * G scales for the
// R rows holding tokens, and the same per filler row.

#include "common.cuh"
#include <cuda_fp8.h>

namespace moe_raw {

constexpr int kQuantThreads = 256;
enum Recipe : int { kRowwise = 0, kBlockwise = 1, kMxfp8 = 2 };
constexpr unsigned char kNanByte = 0x7f;

// max(a, |b|) that keeps a NaN (torch.amax propagates NaN; fmaxf drops it).
__device__ __forceinline__ float nan_max_abs(float a, float b) {
  b = fabsf(b);
  return isnan(a) ? a : (isnan(b) ? b : fmaxf(a, b));
}

__device__ __forceinline__ unsigned char to_fp8(float v, float fp8_max, int e5m2) {
  if (isnan(v)) return kNanByte;
  v = fminf(fmaxf(v, -fp8_max), fp8_max);
  return static_cast<unsigned char>(e5m2 ? __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2)
                                         : __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// The divisor of a group and, for mxfp8, its E8M0 byte.
__device__ __forceinline__ float group_divisor(float amax, int recipe, float fp8_max, int emax, unsigned char* byte) {
  if (recipe != kMxfp8) {
    if (isnan(amax)) return __int_as_float(0x7fc00000);
    if (amax == 0.0f) return 1.0f;
    const float s = __fdiv_rn(amax, fp8_max);
    return s == 0.0f ? __int_as_float(1) : s;
  }
  if (!isfinite(amax)) {
    *byte = 255;
    return __int_as_float(0x7fc00000);  // every element NaN
  }
  int x = 0;
  if (amax != 0.0f) {
    int e;
    frexpf(amax, &e);  // amax = m 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
    x = min(max(e - 1 - emax, -127), 127);
  }
  *byte = static_cast<unsigned char>(x + 127);
  return x >= -126 ? __int_as_float((x + 127) << 23) : __int_as_float(1 << 22);  // 2^x exactly
}

// Each group's amax of the row's values val(c), c < hidden, and from it the group's divisor (and MX byte): the
// whole block reduces a row (rowwise), a warp a group otherwise (lanes stride over the group). The NaN-keeping max
// is order-free on values, so the result is the same bits whatever the split. Ends with a barrier.
template <typename ValFn>
__device__ __forceinline__ void row_divisors(ValFn val, int hidden, int group, int groups, int recipe, float fp8_max,
                                             int emax, float* divisor, unsigned char* mx_byte, float* warp_amax) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (recipe == kRowwise) {
    float m = 0.0f;
    for (int c = tid; c < hidden; c += kQuantThreads) m = nan_max_abs(m, val(c));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = nan_max_abs(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) warp_amax[warp] = m;
    __syncthreads();
    if (tid == 0) {
      float amax = 0.0f;
      for (int w = 0; w < kQuantThreads / 32; ++w) amax = nan_max_abs(amax, warp_amax[w]);
      divisor[0] = group_divisor(amax, recipe, fp8_max, emax, mx_byte);
    }
  } else {
    for (int g = warp; g < groups; g += kQuantThreads / 32) {
      float m = 0.0f;
      const int end = min(hidden, (g + 1) * group);
      for (int c = g * group + lane; c < end; c += 32) m = nan_max_abs(m, val(c));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = nan_max_abs(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) divisor[g] = group_divisor(m, recipe, fp8_max, emax, mx_byte + g);
    }
  }
  __syncthreads();
}

// xs[c] = row[c], c < hidden, by the block: 16 bytes a load where the row allows it.
template <typename T>
__device__ __forceinline__ void stage_row(const T* row, T* xs, int hidden) {
  if ((hidden * sizeof(T)) % 16 == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(row);
    for (int v = threadIdx.x; v < static_cast<int>(hidden * sizeof(T) / 16); v += kQuantThreads)
      reinterpret_cast<uint4*>(xs)[v] = src[v];
  } else {
    for (int c = threadIdx.x; c < hidden; c += kQuantThreads) xs[c] = row[c];
  }
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows(const T* __restrict__ tokens, int64_t stride, int hidden, const int* __restrict__ row_map,
                  int num_experts, int recipe, float fp8_max, int emax, int e5m2, unsigned char* __restrict__ q,
                  void* __restrict__ scales) {
  extern __shared__ __align__(16) unsigned char quant_smem[];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int group = recipe == kRowwise ? hidden : (recipe == kBlockwise ? 128 : 32);
  const int groups = recipe == kRowwise ? 1 : (hidden + group - 1) / group;
  const int code_bytes = (hidden + 15) & ~15;
  const int row_bytes = (hidden * static_cast<int>(sizeof(T)) + 15) & ~15;
  // The row is staged in its own dtype (bf16: half the shared memory of fp32, so twice the blocks a SM).
  unsigned char* codes = quant_smem;
  T* xs = reinterpret_cast<T*>(quant_smem + code_bytes);
  float* divisor = reinterpret_cast<float*>(quant_smem + code_bytes + row_bytes);
  int* dest = reinterpret_cast<int*>(divisor + groups);
  unsigned char* mx_byte = reinterpret_cast<unsigned char*>(dest + num_experts);
  __shared__ int num_dest;
  __shared__ float warp_amax[kQuantThreads / 32];
  stage_row(tokens + t * stride, xs, hidden);
  if (tid == 0) num_dest = 0;
  __syncthreads();
  // Destinations (order does not matter: every one gets the same bytes).
  for (int e = tid; e < num_experts; e += kQuantThreads) {
    const int r = row_map[t * num_experts + e];
    if (r >= 0 || r <= -2) dest[atomicAdd(&num_dest, 1)] = r >= 0 ? r : -2 - r;
  }
  row_divisors([&](int c) { return to_acc(xs[c]); }, hidden, group, groups, recipe, fp8_max, emax, divisor, mx_byte,
               warp_amax);
  for (int c = tid; c < hidden; c += kQuantThreads)
    codes[c] = to_fp8(__fdiv_rn(to_acc(xs[c]), divisor[c / group]), fp8_max, e5m2);
  __syncthreads();
  const bool vec = (hidden & 15) == 0;
  for (int i = 0; i < num_dest; ++i) {
    const int64_t r = dest[i];
    unsigned char* out = q + r * hidden;
    if (vec) {
      for (int c = tid; c < hidden / 16; c += kQuantThreads)
        reinterpret_cast<uint4*>(out)[c] = reinterpret_cast<const uint4*>(codes)[c];
    } else {
      for (int c = tid; c < hidden; c += kQuantThreads) out[c] = codes[c];
    }
    for (int g = tid; g < groups; g += kQuantThreads) {
      if (recipe == kMxfp8) static_cast<unsigned char*>(scales)[r * groups + g] = mx_byte[g];
      else static_cast<float*>(scales)[r * groups + g] = divisor[g];
    }
  }
}

// quantize_rows with a warp a token (kWarpQuantThreads / 32 tokens a block) and no block barrier, for rows of
// whole 16-byte packs (H * sizeof(T) % 16 == 0, 16-byte aligned rows and stride): lane l takes packs l, l + 32, ...
// The warp lists the token's rows from its row-map line (a ballot), then
//   blockwise / mxfp8: a group is 128 / 32 elements, so the 4 to 32 consecutive lanes holding its packs reduce its
//     amax with xor shuffles: one pass, each pack loaded once, quantized in registers and stored to every row;
//   rowwise: a first pass takes the row's amax (a warp butterfly), the second reloads the packs (L1 / L2) to
//     quantize them.
// The same per-element operations as quantize_rows (the NaN-keeping max is order-free), so the same bits.
// Shared memory: (kWarpQuantThreads / 32) * E ints (each warp's row list).
constexpr int kWarpQuantThreads = 128;

template <typename T>
__device__ __forceinline__ float pack_amax(const uint4& raw) {
  constexpr int kN = 16 / sizeof(T);
  const T* x = reinterpret_cast<const T*>(&raw);
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < kN; ++i) m = nan_max_abs(m, to_acc(x[i]));
  return m;
}

// The pack's 16 / sizeof(T) codes, packed little-endian into words (2 words for 2-byte T, 1 for fp32).
template <typename T>
__device__ __forceinline__ uint2 pack_codes(const uint4& raw, float divisor, float fp8_max, int e5m2) {
  constexpr int kN = 16 / sizeof(T);
  const T* x = reinterpret_cast<const T*>(&raw);
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < kN; ++i)
    w[i / 4] |= static_cast<uint32_t>(to_fp8(__fdiv_rn(to_acc(x[i]), divisor), fp8_max, e5m2)) << (8 * (i % 4));
  return make_uint2(w[0], w[1]);
}

template <typename T>
__global__ void __launch_bounds__(kWarpQuantThreads)
    quantize_warp(const T* __restrict__ tokens, int64_t stride, int hidden, const int* __restrict__ row_map,
                  int num_experts, int recipe, float fp8_max, int emax, int e5m2, unsigned char* __restrict__ q,
                  void* __restrict__ scales, int64_t num_tokens) {
  constexpr int kN = 16 / sizeof(T);  // elements a pack
  constexpr int kWarps = kWarpQuantThreads / 32;
  extern __shared__ int quant_rows[];  // [kWarps][num_experts]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= num_tokens) return;  // no barrier below: a warp without a token leaves
  int* dest = quant_rows + warp * num_experts;
  int n = 0;
  for (int e0 = 0; e0 < num_experts; e0 += 32) {
    const int e = e0 + lane;
    const int code = e < num_experts ? row_map[t * num_experts + e] : -1;
    const bool has = code >= 0 || code <= -2;
    int slot;
    n = warp_slots(has, n, &slot);
    if (has) dest[slot] = code >= 0 ? code : -2 - code;
  }
  __syncwarp();
  const uint4* row = reinterpret_cast<const uint4*>(tokens + t * stride);
  const int packs = hidden / kN;
  if (recipe == kRowwise) {
    float m = 0.0f;
#pragma unroll 4
    // __ldg: one 16-byte load a pack. With row[p] bound to pack_amax's reference, nvcc 13.0 read the pack as
    // kN separate 2-byte loads (PTX ld.global.nc.u16; ncu on the H200: 70% of the kernel's sectors excessive).
    for (int p = lane; p < packs; p += 32) m = nan_max_abs(m, pack_amax<T>(__ldg(row + p)));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = nan_max_abs(m, __shfl_xor_sync(0xffffffffu, m, off));
    unsigned char unused;
    const float divisor = group_divisor(m, recipe, fp8_max, emax, &unused);
#pragma unroll 2
    for (int p = lane; p < packs; p += 32) {
      const uint2 c = pack_codes<T>(__ldg(row + p), divisor, fp8_max, e5m2);
      for (int j = 0; j < n; ++j) {
        unsigned char* out = q + static_cast<int64_t>(dest[j]) * hidden + static_cast<int64_t>(p) * kN;
        if constexpr (kN == 8) *reinterpret_cast<uint2*>(out) = c;
        else *reinterpret_cast<uint32_t*>(out) = c.x;
      }
    }
    for (int j = lane; j < n; j += 32) static_cast<float*>(scales)[dest[j]] = divisor;
    return;
  }
  // blockwise / mxfp8: lanes_per_group consecutive lanes hold a group's packs (4 to 32: a power of two)
  const int group = recipe == kBlockwise ? 128 : 32;
  const int groups = (hidden + group - 1) / group;
  const int lanes_per_group = group / kN;
  constexpr int kUnroll = 2;  // packs a lane loads before it reduces and stores them
  for (int base = 0; base < packs; base += kUnroll * 32) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * 32 + lane;
      raw[u] = p < packs ? row[p] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * 32 + lane;
      float m = p < packs ? pack_amax<T>(raw[u]) : 0.0f;
      for (int off = lanes_per_group >> 1; off > 0; off >>= 1)
        m = nan_max_abs(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (p < packs) {
        unsigned char mx = 0;
        const float divisor = group_divisor(m, recipe, fp8_max, emax, &mx);
        const uint2 c = pack_codes<T>(raw[u], divisor, fp8_max, e5m2);
        const int g = p / lanes_per_group;
        const bool first = p % lanes_per_group == 0;
        for (int j = 0; j < n; ++j) {
          const int64_t r = dest[j];
          unsigned char* out = q + r * hidden + static_cast<int64_t>(p) * kN;
          if constexpr (kN == 8) *reinterpret_cast<uint2*>(out) = c;
          else *reinterpret_cast<uint32_t*>(out) = c.x;
          if (first) {
            if (recipe == kMxfp8) static_cast<unsigned char*>(scales)[r * groups + g] = mx;
            else static_cast<float*>(scales)[r * groups + g] = divisor;
          }
        }
      }
    }
  }
}

// unpermute's row gradient, quantized (unpermute_grad_quantized): one block a token t of g [T, H]. For each row r
// token t occupies (routed pair (t, e): weight w = probs[t, e], or 1 without probs; a drop-and-pad copy: w = 0 with
// probs, 1 without), the row d[c] = T(g[t, c] * w) (fp32 product rounded once to T, exactly as unpermute_bwd writes
// it; 0 where w is 0) is quantized by the recipe and its codes and scales written to row r. quantize_fill writes
// the rows of no token.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_grad_rows(const T* __restrict__ g, int64_t g_stride, int hidden, const int* __restrict__ row_map,
                       int num_experts, int64_t n_rows, const void* __restrict__ probs, int probs_code,
                       int64_t probs_st, int64_t probs_se, int recipe, float fp8_max, int emax, int e5m2,
                       unsigned char* __restrict__ q, void* __restrict__ scales) {
  extern __shared__ __align__(16) unsigned char quant_smem[];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int group = recipe == kRowwise ? hidden : (recipe == kBlockwise ? 128 : 32);
  const int groups = recipe == kRowwise ? 1 : (hidden + group - 1) / group;
  const int row_bytes = (hidden * static_cast<int>(sizeof(T)) + 15) & ~15;
  T* xs = reinterpret_cast<T*>(quant_smem);
  float* divisor = reinterpret_cast<float*>(quant_smem + row_bytes);
  float* dest_w = divisor + groups;
  int* dest = reinterpret_cast<int*>(dest_w + num_experts);
  unsigned char* mx_byte = reinterpret_cast<unsigned char*>(dest + num_experts);
  __shared__ int num_dest;
  __shared__ float warp_amax[kQuantThreads / 32];
  stage_row(g + t * g_stride, xs, hidden);
  if (tid == 0) num_dest = 0;
  __syncthreads();
  for (int e = tid; e < num_experts; e += kQuantThreads) {  // destinations, in any order: each is independent
    const int code = row_map[t * num_experts + e];
    int64_t r = -1;
    float w = 1.0f;
    if (code >= 0 && code < n_rows) {
      r = code;
      if (probs) w = load_scalar<float>(probs, probs_code, t * probs_st + e * probs_se);
    } else if (code <= -2 && -2 - static_cast<int64_t>(code) < n_rows) {
      r = -2 - static_cast<int64_t>(code);
      w = probs ? 0.0f : 1.0f;  // a padding copy adds nothing to a weighted sum: its gradient is 0
    }
    if (r >= 0) {
      const int i = atomicAdd(&num_dest, 1);
      dest[i] = static_cast<int>(r), dest_w[i] = w;
    }
  }
  __syncthreads();
  for (int i = 0; i < num_dest; ++i) {
    const int64_t r = dest[i];
    const float w = dest_w[i];
    auto val = [&](int c) { return w == 0.0f ? 0.0f : to_acc(from_acc<T, float>(to_acc(xs[c]) * w)); };
    row_divisors(val, hidden, group, groups, recipe, fp8_max, emax, divisor, mx_byte, warp_amax);
    unsigned char* out = q + r * hidden;
    if ((hidden & 15) == 0) {  // 16 codes a thread, one 16-byte store
      for (int v = tid; v < hidden / 16; v += kQuantThreads) {
        uint32_t word[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          word[k] = 0u;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int c = 16 * v + 4 * k + b;
            word[k] |= static_cast<uint32_t>(to_fp8(__fdiv_rn(val(c), divisor[c / group]), fp8_max, e5m2)) << (8 * b);
          }
        }
        reinterpret_cast<uint4*>(out)[v] = make_uint4(word[0], word[1], word[2], word[3]);
      }
    } else {
      for (int c = tid; c < hidden; c += kQuantThreads)
        out[c] = to_fp8(__fdiv_rn(val(c), divisor[c / group]), fp8_max, e5m2);
    }
    for (int k = tid; k < groups; k += kQuantThreads) {
      if (recipe == kMxfp8) static_cast<unsigned char*>(scales)[r * groups + k] = mx_byte[k];
      else static_cast<float*>(scales)[r * groups + k] = divisor[k];
    }
    __syncthreads();  // divisor and mx_byte are the next row's
  }
}

// Rows holding no token: zero codes, scale 1.0 (E8M0 byte 127).
__device__ __forceinline__ void fill_row(unsigned char* q, void* scales, int64_t r, int hidden, int groups, int recipe,
                                         int lane, int lanes) {
  unsigned char* out = q + r * hidden;
  if ((hidden & 15) == 0) {
    for (int c = lane; c < hidden / 16; c += lanes) reinterpret_cast<uint4*>(out)[c] = make_uint4(0u, 0u, 0u, 0u);
  } else {
    for (int c = lane; c < hidden; c += lanes) out[c] = 0;
  }
  for (int g = lane; g < groups; g += lanes) {
    if (recipe == kMxfp8) static_cast<unsigned char*>(scales)[r * groups + g] = 127;
    else static_cast<float*>(scales)[r * groups + g] = 1.0f;
  }
}

template <int Threads>
__global__ void __launch_bounds__(Threads)
    quantize_fill(unsigned char* __restrict__ q, void* __restrict__ scales, int hidden, int groups, int recipe,
                  int64_t num_rows, const int* __restrict__ row_map, int64_t num_tokens, int num_experts,
                  int pad_blocks) {
  const int64_t lines = num_tokens * num_experts;
  // The first gridDim.x - P * E blocks stride over the spare rows; in the aligned layout (P = pad_blocks > 0) the
  // last P * E blocks take the experts' padding rows (fewer than align_size each), P an expert, striding by P rows.
  // A 2-D grid (x, 1 + E) launched ~10^6 blocks that mostly returned at once: 0.63 ms at DeepSeek-V3 on the H200,
  // 5x the quantize itself; one block per expert left an expert's whole padding to one block.
  const int spare_blocks = static_cast<int>(gridDim.x) - pad_blocks * num_experts;
  int64_t begin, end, step;
  if (static_cast<int>(blockIdx.x) < spare_blocks) {
    begin = row_map[lines] + blockIdx.x, end = num_rows, step = spare_blocks;
  } else {
    const int i = static_cast<int>(blockIdx.x) - spare_blocks, e = i / pad_blocks;
    begin = row_map[lines + num_experts + e] + i % pad_blocks, end = row_map[lines + 2 * num_experts + e];
    step = pad_blocks;
  }
  end = min(end, num_rows);
  for (int64_t r = begin; r < end; r += step) fill_row(q, scales, r, hidden, groups, recipe, threadIdx.x, Threads);
}

}  // namespace moe_raw

// CI compiles this file with nvcc (warnings as errors); NVRTC instantiates through name_expressions at run time.
#ifdef MOE_RAW_NVCC_CHECK
namespace moe_raw {
#define MOE_RAW_QUANTIZE_ROWS(T)                                                                          \
  template __global__ void quantize_rows<T>(const T*, int64_t, int, const int*, int, int, float, int, int, \
                                            unsigned char*, void*);
MOE_RAW_QUANTIZE_ROWS(float)
MOE_RAW_QUANTIZE_ROWS(__half)
MOE_RAW_QUANTIZE_ROWS(__nv_bfloat16)
#define MOE_RAW_QUANTIZE_WARP(T)                                                                          \
  template __global__ void quantize_warp<T>(const T*, int64_t, int, const int*, int, int, float, int, int, \
                                            unsigned char*, void*, int64_t);
MOE_RAW_QUANTIZE_WARP(float)
MOE_RAW_QUANTIZE_WARP(__half)
MOE_RAW_QUANTIZE_WARP(__nv_bfloat16)
#define MOE_RAW_QUANTIZE_GRAD_ROWS(T)                                                                                  \
  template __global__ void quantize_grad_rows<T>(const T*, int64_t, int, const int*, int, int64_t, const void*, int, \
                                                 int64_t, int64_t, int, float, int, int, unsigned char*, void*);
MOE_RAW_QUANTIZE_GRAD_ROWS(float)
MOE_RAW_QUANTIZE_GRAD_ROWS(__half)
MOE_RAW_QUANTIZE_GRAD_ROWS(__nv_bfloat16)
template __global__ void quantize_fill<kQuantThreads>(unsigned char*, void*, int, int, int, int64_t, const int*, int64_t,
                                                      int, int);
}  // namespace moe_raw
#endif
