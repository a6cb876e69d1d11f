"""Which store reaches the write bandwidth of cudaMemsetAsync? (run from the repository root: PYTHONPATH=. python3
bench/pending/write_probe.py)

Permute's forward writes K bytes for each byte it reads, and on the H200 its row kernel ran at 71-78% of the DRAM
peak, as fast as a lookup-free mover (bench/results/2026-12-06-h200-twentieth/ncu-misses.txt), while memset wrote at
106% of the copy rate and torch's fill_ at 79% (2026-12-04-h200-issue16). So the store itself may be the limit. Each
kernel here writes 2 GiB of rows (4 KiB or 14 KiB: Qwen3's and DeepSeek-V3's bf16 rows), a block a row, in row order
or to a random permutation of the rows (permute's pattern), with one store flavour:

  v4        st.global.v4 (what the row kernels use)
  cs        st.global.cs.v4 (streaming: evict first in L1 and L2)
  evict     st.global.L2::cache_hint.v4 with an evict_first policy
  wt        st.global.wt.v4 (write-through)
  bulk      cp.async.bulk.global.shared::cta (the TMA engine; a warp's lane 0 stores a whole row from shared memory)

beside cudaMemsetAsync, torch's fill_ and copy_, all in one process. GB/s counts bytes written (copy_: read + write).
"""

from __future__ import annotations

import sys

import torch

from bench import common
from moe_raw import _cupy_cache

SRC = r"""
#ifdef __CUDACC_RTC__  // NVRTC ships no libc headers (as kernels/common.cuh)
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif
template <int MODE>
__global__ void __launch_bounds__(128) write_rows(uint4* __restrict__ dst, const int* __restrict__ perm, int row_vec) {
  const int64_t row = perm ? perm[blockIdx.x] : blockIdx.x;
  uint4* d = dst + row * row_vec;
  const uint4 val = make_uint4(blockIdx.x, threadIdx.x, 1u, 2u);
  uint64_t policy = 0;
  if (MODE == 2) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  for (int k = threadIdx.x; k < row_vec; k += blockDim.x) {
    if (MODE == 0) {
      d[k] = val;
    } else if (MODE == 1) {
      __stcs(d + k, val);
    } else if (MODE == 2) {
      asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(d + k), "r"(val.x), "r"(val.y),
                   "r"(val.z), "r"(val.w), "l"(policy) : "memory");
    } else {
      __stwt(d + k, val);
    }
  }
}

// a warp a row: the block's 4 warps take rows 4 * blockIdx.x + warp; lane 0 stores the row with one bulk copy
__global__ void __launch_bounds__(128) write_rows_bulk(uint4* __restrict__ dst, const int* __restrict__ perm,
                                                       int row_vec, int n_rows) {
  extern __shared__ uint4 buf[];
  for (int k = threadIdx.x; k < row_vec; k += blockDim.x) buf[k] = make_uint4(k, 1u, 2u, 3u);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const int r = blockIdx.x * 4 + (threadIdx.x >> 5);
  if ((threadIdx.x & 31) == 0 && r < n_rows) {
    const int64_t row = perm ? perm[r] : r;
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(buf));
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + row * row_vec), "r"(s),
                 "r"(row_vec * 16) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  }
}
"""

MODES = {"v4": 0, "cs": 1, "evict": 2, "wt": 3}


def main() -> int:
    cp = _cupy_cache.cupy()
    names = [f"write_rows<{m}>" for m in MODES.values()] + ["write_rows_bulk"]
    mod = cp.RawModule(code=SRC, options=("-std=c++17",), name_expressions=names)
    nbytes = 2 << 30
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    stream = torch.cuda.current_stream().cuda_stream
    copy_gbs = common.copy_bandwidth_gbs()
    rows_out = []

    def timed(kernel, blocks, args, shared=0):
        ext = cp.cuda.ExternalStream(stream)
        return common.do_bench(lambda: kernel((blocks,), (128,), args, shared_mem=shared, stream=ext))

    def row(case, pattern, ms, nb):
        gbs = nb / (ms * 1e-3) / 1e9
        rows_out.append((case, pattern, ms, gbs, 100 * gbs / copy_gbs))

    memset_gbs = common.write_bandwidth_gbs(nbytes)
    row("cudaMemsetAsync", "contiguous", nbytes / (memset_gbs * 1e6), nbytes)  # bench.common's write-only rate
    bf = dst.view(torch.bfloat16)
    row("torch bf16 fill_", "contiguous", common.do_bench(lambda: bf.fill_(1.0)), nbytes)
    row("torch copy_ (read + write)", "contiguous", common.do_bench(lambda: dst.copy_(src)), 2 * nbytes)
    for row_bytes in (4096, 14336):
        row_vec = row_bytes // 16
        n_rows = nbytes // row_bytes
        perms = {"row order": None, "permuted rows": torch.randperm(n_rows, device="cuda", dtype=torch.int64).int()}
        for pattern, perm in perms.items():
            pp = perm.data_ptr() if perm is not None else 0
            for mode, m in MODES.items():
                ms = timed(mod.get_function(f"write_rows<{m}>"), n_rows, (dst.data_ptr(), pp, row_vec))
                row(f"{mode} {row_bytes} B rows", pattern, ms, n_rows * row_bytes)
            kb = mod.get_function("write_rows_bulk")
            kb.max_dynamic_shared_size_bytes = row_bytes
            ms = timed(kb, -(-n_rows // 4), (dst.data_ptr(), pp, row_vec, n_rows), row_bytes)
            row(f"bulk {row_bytes} B rows", pattern, ms, n_rows * row_bytes)
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbs:.0f} GB/s (read + write)")
    print("| store | rows | ms | GB/s | % of copy |\n| --- | --- | --- | --- | --- |")
    for case, pattern, ms, gbs, pct in rows_out:
        print(f"| {case} | {pattern} | {ms:.4f} | {gbs:.0f} | {pct:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
