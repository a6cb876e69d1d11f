"""SwiGLU family benchmark: moe_raw (Numba CUDA kernels, fast launch) vs the seed's torch functions (eager) and
torch.compile of them, same run, same card.

python -m bench.bench_swiglu [--quick] [--out bench/results/swiglu.json]

Byte models (minimum traffic; s = bytes per element of y, w = bytes of one weight; per row of N):
  swiglu fwd             read y 2F*s, write out F*s
  weighted_swiglu fwd    read y 2F*s + w, write out F*s
  weighted_swiglu bwd    read g F*s + y 2F*s + w, write dy 2F*s + dweight w
Percentages are of the device copy bandwidth measured in the same run (bytes read + written by dst.copy_(src)).
Targets (design.md, H100 bf16): forward >= 90% of copy, weighted backward >= 85%, at N=32768 F=2048 and
N=98304 F=768; host time of one op at N=16 <= 25 us.
"""

from __future__ import annotations

import argparse
import sys

import torch

import moe_raw
from bench import common
from moe_raw import reference

SHAPES = {  # name: (N, F); bf16 y [N, 2F], fp32 router weights [N, 1]
    "N32768-F2048 (DeepSeek-V3 experts)": (32768, 2048),
    "N98304-F768 (Qwen3-30B-A3B experts)": (98304, 768),
}
HOST_SHAPE = (16, 2048)


def _providers():
    compiled = {
        "swiglu": torch.compile(reference.swiglu),
        "weighted_swiglu": torch.compile(reference.weighted_swiglu),
        "weighted_swiglu_back": torch.compile(reference.weighted_swiglu_back),
    }
    return {
        "moe_raw": {
            "swiglu": moe_raw.swiglu,
            "weighted_swiglu": moe_raw.weighted_swiglu,
            "weighted_swiglu_back": moe_raw.weighted_swiglu_back,
        },
        "seed eager": {
            "swiglu": reference.swiglu,
            "weighted_swiglu": reference.weighted_swiglu,
            "weighted_swiglu_back": reference.weighted_swiglu_back,
        },
        "torch.compile(seed)": compiled,
    }


def _inputs(n, f, dtype=torch.bfloat16, wdtype=torch.float32):
    y = torch.randn(n, 2 * f, device="cuda").to(dtype)
    g = torch.randn(n, f, device="cuda").to(dtype)
    w = torch.rand(n, 1, device="cuda").to(wdtype)
    return y, g, w


def _calls(fns, y, g, w):
    return {
        "swiglu fwd": lambda: fns["swiglu"](y),
        "weighted_swiglu fwd": lambda: fns["weighted_swiglu"](y, w),
        "weighted_swiglu bwd": lambda: fns["weighted_swiglu_back"](g, y, w),
    }


def bytes_swiglu_fwd(n, f, s):
    """swiglu fwd: read y 2F*s, write out F*s per row."""
    return n * 3 * f * s


def bytes_weighted_swiglu_fwd(n, f, s, ws=4):
    """weighted_swiglu fwd: read y 2F*s + the weight ws, write out F*s per row."""
    return n * (3 * f * s + ws)


def bytes_weighted_swiglu_bwd(n, f, s, ws=4):
    """weighted_swiglu bwd: read g F*s + y 2F*s + w, write dy 2F*s + dw, per row."""
    return n * (5 * f * s + 2 * ws)


def _bytes(op, n, f, s, ws):
    if op == "swiglu fwd":
        return bytes_swiglu_fwd(n, f, s)
    if op == "weighted_swiglu fwd":
        return bytes_weighted_swiglu_fwd(n, f, s, ws)
    return bytes_weighted_swiglu_bwd(n, f, s, ws)


def bench_shape(name, n, f, copy_gbs, providers, dtype=torch.bfloat16, ops=None):
    """Rows of one shape; ops: a subset of the _calls keys ("swiglu fwd", ...), default all."""
    y, g, w = _inputs(n, f, dtype)
    s, ws = y.element_size(), w.element_size()
    rows = []
    ms_by = {}
    for provider, fns in providers.items():
        for op, fn in _calls(fns, y, g, w).items():
            if ops is not None and op not in ops:
                continue
            fn()  # compile / warm up
            ms = common.do_bench(fn)
            gbs = _bytes(op, n, f, s, ws) / (ms * 1e-3) / 1e9
            ms_by[(op, provider)] = ms
            rows.append({"shape": name, "op": op, "provider": provider, "ms": ms, "GB/s": gbs,
                         "pct_copy": 100 * gbs / copy_gbs, "note": ""})  # fmt: skip
    for r in rows:
        if r["provider"] == "moe_raw":
            eager = ms_by[(r["op"], "seed eager")] / r["ms"]
            comp = ms_by[(r["op"], "torch.compile(seed)")] / r["ms"]
            r["note"] = f"{eager:.1f}x vs eager, {comp:.2f}x vs torch.compile"
    return rows


def host_time_rows(providers):
    """Host microseconds per call at N=16 (launch-bound; common.host_us: median of 7 loops)."""
    n, f = HOST_SHAPE
    y, g, w = _inputs(n, f)
    rows = []
    for provider in ("moe_raw", "torch.compile(seed)", "seed eager"):
        for op, fn in _calls(providers[provider], y, g, w).items():
            rows.append({"shape": f"N={n} F={f}", "op": op, "provider": provider, "us": common.host_us(fn)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--out", default=None, help="write a JSON record here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"# {env['gpu']}  torch {env['torch']}  numba_cuda {env['numba_cuda']}  numpy {env['numpy']}  "
          f"sha {env['git_sha']}")  # fmt: skip
    print(f"# measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    providers = _providers()
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    rows = []
    print("\n| shape | op | provider | ms | GB/s | % of copy | note |\n|---|---|---|---|---|---|---|")
    for name, (n, f) in shapes.items():
        print(f"... {name}", file=sys.stderr, flush=True)
        shape_rows = bench_shape(name, n, f, copy_gbs, providers)
        for r in shape_rows:
            print(
                f"| {r['shape']} | {r['op']} | {r['provider']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
                f"{r['pct_copy']:.0f}% | {r['note']} |",
                flush=True,
            )
        rows += shape_rows
        torch.cuda.empty_cache()
    hrows = host_time_rows(providers)
    print("\n| shape | op | provider | host us / call |\n|---|---|---|---|")
    for r in hrows:
        print(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['us']:.1f} |")
    print("\nTargets: fwd >= 90% of copy, weighted bwd >= 85%; host time per op at N=16 <= 25 us.")
    if args.out:
        common.write_json(args.out, {"env": env, "copy_GBps": copy_gbs, "rows": rows, "host_rows": hrows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
