"""SwiGLU family benchmark: moe_raw (Numba CUDA kernels, fast launch) vs the seed's torch functions (eager) and
torch.compile of them, same run, same card.

python -m bench.bench_swiglu [--quick] [--activations all|swiglu|quick_geglu|clamped_swiglu,...] [--out FILE.json]

Activations (--activations, a comma list of families or "all"; default all): swiglu (swiglu, weighted_swiglu
fwd, weighted_swiglu bwd: the rows python -m bench also runs), Megatron-LM's Quick-GEGLU (quick_geglu,
weighted_quick_geglu and their _back; linear_offset 0) and gpt-oss's clamped SwiGLU (clamped_swiglu,
weighted_clamped_swiglu and their _back; alpha 1.702, limit 7). The ops are the table OPS (row name -> moe_raw
function, seed function in moe_raw.reference, argument builder, byte model); a new activation adds rows there.

Byte models (minimum traffic; s = bytes per element of y, w = bytes of one weight; per row of N):
  swiglu fwd             read y 2F*s, write out F*s
  weighted_swiglu fwd    read y 2F*s + w, write out F*s
  weighted_swiglu bwd    read g F*s + y 2F*s + w, write dy 2F*s + dweight w
  <variant> bwd          read g F*s + y 2F*s, write dy 2F*s (the unweighted backward; SwiGLU's has no row here)
The Quick-GEGLU and clamped SwiGLU rows move the same bytes as their SwiGLU counterparts (the same y [N, 2F], g,
weights and outputs; only the math per element differs, and the clamp constants are compiled in): their fwd rows
use the swiglu fwd model, weighted_* fwd the weighted_swiglu fwd model, weighted_* bwd the weighted_swiglu bwd model.
Percentages are of the device copy bandwidth measured in the same run (bytes read + written by dst.copy_(src)).
Targets (the project's, H100 bf16): forward >= 90% of copy, weighted backward >= 85%, at N=32768 F=2048 and
N=98304 F=768; host time of one op at N=16 <= 25 us.

Check: before timing, each op's moe_raw output at each shape is compared once with the seed's function on the same
inputs, evaluated in fp32 and rounded once to the seed's output dtype (moe_raw's contract: fp32 math, one
rounding; the seed's eager bf16 path rounds its intermediates, e.g. quick_gelu's alpha * gate and 1 - sigmoid, and
strays past bf16 tolerance from that near sigmoid's tails). torch.testing.assert_close's default tolerances of
y's dtype (bf16: rtol 1.6e-2, fp16: 1e-3, fp32: 1.3e-6; atol 1e-5, times sqrt(F) for dweights, a sum over F).
A mismatch starts moe_raw's note with "MISMATCH" and the run exits 1 (after printing every row and writing --out).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

import moe_raw
from moe_raw import reference

from . import common

SHAPES = {  # name: (N, F); bf16 y [N, 2F], fp32 router weights [N, 1]
    "N32768-F2048 (DeepSeek-V3 experts)": (32768, 2048),
    "N98304-F768 (Qwen3-30B-A3B experts)": (98304, 768),
}
HOST_SHAPE = (16, 2048)
ACTIVATIONS = ("swiglu", "geglu", "quick_geglu", "clamped_swiglu")  # the --activations families, in row order
QUICK_GEGLU_OFFSET = 0.0  # linear_offset (Megatron-LM's default)
CLAMPED_ALPHA, CLAMPED_LIMIT = 1.702, 7.0  # gpt-oss
MISMATCH = "MISMATCH"
_TOL = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5), torch.float32: (1.3e-6, 1e-5)}  # assert_close's


class Op(NamedTuple):
    family: str  # an ACTIVATIONS entry
    fn: str  # the function's name in moe_raw and in moe_raw.reference (a provider's key, see _providers)
    moe_raw: Callable
    seed: Callable
    args: Callable  # (y, g, w) -> the positional arguments of both functions
    kind: str  # fwd | weighted fwd | bwd | weighted bwd: the byte model (_bytes)


_TENSORS = {  # kind -> the op's tensor arguments, from _inputs' (y, g, w)
    "fwd": lambda y, g, w: (y,),
    "weighted fwd": lambda y, g, w: (y, w),
    "bwd": lambda y, g, w: (g, y),
    "weighted bwd": lambda y, g, w: (g, y, w),
}


def _op(family, fn, kind, *consts):
    tensors = _TENSORS[kind]
    return Op(family, fn, getattr(moe_raw, fn), getattr(reference, fn), lambda y, g, w: (*tensors(y, g, w), *consts),
              kind)  # fmt: skip


_Q, _C = (QUICK_GEGLU_OFFSET,), (CLAMPED_ALPHA, CLAMPED_LIMIT)
OPS = {  # the row's op name -> Op
    "swiglu fwd": _op("swiglu", "swiglu", "fwd"),
    "weighted_swiglu fwd": _op("swiglu", "weighted_swiglu", "weighted fwd"),
    "weighted_swiglu bwd": _op("swiglu", "weighted_swiglu_back", "weighted bwd"),
    "geglu fwd": _op("geglu", "geglu", "fwd"),
    "weighted_geglu fwd": _op("geglu", "weighted_geglu", "weighted fwd"),
    "geglu bwd": _op("geglu", "geglu_back", "bwd"),
    "weighted_geglu bwd": _op("geglu", "weighted_geglu_back", "weighted bwd"),
    "quick_geglu fwd": _op("quick_geglu", "quick_geglu", "fwd", *_Q),
    "weighted_quick_geglu fwd": _op("quick_geglu", "weighted_quick_geglu", "weighted fwd", *_Q),
    "quick_geglu bwd": _op("quick_geglu", "quick_geglu_back", "bwd", *_Q),
    "weighted_quick_geglu bwd": _op("quick_geglu", "weighted_quick_geglu_back", "weighted bwd", *_Q),
    "clamped_swiglu fwd": _op("clamped_swiglu", "clamped_swiglu", "fwd", *_C),
    "weighted_clamped_swiglu fwd": _op("clamped_swiglu", "weighted_clamped_swiglu", "weighted fwd", *_C),
    "clamped_swiglu bwd": _op("clamped_swiglu", "clamped_swiglu_back", "bwd", *_C),
    "weighted_clamped_swiglu bwd": _op("clamped_swiglu", "weighted_clamped_swiglu_back", "weighted bwd", *_C),
}


def _providers(activations=("swiglu",)):
    """{provider: {function name: callable}} for the ops of `activations` (default: the SwiGLU family only, what
    python -m bench uses). torch.compile compiles on the first call."""
    ops = [op for op in OPS.values() if op.family in activations]
    return {
        "moe_raw": {op.fn: op.moe_raw for op in ops},
        "seed eager": {op.fn: op.seed for op in ops},
        "torch.compile(seed)": {op.fn: torch.compile(op.seed) for op in ops},
    }


def _inputs(n, f, dtype=torch.bfloat16, wdtype=torch.float32, device="cuda"):
    y = torch.randn(n, 2 * f, device=device).to(dtype)
    g = torch.randn(n, f, device=device).to(dtype)
    w = torch.rand(n, 1, device=device).to(wdtype)
    return y, g, w


def _calls(fns, y, g, w):
    """{row op name: a call with no arguments} for every OPS entry whose function is in fns (a _providers value)."""
    return {name: functools.partial(fns[op.fn], *op.args(y, g, w)) for name, op in OPS.items() if op.fn in fns}


def bytes_swiglu_fwd(n, f, s):
    """swiglu fwd: read y 2F*s, write out F*s per row."""
    return n * 3 * f * s


def bytes_weighted_swiglu_fwd(n, f, s, ws=4):
    """weighted_swiglu fwd: read y 2F*s + the weight ws, write out F*s per row."""
    return n * (3 * f * s + ws)


def bytes_weighted_swiglu_bwd(n, f, s, ws=4):
    """weighted_swiglu bwd: read g F*s + y 2F*s + w, write dy 2F*s + dw, per row."""
    return n * (5 * f * s + 2 * ws)


def bytes_glu_bwd(n, f, s):
    """Unweighted backward (quick_geglu_back, clamped_swiglu_back): read g F*s + y 2F*s, write dy 2F*s per row."""
    return n * 5 * f * s


_BYTES = {  # Op.kind -> bytes(n, f, s, ws)
    "fwd": lambda n, f, s, ws: bytes_swiglu_fwd(n, f, s),
    "weighted fwd": bytes_weighted_swiglu_fwd,
    "bwd": lambda n, f, s, ws: bytes_glu_bwd(n, f, s),
    "weighted bwd": bytes_weighted_swiglu_bwd,
}


def _bytes(op, n, f, s, ws):
    return _BYTES[OPS[op].kind](n, f, s, ws)


def _fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check_op(op, y, g, w) -> str:
    """'' when moe_raw's OPS[op] on (y, g, w) matches the seed's function computed in fp32 on the same values and
    rounded once to the seed's output dtypes, else one line saying what differs (see the module docstring)."""
    spec = OPS[op]
    args = spec.args(y, g, w)
    got = spec.moe_raw(*args)
    want = spec.seed(*map(_fp32, args))
    dtypes = spec.seed(*spec.args(y[:1], g[:1], w[:1]))  # the seed's own output dtypes
    got, want, dtypes = (got, want, dtypes) if isinstance(want, tuple) else ((got,), (want,), (dtypes,))
    rtol, atol = _TOL[y.dtype]
    for i, (a, b, d) in enumerate(zip(got, want, dtypes, strict=True)):
        if a.dtype != d.dtype:
            return f"output {i}: dtype {a.dtype}, the seed's {d.dtype}"
        length = y.shape[-1] // 2 if i == 1 else 1  # output 1: dweights, a sum over F
        try:
            torch.testing.assert_close(a.float(), b.to(d.dtype).float(), rtol=rtol, atol=atol * length**0.5)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return f"output {i}: " + "; ".join(lines[1:])  # line 0: "Tensor-likes are not close!"
    return ""


def bench_shape(name, n, f, copy_gbs, providers, dtype=torch.bfloat16, ops=None):
    """Rows of one shape for the ops of `providers` (_providers); ops: a subset of those (OPS keys, "swiglu fwd",
    ...), default all. Each op is checked against the seed's eager function first (check_op): a mismatch starts
    moe_raw's note with MISMATCH."""
    y, g, w = _inputs(n, f, dtype)
    s, ws = y.element_size(), w.element_size()
    bad = {op: check_op(op, y, g, w) for op in _calls(providers["moe_raw"], y, g, w) if ops is None or op in ops}
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
            if bad.get(r["op"]):
                r["note"] = f"{MISMATCH} vs seed eager ({bad[r['op']]}); {r['note']}"
    return rows


def host_time_rows(providers):
    """Host microseconds per call at N=16 (launch-bound; common.host_us_many: median of 7 loops, every call's loops
    interleaved), every op of providers, and torch's eager silu(a) * b."""
    n, f = HOST_SHAPE
    y, g, w = _inputs(n, f)
    fns = {
        (provider, op): fn
        for provider in ("moe_raw", "torch.compile(seed)", "seed eager")
        for op, fn in _calls(providers[provider], y, g, w).items()
    }
    # issue 16's bar for one op's host time: torch's eager silu(a) * b (two launches, no checks)
    a, b = y.chunk(2, -1)
    fns["torch eager silu(a) * b", "swiglu fwd"] = lambda: torch.nn.functional.silu(a) * b
    us = common.host_us_many(fns)
    return [{"shape": f"N={n} F={f}", "op": op, "provider": provider, "us": us[provider, op]} for provider, op in fns]


def parse_activations(text: str) -> tuple:
    """'all' or a comma list of ACTIVATIONS -> those families in ACTIVATIONS order."""
    names = {t.strip() for t in text.split(",") if t.strip()}
    if "all" in names:
        return ACTIVATIONS
    unknown = names - set(ACTIVATIONS)
    if unknown or not names:
        what = ", ".join(sorted(unknown)) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown activation(s) {what}; choose all or from {', '.join(ACTIVATIONS)}")
    return tuple(a for a in ACTIVATIONS if a in names)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_swiglu", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--activations", default=ACTIVATIONS, type=parse_activations, metavar="LIST",
                    help="all (default) or a comma list of: " + ", ".join(ACTIVATIONS))  # fmt: skip
    ap.add_argument("--out", default=None, help="write a JSON record here")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"# {env['gpu']}  torch {env['torch']}  numba_cuda {env['numba_cuda']}  numpy {env['numpy']}  "
          f"sha {env['git_sha']}")  # fmt: skip
    print(f"# measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    print(f"# activations: {', '.join(args.activations)}")
    providers = _providers(args.activations)
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
        common.write_json(args.out, {"env": env, "copy_GBps": copy_gbs, "activations": list(args.activations),
                                     "rows": rows, "host_rows": hrows})  # fmt: skip
    bad = [f"{r['shape']} {r['op']}" for r in rows if r["note"].startswith(MISMATCH)]
    if bad:
        print(f"{MISMATCH}: moe_raw differs from the seed in {len(bad)} row(s): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
