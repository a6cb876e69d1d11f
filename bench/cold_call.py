"""Cold-call latency of the dispatch ops beside their back-to-back time: python -m bench.cold_call [--out FILE.json]

back to back  wall time per call of 20 calls issued in a row and synced once at the end: the host's launch work
              hides behind the GPU's (the figure the GB/s tables are about).
cold          wall time of one call issued to an idle GPU (synced, then --idle-ms of sleep, default 0) up to its
              synchronize: the host work before the first kernel starts, and any gap between the op's kernels, are
              exposed. With an idle gap the host and GPU may also leave their high clocks (measured: 3 ms doubles
              even torch's one-launch floor).
extra         cold - back to back (median of 25 cold calls). The same for torch's ``x.clone()`` of the token tensor
              (one launch) is the floor any op pays: a launch from an idle stream plus one synchronize.
The permute + unpermute pair runs eagerly and as a CUDA-graph replay (captured once): replay pays no Python, no
validation and no per-kernel launch, so its extra is what a latency-bound caller that captures its layer sees.
Shapes: bench.bench_permute's DeepSeek-V3 and Qwen3-30B-A3B, bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import moe_raw

from .bench_permute import SHAPES, make_inputs
from .common import environment

COLD_SHAPES = ("DeepSeek-V3", "Qwen3-30B-A3B")


def back_to_back_us(fn, calls: int = 20, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(per_call)[len(per_call) // 2]


def cold_us(fn, idle_ms: float, samples: int = 25) -> float:
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        if idle_ms:
            time.sleep(idle_ms / 1e3)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def cases(T, E, H, K) -> dict:
    x, rm, probs = make_inputs(T, E, H, K)
    n = T * K
    top = probs.topk(K, dim=1)
    permuted, _, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)
    sizes = rm.sum(0)
    order = torch.arange(E - 1, -1, -1, device="cuda")

    def pair():
        out, _, rows = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)
        return moe_raw.unpermute(out, rows, (T, H), probs, fused=True)

    return {
        "torch x.clone() (one launch: the floor)": lambda: x.clone(),
        "permute(fused, num_out_tokens, probs)": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True),
        "unpermute(fused, probs)": lambda: moe_raw.unpermute(permuted, row_map, (T, H), probs, fused=True),
        "permute_topk(fused)": lambda: moe_raw.permute_topk(x, top.indices, E, top.values, n, fused=True),
        "sort_chunks_by_idxs": lambda: moe_raw.sort_chunks_by_idxs(permuted, sizes, order),
        "permute + unpermute (eager)": pair,
        "permute + unpermute, CUDA-graph replay": captured(pair),
    }


def captured(fn):
    """fn captured once in a CUDA graph, returned as its replay: the path for latency-bound callers (a decode step),
    where the host work of every op is paid once, at capture. Warm-up on a side stream first, as torch.cuda.graph
    asks (the kernels compile there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cold_call", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--idle-ms", type=float, default=0.0, help="sleep between the sync and each cold call")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    rows = []
    print("| shape | op | back to back us | cold us | extra us |")
    print("| --- | --- | --- | --- | --- |")
    for shape in COLD_SHAPES:
        for op, fn in cases(*SHAPES[shape]).items():
            b2b, cold = back_to_back_us(fn), cold_us(fn, args.idle_ms)
            rows.append({"shape": shape, "op": op, "back_to_back_us": b2b, "cold_us": cold, "extra_us": cold - b2b})
            print(f"| {shape} | {op} | {b2b:.1f} | {cold:.1f} | {cold - b2b:.1f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "idle_ms": args.idle_ms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
