"""Benchmark of the router (issue 18): ``moe_raw.topk_routing_with_score_function`` beside Megatron's torch router
(``moe_raw.reference``'s transcription of Megatron main: "seed") and ``torch.compile`` of it, same run, same card.

python -m bench.bench_router      (also run by ``python -m bench``, ``--ops router``)

Byte model (T tokens, E experts, K picks, s = bytes per logit): forward reads the logits once and writes the dense
probs and the bool map once, plus the [T, K] int64 indices the backward keeps: T * E * (2s + 1) + 8 T K. Forward +
backward adds one read of d probs and one write of d logits: + 2 T * E * s. (moe_raw's backward reads only the K picks'
gradients and, after top-k softmax, no logits row; the model counts what the op must move at least, so the same bytes
are charged to every provider.)
"""

from __future__ import annotations

import sys

import torch

import moe_raw
from moe_raw import reference as R

from . import common

# name: (E, K, kwargs) at Megatron's settings for the model
ROUTERS = {
    "DeepSeek-V3": (
        256,
        8,
        {"score_function": "sigmoid", "num_groups": 8, "group_topk": 4, "scaling_factor": 2.5, "bias": True},
    ),  # fmt: skip
    "Qwen3-30B-A3B": (128, 8, {}),
    "Mixtral": (8, 2, {}),
}
TOKENS = (4096, 65536)


def _args(name, T, dtype):
    E, K, cfg = ROUTERS[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(T, E, device="cuda", generator=gen).to(dtype)
    kw = {k: v for k, v in cfg.items() if k != "bias"}
    if cfg.get("bias"):
        kw["expert_bias"] = torch.randn(E, device="cuda", generator=gen) * 0.01
    return logits, K, kw


def _fwd(fn, logits, K, kw):
    return fn(logits, K, **kw)


def _fwd_bwd(fn, logits, K, kw):
    x = logits.detach().requires_grad_(True)
    probs, _ = fn(x, K, **kw)
    probs.backward(torch.ones_like(probs))
    return x.grad


def providers():
    seed = R.topk_routing_with_score_function
    return {"moe_raw": moe_raw.topk_routing_with_score_function, "seed": seed,
            "seed torch.compile": torch.compile(seed, dynamic=False)}  # fmt: skip


def bench_rows(copy_gbs, dtype=torch.float32, names=None, tokens=TOKENS):
    rows = []
    fns = providers()
    for name in names or ROUTERS:
        for T in tokens:
            logits, K, kw = _args(name, T, dtype)
            E, s = logits.shape[1], logits.element_size()
            fwd_bytes = T * E * (2 * s + 1) + 8 * T * K
            for op, nbytes in (("router fwd", fwd_bytes), ("router fwd+bwd", fwd_bytes + 2 * T * E * s)):
                for provider, fn in fns.items():
                    args = (fn, logits, K, kw)
                    step = _fwd if op == "router fwd" else _fwd_bwd
                    ms = common.do_bench(lambda a=args, step=step: step(*a))
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    rows.append({"shape": f"{name} T={T} E={E} K={K}", "op": op, "provider": provider, "ms": ms,
                                 "GB/s": gbs, "pct_copy": 100 * gbs / copy_gbs, "note": ""})  # fmt: skip
            torch.cuda.empty_cache()
    return rows


def host_time_rows(dtype=torch.float32):
    """Host microseconds per router call at T = 16 (launch-bound): moe_raw, the seed, and two plain torch ops, their
    loops interleaved (common.host_us_many)."""
    fns = {}
    for name in ROUTERS:
        logits, K, kw = _args(name, 16, dtype)
        for provider, fn in (("moe_raw", moe_raw.topk_routing_with_score_function),
                             ("seed", R.topk_routing_with_score_function)):  # fmt: skip
            fns[f"{name} T=16", "router fwd", provider] = lambda a=(fn, logits, K, kw): _fwd(*a)
    x = torch.randn(16, 256, device="cuda")
    fns["T=16", "two torch ops (softmax, topk)", "torch"] = lambda: torch.softmax(x, -1).topk(8, -1)
    us = common.host_us_many(fns)
    return [{"shape": s, "op": op, "provider": provider, "us": us[s, op, provider]} for s, op, provider in fns]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    copy_gbs = common.copy_bandwidth_gbs()
    host = host_time_rows()
    print(f"# copy {copy_gbs:.0f} GB/s\n\n| shape | op | provider | ms | GB/s | % of copy | vs seed |")
    print("|---|---|---|---|---|---|---|")
    rows = bench_rows(copy_gbs)
    seed_ms = {(r["shape"], r["op"]): r["ms"] for r in rows if r["provider"] == "seed"}
    for r in rows:
        print(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['ms']:.4f} | {r['GB/s']:.0f} | "
              f"{r['pct_copy']:.0f}% | {seed_ms[(r['shape'], r['op'])] / r['ms']:.2f}x |")  # fmt: skip
    print("\n| shape | op | provider | host us / call |\n|---|---|---|---|")
    for r in host:
        print(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
