"""sort_chunks_by_idxs alone, for an A/B of kernels/chunks.cu (run from a tree's root: PYTHONPATH=. python3
bench/pending/chunks_ab.py): the regrouping (gather 0, the forward) and its inverse (gather 1, the backward's kernel)
at bench.bench_dispatch's shape (DeepSeek-V3: 32768 rows of 14 KiB, 256 chunks), and at Qwen3-30B-A3B's rows
(4 KiB), beside the copy bandwidth measured in the same process. Bytes as bench.bench_dispatch counts them.
"""

from __future__ import annotations

import functools
import sys

import torch

from bench import bench_dispatch, common
from moe_raw._kernels import dispatch as D

SHAPES = (("DeepSeek-V3", 4096, 256, 7168, 8), ("Qwen3-30B-A3B", 4096, 128, 2048, 8))  # name, T, E, H, K


def main() -> int:
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbs:.0f} GB/s")
    print("| shape | kernel | ms | GB/s | % of copy |\n| --- | --- | --- | --- | --- |")
    for name, T, E, H, K in SHAPES:
        n = T * K
        x, probs, sizes, order = bench_dispatch.chunk_inputs(n, E, H, torch.bfloat16)
        nbytes = 2 * n * H * x.element_size() + 2 * n * 4
        for gather in (False, True):
            ms = common.do_bench(functools.partial(D._chunk_sort_cuda, x, probs, sizes, order, gather))
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"| {name} | chunk_sort gather={int(gather)} | {ms:.4f} | {gbs:.0f} | {100 * gbs / copy_gbs:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
