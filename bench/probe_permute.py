"""Where permute's bandwidth stops on this card: permute forward beside the write ceilings, in one run.

    python -m bench.probe_permute [--kernels DIR] [--json PATH]

Prints, per bench shape (bf16), the permute forward (with probs, fused, num_out_tokens given) and three peers of
the same byte mix: the device copy (1 read : 1 write), the write-only fills (torch fill_, cudaMemsetAsync) and
torch's broadcast copy ``out.view(T, K, H).copy_(x[:, None].expand(T, K, H))`` (1 read : K writes, no indexing:
what a perfect permute of a sorted routing would cost). "mix roofline" is the time the permute's bytes need when
reads go at the copy rate and writes at the best write-only rate: t = read / copy + write / write_only. Two parts of
the permute, each timed alone: "map only" is permute of the zero-width tokens ``x[:, :0]`` (the routing tables and
the row map, probs and indices, no row bytes), "copy only" is ``permute_with_row_map(x, row_map, N)`` (every row
moved by the scatter_rows kernel from a finished row map: no tables, no block scan). "token-major" is the same
kernel with a row map that sends each token's K copies to K adjacent rows (rows t*K .. t*K + K - 1 when every token
has K experts): the same bytes and instructions, only the destinations differ. If it is much faster than "copy
only", the expert-major order of permute's output (fixed by the API), not the kernel, holds the scatter back.
"write-only" writes the same N rows with no reads (a probe kernel here: one block a token, its K rows stored from
registers), as a share of the best write-only rate (fill_ / memset): at permute's expert-major rows one row after
the other, the same rows interleaved in 2 KiB steps as scatter_rows writes them, and the token-major rows one after
the other. Near 100% means the scattered rows write at memset's rate and what the copies lose comes from mixing the
token reads in; row-by-row well above interleaved means the store order is what costs.
"phased" (``--phased``, a second table) moves the same rows in batches: each block loads a batch of consecutive
whole token rows into shared memory (cp.async), then bulk-stores each row to its K rows, batch after batch. The
batch is the rows one block's shared memory holds, or a fraction of it; the grid is persistent (every block
resident at once, looping over the batches) or one batch a block; "barrier" adds a grid barrier after each round of
batches, so that no SM reads while another writes; "1 row, N threads" takes one token a block of N threads
(permute_scatter's shape at 128). Faster than "copy only" says what a row mover can win by staging many whole rows
a block.
``--kernels DIR`` loads the .cu files from DIR instead of the installed ones (an A/B of two kernel versions in two
processes on one machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

import moe_raw
from moe_raw import _cupy_cache, _launch

from . import common
from .bench_permute import SHAPES, bytes_permute_fwd, make_inputs


def _fill_gbs(nbytes: int = 2 << 30) -> float:
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = common.do_bench(lambda: dst.fill_(1))
    return nbytes / (ms * 1e-3) / 1e9


# One block a token: zeros (the token id in the first word) to each of its K destination rows, 16-byte stores, no
# reads but the K row numbers. dest: int32 [T, K]; row_vecs: 16-byte vectors a row. interleave 0: one row after
# the other (each row's bytes in one sweep); 1: as scatter_rows stores, each 2 KiB step of the row to all K rows
# before the next step.
_WRITE_ONLY_SRC = r"""
extern "C" __global__ void write_only_rows(uint4* __restrict__ dst, const int* __restrict__ dest, int k,
                                           long long row_vecs, int interleave) {
  const long long t = blockIdx.x;
  const uint4 z = make_uint4(static_cast<unsigned>(t), 0u, 0u, 0u);
  if (interleave) {
    for (long long v = threadIdx.x; v < row_vecs; v += blockDim.x)
      for (int j = 0; j < k; ++j) __stcs(dst + static_cast<long long>(dest[t * k + j]) * row_vecs + v, z);
    return;
  }
  for (int j = 0; j < k; ++j) {
    uint4* d = dst + static_cast<long long>(dest[t * k + j]) * row_vecs;
    for (long long v = threadIdx.x; v < row_vecs; v += blockDim.x) __stcs(d + v, z);
  }
}
"""
_WRITE_ONLY_SIGNATURE = "PPiqi"  # _launch.SIGNATURES' letters: P pointer, q int64, i int32


def _write_only(out: torch.Tensor, dest: torch.Tensor, interleave: bool = False):
    """A launcher of write_only_rows on torch's current stream: ``out`` [N, H] (16-byte rows), ``dest`` [T, K]. The
    kernel tuple holds the cupy Function (its owner), so the module stays loaded while the launcher lives."""
    fn = _cupy_cache.cupy().RawKernel(_WRITE_ONLY_SRC, "write_only_rows").kernel  # compiled once, then CuPy's cache
    kern = _launch.compiled_kernel(fn.ptr, _WRITE_ONLY_SIGNATURE, owner=fn)
    row_vecs = out.shape[1] * out.element_size() // 16
    args = (out.data_ptr(), dest.data_ptr(), dest.shape[1], row_vecs, int(interleave))
    # the lambda reads out and dest, so it keeps the memory its launches write and read alive
    return lambda: _launch.launch_compiled(kern, out.device.index, dest.shape[0], 128, args)


# Batches of rows_per_block consecutive token rows, a block at a time: load the batch whole into shared memory
# (cp.async 16 B), then bulk-store each row to its K destination rows; a grid smaller than the batch count loops
# (batch blockIdx.x, then + gridDim.x, ...: "rounds"). mode 0: no barrier; 1: a grid barrier after each round once
# the stores have read the stage; 2: once they have completed (needs every block resident: a persistent grid).
# The barrier counter only grows (one arrival a block a barrier), so no reset between launches: the target of an
# arrival is the next multiple of the grid. A runaway spin traps instead of hanging. dest: int32 [T, K].
_PHASED_SRC = r"""
using namespace moe_raw;

__device__ __forceinline__ void grid_barrier(unsigned long long* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long old = atomicAdd(counter, 1ull);
    const unsigned long long target = (old / gridDim.x + 1) * gridDim.x;
    long long spins = 0;
    while (*reinterpret_cast<volatile unsigned long long*>(counter) < target) {
      __nanosleep(20);
      if (++spins > (1LL << 26)) __trap();
    }
    __threadfence();
  }
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256)
    phased_rows(const uint4* __restrict__ src, uint4* __restrict__ dst, const int* __restrict__ dest, int k,
                long long row_vecs, long long num_tokens, int rows_per_block, int mode, unsigned long long* counter) {
#ifdef MOE_RAW_BULK_COPY  // sm_90+; the launcher never runs it elsewhere
  extern __shared__ __align__(128) uint4 stage[];
  const long long per_round = static_cast<long long>(gridDim.x) * rows_per_block;
  for (long long base = 0; base < num_tokens; base += per_round) {
    const long long t0 = base + static_cast<long long>(blockIdx.x) * rows_per_block;
    const long long rows = max(0LL, min(static_cast<long long>(rows_per_block), num_tokens - t0));
    const long long nv = rows * row_vecs;
    for (long long i = threadIdx.x; i < nv; i += blockDim.x) stage_fill16(stage + i, src + t0 * row_vecs + i);
    stage_fill_wait();
    bulk_fence_shared();
    __syncthreads();
    for (long long j = threadIdx.x; j < rows * k; j += blockDim.x) {
      const long long r = j / k;
      bulk_store(dst + static_cast<long long>(dest[(t0 + r) * k + j % k]) * row_vecs, stage + r * row_vecs,
                 static_cast<int>(row_vecs * 16));
    }
    bulk_commit();
    if (mode == 2) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    else bulk_wait_read();
    __syncthreads();
    if (mode) grid_barrier(counter);
  }
#endif
}
"""
_PHASED_SIGNATURE = "PPPiqqiiP"


# (label, batch = the rows shared memory holds / divisor (or, a negative divisor, that many rows), persistent grid,
# mode, threads a block); per batch: one batch a block. The one-row configurations are permute_scatter's shape
# (one token a block): at 128 threads its block size, at 256 the phased mover's (K 1-2 moved fastest with small
# batches on an H100, 2026-12-06: Mixtral 93.4% of copy, 2.5 points ahead of copy only).
_PHASED_CONFIGS = (
    ("1/1 persistent", 1, True, 0, 256),
    ("1/1 persistent, barrier", 1, True, 1, 256),
    ("1/2 persistent", 2, True, 0, 256),
    ("1/2 per batch", 2, False, 0, 256),
    ("1/4 persistent", 4, True, 0, 256),
    ("1/4 per batch", 4, False, 0, 256),
    ("1/8 per batch", 8, False, 0, 256),
    ("1/16 per batch", 16, False, 0, 256),
    ("1 row, 256 threads", -1, False, 0, 256),
    ("1 row, 128 threads", -1, False, 0, 128),
)


def _phased_source() -> str:
    """phased_rows' NVRTC source: common.cuh (the bulk-copy helpers), then _PHASED_SRC."""
    return (_launch._kernels_dir() / "common.cuh").read_text() + _PHASED_SRC


def _phased(
    x: torch.Tensor,
    out: torch.Tensor,
    dest: torch.Tensor,
    divisor: int,
    persistent: bool,
    mode: int,
    threads: int = 256,
):
    """A launcher of phased_rows on torch's current stream (x [T, H], out [N, H], dest [T, K]), blocks of
    ``threads`` (at most 256), batches of (rows shared memory holds) / divisor rows (-divisor rows where divisor < 0);
    the grid: every block resident at once (persistent) or one batch a block. None where a row does not fit in
    shared memory or the card has no bulk copy (sm < 90)."""
    props = torch.cuda.get_device_properties(x.device)
    if props.major < 9:
        return None
    row_bytes = x.shape[1] * x.element_size()
    rows = (props.shared_memory_per_block_optin - 1024) // row_bytes // divisor if divisor > 0 else -divisor
    if rows < 1:
        return None
    cupy = _cupy_cache.cupy()
    fn = cupy.RawKernel(_phased_source(), "phased_rows", options=_launch.NVRTC_OPTIONS).kernel
    kern = _launch.compiled_kernel(fn.ptr, _PHASED_SIGNATURE, owner=fn)
    smem = rows * row_bytes
    _launch._allow_shared_mem(kern[0], x.device.index, smem)
    per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, smem)
    grid = props.multi_processor_count * per_sm if persistent else _launch.cdiv(x.shape[0], rows)
    counter = torch.zeros(1, dtype=torch.int64, device=x.device)
    args = (x.data_ptr(), out.data_ptr(), dest.data_ptr(), dest.shape[1], row_bytes // 16, x.shape[0], rows, mode,
            counter.data_ptr())  # fmt: skip
    # the lambda reads x, out, dest and counter, so it keeps them alive
    return lambda: (counter, _launch.launch_compiled(kern, x.device.index, grid, threads, args, smem))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", help="directory holding permute.cu / common.cuh to load instead")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--shapes", default=None, help="comma list of bench shape names (default: all)")
    ap.add_argument("--phased", action="store_true", help="also time the phased row movers (a second table)")
    args = ap.parse_args()
    if args.kernels:
        _launch._kernels_dir = lambda: pathlib.Path(args.kernels).resolve()
    copy = common.copy_bandwidth_gbs()
    fill = _fill_gbs()
    memset = common.write_bandwidth_gbs()
    write = max(fill, memset)
    print(f"copy {copy:.0f} GB/s | fill_ {fill:.0f} GB/s ({100 * fill / copy:.0f}% of copy) | "
          f"cudaMemsetAsync {memset:.0f} GB/s ({100 * memset / copy:.0f}%)")  # fmt: skip
    rows, phased_lines = [], []
    print("| shape | permute ms | % copy | % mix roofline | expand-copy ms | expand % copy | permute / expand | "
          "map only ms | copy only ms (% copy) | token-major ms (% copy) | write-only ms (% write) | "
          "write-only interleaved ms (% write) | write-only token-major ms (% write) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = args.shapes.split(",") if args.shapes else list(SHAPES)
    for name in names:
        T, E, H, K = SHAPES[name]
        x, rm, probs = make_inputs(T, E, H, K)
        N = T * K
        s = x.element_size()
        ms = common.do_bench(lambda: moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True))  # noqa: B023
        nbytes = bytes_permute_fwd(T, E, H, K, s)
        read, written = T * H * s, N * H * s
        roof_ms = (read / (copy * 1e9 / 2) + written / (write * 1e9)) * 1e3  # copy GB/s counts read + write
        out = torch.empty((T, K, H), dtype=x.dtype, device="cuda")
        ms_expand = common.do_bench(lambda: out.copy_(x[:, None].expand(T, K, H)))  # noqa: B023
        out = None
        x0 = x[:, :0]
        ms_map = common.do_bench(lambda: moe_raw.permute(x0, rm, probs, num_out_tokens=N, fused=True))  # noqa: B023
        _, _, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)
        ms_rows = common.do_bench(lambda: moe_raw.permute_with_row_map(x, row_map, N))  # noqa: B023
        routed = row_map[:T] >= 0
        first = torch.cumsum(routed.sum(1), 0) - routed.sum(1)  # each token's first row, token-major
        local = torch.cumsum(routed.int(), 1) - 1  # rank of each routed expert within its token
        token_major = row_map.clone()
        token_major[:T] = torch.where(routed, (first[:, None] + local).int(), -1)
        ms_token = common.do_bench(lambda: moe_raw.permute_with_row_map(x, token_major, N))  # noqa: B023
        rows_out = torch.empty((N, H), dtype=x.dtype, device="cuda")
        dest = row_map[:T][routed].view(T, K).contiguous()
        ms_write = common.do_bench(_write_only(rows_out, dest))
        ms_write_mixed = common.do_bench(_write_only(rows_out, dest, interleave=True))
        ms_write_token = common.do_bench(_write_only(rows_out, token_major[:T][routed].view(T, K).contiguous()))
        phased, cells = {}, []
        if args.phased:
            ref = moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)[0]
            for label, divisor, persistent, mode, threads in _PHASED_CONFIGS:
                launch = _phased(x, rows_out, dest, divisor, persistent, mode, threads)
                if launch is None:
                    cells.append("n/a")
                    continue
                rows_out.zero_()
                launch()
                assert torch.equal(rows_out, ref), f"phased_rows {label} moved the wrong rows at {name}"
                ms_phased = common.do_bench(launch)
                phased[f"phased_{label}_ms"] = ms_phased
                cells.append(f"{ms_phased:.3f} ({100 * (read + written) / (ms_phased * 1e-3) / 1e9 / copy:.1f}%)")
            ref = None
        rows_out = dest = None
        gbs = nbytes / (ms * 1e-3) / 1e9
        gbs_expand = (read + written) / (ms_expand * 1e-3) / 1e9
        gbs_rows = (read + written) / (ms_rows * 1e-3) / 1e9
        gbs_token = (read + written) / (ms_token * 1e-3) / 1e9
        row = {"shape": name, "ms": ms, "pct_copy": 100 * gbs / copy, "pct_mix_roofline": 100 * roof_ms / ms,
               "expand_ms": ms_expand, "expand_pct_copy": 100 * gbs_expand / copy, "map_only_ms": ms_map,
               "copy_only_ms": ms_rows, "copy_only_pct_copy": 100 * gbs_rows / copy,
               "token_major_ms": ms_token, "token_major_pct_copy": 100 * gbs_token / copy,
               "write_only_ms": ms_write, "write_only_pct_write": 100 * written / (ms_write * 1e-3) / 1e9 / write,
               "write_only_interleaved_ms": ms_write_mixed,
               "write_only_interleaved_pct_write": 100 * written / (ms_write_mixed * 1e-3) / 1e9 / write,
               "write_only_token_major_ms": ms_write_token,
               "write_only_token_major_pct_write": 100 * written / (ms_write_token * 1e-3) / 1e9 / write,
               **phased}  # fmt: skip
        rows.append(row)
        if cells:
            phased_lines.append(f"| {name} | {ms_rows:.3f} ({row['copy_only_pct_copy']:.1f}%) | {' | '.join(cells)} |")
        print(
            f"| {name} | {ms:.3f} | {row['pct_copy']:.1f}% | {row['pct_mix_roofline']:.1f}% | {ms_expand:.3f} | "
            f"{row['expand_pct_copy']:.1f}% | {ms / ms_expand:.3f} | {ms_map:.3f} | {ms_rows:.3f} "
            f"({row['copy_only_pct_copy']:.1f}%) | {ms_token:.3f} ({row['token_major_pct_copy']:.1f}%) | "
            f"{ms_write:.3f} ({row['write_only_pct_write']:.1f}%) | {ms_write_mixed:.3f} "
            f"({row['write_only_interleaved_pct_write']:.1f}%) | {ms_write_token:.3f} "
            f"({row['write_only_token_major_pct_write']:.1f}%) |"
        )
        x = x0 = rm = probs = row_map = token_major = None  # free this shape's tensors before the next one
        torch.cuda.empty_cache()
    if phased_lines:
        print("\nphased row movers (ms, % copy): copy only = scatter_rows")
        print("| shape | copy only | " + " | ".join(c[0] for c in _PHASED_CONFIGS) + " |")
        print("|---|---|" + "---|" * len(_PHASED_CONFIGS))
        print("\n".join(phased_lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbs": copy, "fill_gbs": fill, "memset_gbs": memset, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
