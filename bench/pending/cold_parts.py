"""Where permute's cold-call extra goes (an experiment): PYTHONPATH=. python3 bench/pending/cold_parts.py

At DeepSeek-V3 and Qwen3-30B-A3B (bf16): cold and back-to-back wall time (bench.cold_call's method), and the host
time of one call (returned, not synced, after an idle GPU), for: torch's x.clone() (the floor); the two routing-table
launches alone; permute's CUDA path without validation or autograd (dispatch._permute_cuda); the same with the
overlapped launch off; the public permute.
"""

from __future__ import annotations

import statistics
import time

import torch

import moe_raw
from bench.bench_permute import SHAPES, make_inputs
from bench.cold_call import back_to_back_us, cold_us
from moe_raw._kernels import dispatch as D


def host_us(fn, samples=25):
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def shape_cases(T, E, H, K) -> dict:
    x, rm, probs = make_inputs(T, E, H, K)
    n = T * K
    _, ws, buf = D._map_and_workspace(rm)
    saved = D._OVERLAP_MIN_BYTES

    def no_overlap():
        D._OVERLAP_MIN_BYTES = 1 << 62
        try:
            return D._permute_cuda(x, rm, probs, n, False, want_indices=False)
        finally:
            D._OVERLAP_MIN_BYTES = saved

    return {
        "x.clone() (floor)": lambda: x.clone(),
        # ws is buf's address: the lambda holds buf so the workspace outlives this function
        "tables only (routing_pack + routing_scan)": lambda: (buf, D._tables(rm, ws)),
        "_permute_cuda (no validation)": lambda: D._permute_cuda(x, rm, probs, n, False, want_indices=False),
        "_permute_cuda, overlap off": no_overlap,
        "moe_raw.permute(fused, N)": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True),
    }


def main():
    for name in ("DeepSeek-V3", "Qwen3-30B-A3B"):
        cases = shape_cases(*SHAPES[name])
        print(f"\n{name}\n| case | back to back us | cold us | extra us | host us (one call) |\n|---|---|---|---|---|")
        for label, fn in cases.items():
            fn()
            b2b, cold, host = back_to_back_us(fn), cold_us(fn, 0), host_us(fn)
            print(f"| {label} | {b2b:.1f} | {cold:.1f} | {cold - b2b:.1f} | {host:.1f} |", flush=True)
        cases = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
