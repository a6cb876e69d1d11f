"""permute's CUDA path step by step, host time of each after an idle GPU (an experiment):
PYTHONPATH=. python3 bench/pending/cold_steps.py

The steps in the order of main before 2992423 (tables, then outputs; the scan always launched): since then
dispatch._permute_cuda allocates the outputs first and may skip the scan (permute_grouped, 2-16 tiles)."""

from __future__ import annotations

import statistics
import time

import torch

from bench.bench_permute import SHAPES, make_inputs
from moe_raw._kernels import dispatch as D


def steps(x, rm, probs, n, overlap_min):
    D._OVERLAP_MIN_BYTES = overlap_min
    torch.cuda.synchronize()
    t = [time.perf_counter()]
    row_map, ws, buf = D._map_and_workspace(rm)
    t.append(time.perf_counter())
    D._tables(rm, ws)
    t.append(time.perf_counter())
    out = x.new_empty((n, x.shape[1]))
    pprobs = probs.new_empty(n)
    t.append(time.perf_counter())
    D._scatter(x, out, rm, ws, row_map, None, probs, pprobs, n, D.cdiv(n, D._TAIL_ROWS), n, None, None, True)
    t.append(time.perf_counter())
    torch.cuda.synchronize()
    t.append(time.perf_counter())
    return [(b - a) * 1e6 for a, b in zip(t, t[1:], strict=False)]


def main():
    saved = D._OVERLAP_MIN_BYTES
    for name in ("DeepSeek-V3", "Qwen3-30B-A3B"):
        T, E, H, K = SHAPES[name]
        x, rm, probs = make_inputs(T, E, H, K)
        for label, om in (("overlap", saved), ("plain", 1 << 62)):
            rows = [steps(x, rm, probs, T * K, om) for _ in range(30)][5:]
            med = [statistics.median(c) for c in zip(*rows, strict=True)]
            print(
                f"{name} {label}: map+ws alloc {med[0]:.1f} | tables {med[1]:.1f} | out+pprobs alloc {med[2]:.1f} | "
                f"row launch {med[3]:.1f} | to sync {med[4]:.1f} us",
                flush=True,
            )
        big = [0.0] * 25
        for i in range(25):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = x.new_empty((T * K, H))
            big[i] = (time.perf_counter() - t0) * 1e6
            del y
        print(f"{name}: new_empty of the rows alone {statistics.median(big):.1f} us", flush=True)
    D._OVERLAP_MIN_BYTES = saved


if __name__ == "__main__":
    main()
