"""Host time per call of the public ops at launch-bound sizes, through the public API only, so that two commits
(a refactor's before and after) can be compared with the same script: python -m bench.host_times [--out FILE.json]

Each figure is the median of 7 loops of 200 calls that sync only at their end, every call's loops interleaved
(bench.common.host_us_many); the GPU work is tiny (T = 16 tokens, N = 16 rows), so the loop measures the host.
Absolute times move 10-60% between machines and runs: compare two commits in one process run each, back to back on
one machine, and read ratios.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import moe_raw

from .common import environment, host_us_many


def cases() -> dict:
    dev = "cuda"
    T, E, H, K = 16, 8, 1024, 2
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    scores = torch.randn(T, E, device=dev)
    top = scores.topk(K, 1)
    rm = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, top.indices, True)
    probs = torch.softmax(scores, 1) * rm
    n = T * K
    permuted, _, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)
    _, _, idx = moe_raw.permute(x, rm, probs, num_out_tokens=n)
    xg = x.clone().requires_grad_()
    pg = probs.clone().requires_grad_()
    N, F2 = 16, 2048
    y = torch.randn(N, 2 * F2, device=dev, dtype=torch.bfloat16)
    g = torch.randn(N, F2, device=dev, dtype=torch.bfloat16)
    w = torch.rand(N, 1, device=dev)
    yg, wg = y.clone().requires_grad_(), w.clone().requires_grad_()
    a, b = y[:, :F2], y[:, F2:]
    sizes = torch.full((E,), n // E, device=dev, dtype=torch.int64)
    order = torch.arange(E - 1, -1, -1, device=dev)

    def round_trip():
        o, _, m = moe_raw.permute(xg, rm, pg, num_out_tokens=n, fused=True)
        out = moe_raw.unpermute(o, m, (T, H), pg, fused=True)
        torch.autograd.grad(out, (xg, pg), x)

    def glu_train():
        out = moe_raw.weighted_bias_swiglu_impl(yg, wg)
        torch.autograd.grad(out, (yg, wg), g)

    return {
        "permute(fused, num_out_tokens)": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True),
        "unpermute(fused, probs)": lambda: moe_raw.unpermute(permuted, row_map, (T, H), probs, fused=True),
        "permute + unpermute (fused)": lambda: moe_raw.unpermute(
            moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)[0], row_map, (T, H), probs, fused=True
        ),
        "permute(unfused, num_out_tokens)": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=n),
        "unpermute(unfused, routing_map)": lambda: moe_raw.unpermute(permuted, idx, (T, H), probs, rm),
        "permute + unpermute fwd+bwd (autograd)": round_trip,
        "permute_topk(fused)": lambda: moe_raw.permute_topk(x, top.indices, E, top.values, n, fused=True),
        "sort_chunks_by_idxs": lambda: moe_raw.sort_chunks_by_idxs(permuted, sizes, order),
        "swiglu": lambda: moe_raw.swiglu(y),
        "weighted_swiglu": lambda: moe_raw.weighted_swiglu(y, w),
        "weighted_swiglu_back": lambda: moe_raw.weighted_swiglu_back(g, y, w),
        "weighted_bias_swiglu_impl fwd+bwd (autograd)": glu_train,
        "torch eager silu(a) * b": lambda: F.silu(a) * b,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_times", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    rows = host_us_many(cases())
    env = environment()
    print(f"host us per call, {env.get('gpu')}, git {env.get('git_sha')}")
    print("| call | host us |\n| --- | --- |")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "host_us": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
