"""python -m bench: self-check every moe_raw op against the fp64 reference, then benchmark it side by side with the
functions it replaces (the torch code of Megatron / NeMo Automodel's moe_utils, eager and under torch.compile) and
the measured copy bandwidth, and record the run.

Usage:
  python -m bench                         self-check + every op at every shape + the MoE layer case (CUDA)
  python -m bench --quick                 one shape per op (51 s on an H100, self-check included)
  python -m bench --ops swiglu --dtype fp16 --shapes N98304-F768
  python -m bench --no-bench              self-check only
Installed (pip install moe_raw, editable or not), the same command is ``moe-raw-bench`` from any directory.
Without a CUDA device it runs the self-check on the CPU path, prints "no CUDA device found" and exits 0 when every
check passes.

Options:
  --ops     comma list of: permute, unpermute, sort_chunks, topk, pad, swiglu, weighted_swiglu,
            weighted_swiglu_back, layer; or "all". "permute" and "swiglu" name their groups: permute = permute +
            unpermute (measured together: one shape gives both, fwd, bwd and the autograd round trip) + sort_chunks
            (sort_chunks_by_idxs) + topk (permute_topk / unpermute_topk) + pad (permute_and_pad,
            permute_with_row_map); swiglu = swiglu + weighted_swiglu + weighted_swiglu_back. layer = the
            end-to-end MoE layer (bench/bench_layer.py). Default: all.
  --dtype   bf16 (default) | fp16 | fp32: the benchmark's token/activation dtype (the self-check runs all three).
  --shapes  comma list of shape names from bench_permute.SHAPES, bench_swiglu.SHAPES (the name up to the first
            space, e.g. N32768-F2048, is enough) and bench_layer.LAYER_SHAPES; an op runs the listed shapes of its
            own table (or, if none of them is in its table, its default). Default: every shape (--quick: the first).
  --out DIR where the record goes (default bench/results/latest on CUDA; on CPU nothing is written unless given).

Output: PASS/FAIL lines of the self-check and the benchmark's progress go to stdout/stderr as they happen; the
markdown tables come at the end on stdout. Exit status: 0 when every check passed (and, with the layer case, both
providers agreed), 1 otherwise, 2 for bad arguments.

Record (under --out):
  bench.json  {"format": "moe_raw-bench/1",
               "env": {"gpu", "torch", "numpy", "cupy", "numba", "numba_cuda", "triton", "git_sha", "timestamp"},
               "args": {"quick", "ops", "dtype", "shapes"},
               "copy_GBps": measured dst.copy_(src) bandwidth, bytes read + written (null on CPU),
               "write_GBps": measured fill_ bandwidth (null on CPU),
               "selfcheck": [{"op", "dtype", "status": "PASS"|"FAIL", "detail", "device", "seconds"}],
               "rows": [row, ...]}
    row: {"kind": "kernel" | "host" | "memory" | "layer", "shape", "op", "provider", "dtype",
          "ms" (kernel/layer: median GPU ms), "us" (host: host microseconds per call), "GB/s" and "pct_copy"
          (kernel rows with a byte model, see bench_permute / bench_swiglu docstrings), "speedup_vs_seed"
          (seed ms / this ms, where a seed row of the same shape and op exists), "tokens_per_s", "peak_mem_GB"
          (layer rows; memory rows: peak of permute -> unpermute fwd+bwd above the inputs), "max_rel_err" (layer
          rows), "note"}
  bench.csv   the rows, one per line, columns CSV_FIELDS (empty where a field does not apply)
  bench.png   (when matplotlib is importable) GB/s per op and provider, one panel per shape, with a line at the
              measured copy bandwidth
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import sys
import textwrap
import time

import torch

from . import common

RECORD_FORMAT = "moe_raw-bench/1"
CSV_FIELDS = ["kind", "shape", "op", "provider", "dtype", "ms", "us", "GB/s", "pct_copy", "speedup_vs_seed",
              "tokens_per_s", "peak_mem_GB", "max_rel_err", "note"]  # fmt: skip
OPS = ("permute", "unpermute", "sort_chunks", "topk", "pad", "swiglu", "weighted_swiglu", "weighted_swiglu_back",
       "layer")  # fmt: skip
GROUPS = {
    "all": OPS,
    "permute": ("permute", "unpermute", "sort_chunks", "topk", "pad"),
    "swiglu": ("swiglu", "weighted_swiglu", "weighted_swiglu_back"),
}
SWIGLU_CALLS = {"swiglu": "swiglu fwd", "weighted_swiglu": "weighted_swiglu fwd",
                "weighted_swiglu_back": "weighted_swiglu bwd"}  # fmt: skip
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- arguments


def shape_tables() -> dict:
    """{"permute": {name: shape}, "swiglu": {...}, "layer": {...}} (names as in the modules' tables)."""
    from . import bench_layer, bench_permute, bench_swiglu

    return {"permute": bench_permute.SHAPES, "swiglu": bench_swiglu.SHAPES, "layer": bench_layer.LAYER_SHAPES}


def _short(name: str) -> str:
    return name.split(" ")[0]


def parse_ops(text: str) -> tuple:
    """'permute,weighted_swiglu' -> ('permute', 'unpermute', 'weighted_swiglu') in OPS order; ValueError if unknown."""
    chosen = set()
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if tok in GROUPS:
            chosen.update(GROUPS[tok])
        elif tok in OPS:
            chosen.add(tok)
        else:
            raise ValueError(f"unknown op {tok!r}; choose from {', '.join(OPS)} or the groups {', '.join(GROUPS)}")
    if not chosen:
        raise ValueError("--ops names no op")
    return tuple(op for op in OPS if op in chosen)


def parse_shapes(text: str | None) -> list | None:
    """Comma list of shape names -> full table names; ValueError naming the valid ones if one is unknown."""
    if text is None:
        return None
    known = {}
    for table in shape_tables().values():
        for name in table:
            known[name] = name
            known.setdefault(_short(name), name)
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if tok not in known:
            valid = sorted({_short(n) for t in shape_tables().values() for n in t})
            raise ValueError(f"unknown shape {tok!r}; choose from {', '.join(valid)}")
        out.append(known[tok])
    if not out:
        raise ValueError("--shapes names no shape")
    return out


def parse_args(argv=None, prog: str = "python -m bench") -> argparse.Namespace:
    # The description is the docstring's whole first paragraph (its first line alone stops mid-sentence).
    description = " ".join(__doc__.split("\n\n")[0].split()).removeprefix("python -m bench: ")
    description = textwrap.fill(description[:1].upper() + description[1:], 79)
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 epilog="Examples, the record's format and exit codes: the module docstring of "
                                        "moe_raw.bench (python -m pydoc moe_raw.bench.__main__).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="one shape per op (about a minute)")
    ap.add_argument("--ops", default="all", help="comma list among " + ", ".join(OPS) + " or groups permute/swiglu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES), help="benchmark dtype (default bf16)")
    ap.add_argument("--shapes", default=None, help="comma list of shape names (default: all; --quick: the first)")
    ap.add_argument("--out", default=None, help="record directory (default bench/results/latest on CUDA)")
    ap.add_argument("--no-bench", action="store_true", help="self-check only")
    args = ap.parse_args(argv)
    try:
        args.ops = parse_ops(args.ops)
        args.shapes = parse_shapes(args.shapes)
    except ValueError as e:
        ap.error(str(e))  # exit 2 with the message on stderr
    return args


def select_shapes(table: dict, shapes: list | None, quick: bool) -> list:
    """Names of `table` to run: the listed ones that are in it, else (none listed / none of its) the default."""
    if shapes:
        mine = [s for s in shapes if s in table]
        if mine:
            return mine
    names = list(table)
    return names[:1] if quick else names


# ------------------------------------------------------------------------------------------------ self-check


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().cpu().double() - ref.detach().cpu().double()).abs().max())


def _swiglu_outputs(ns, check: str, y, g, w):
    """The outputs of one SwiGLU check, computed with namespace ns (moe_raw or moe_raw.reference)."""
    if check == "swiglu":
        return (ns.swiglu(y),)
    if check == "swiglu_back":
        return (ns.swiglu_back(g, y),)
    if check == "weighted_swiglu":
        return (ns.weighted_swiglu(y, w),)
    if check == "weighted_swiglu_back":
        return tuple(ns.weighted_swiglu_back(g, y, w))
    # autograd: weighted_bias_swiglu_impl (WeightedSwiGLUFunction) on a 3-D input, forward + backward
    yi = y.detach().clone().requires_grad_(True)
    wi = w.detach().clone().requires_grad_(True)
    n, f2 = y.shape
    out = ns.weighted_bias_swiglu_impl(yi.view(1, n, f2), wi)
    out.backward(g.view(1, n, f2 // 2))
    return out.detach(), yi.grad, wi.grad


SWIGLU_CHECKS = {  # check name: (op it belongs to for --ops, what it covers)
    "swiglu": ("swiglu", "swiglu fwd"),
    "swiglu_back": ("swiglu", "swiglu_back (swiglu bwd)"),
    "weighted_swiglu": ("weighted_swiglu", "weighted_swiglu fwd"),
    "weighted_swiglu_back": ("weighted_swiglu_back", "weighted_swiglu_back (bwd: dy, dweights)"),
    "autograd": ("weighted_swiglu_back", "WeightedSwiGLUFunction / weighted_bias_swiglu_impl fwd+bwd (autograd)"),
}


def check_swiglu(check: str, dtype, device) -> tuple[bool, str]:
    """Every output within 2x the error of the reference run in the same dtype (both vs fp64), plus a tiny floor."""
    import moe_raw
    from moe_raw import reference

    ours_err = ref_err_max = 0.0
    ok = True
    for n, f in ((67, 96), (5, 7)):  # a vector-friendly width and an odd tail
        y = (torch.randn(n, 2 * f) * 2).to(device=device, dtype=dtype)
        g = torch.randn(n, f).to(device=device, dtype=dtype)
        w = torch.rand(n, 1).to(device=device, dtype=torch.float32)
        ours = _swiglu_outputs(moe_raw, check, y, g, w)
        same = _swiglu_outputs(reference, check, y, g, w)
        exact = _swiglu_outputs(reference, check, *(t.detach().cpu().double() for t in (y, g, w)))
        for o, s, e in zip(ours, same, exact, strict=True):
            if o.shape != e.shape or o.dtype != s.dtype:
                return False, f"got {tuple(o.shape)} {o.dtype}, expected {tuple(e.shape)} {s.dtype}"
            err, ref_err = _max_err(o, e), _max_err(s, e)
            floor = 1e-6 * max(1.0, float(e.abs().max()) if e.numel() else 1.0)
            ok &= bool(math.isfinite(err)) and err <= 2 * ref_err + floor
            ours_err, ref_err_max = max(ours_err, err), max(ref_err_max, ref_err)
    return ok, f"max |err| vs fp64 {ours_err:.1e} (torch in the same dtype: {ref_err_max:.1e}; limit 2x per output)"


SMALL_PERMUTE_CASES = [(16, 8, 2, 64), (7, 4, 2, 13), (257, 64, 8, 136)]  # (T, E, K, H): vector rows, odd tail
# Full runs add larger cases (H = 7168 dprobs dots, one expert); the GPU test suite covers far more.
LARGE_PERMUTE_CASES = [(1027, 64, 8, 1000), (300, 256, 8, 7168), (1027, 1, 1, 2048)]


def check_permute(dtype, device, quick: bool = False) -> tuple[bool, str]:
    """bench.smoke.check over its routing variants (permute exact, unpermute and both grads vs fp64)."""
    from . import smoke

    cases = SMALL_PERMUTE_CASES if device == "cpu" or quick else SMALL_PERMUTE_CASES + LARGE_PERMUTE_CASES
    buf = io.StringIO()
    ok, n = True, 0
    with contextlib.redirect_stdout(buf):
        for T, E, K, H in cases:
            for kw in smoke.routing_variants(T * K):
                ok &= smoke.check(T, E, K, H, dtype, device=device, **kw)
                n += 1
    fails = [ln for ln in buf.getvalue().splitlines() if ln.startswith("FAIL")]
    return ok, f"{n} cases (routing variants, fused / unfused, dropped / padded)" + (
        "; " + " | ".join(fails[:3]) if fails else ""
    )


def _dispatch_checks():
    from . import smoke

    return (
        ("sort_chunks", "sort_chunks_by_idxs fwd+bwd", smoke.check_sort_chunks),
        ("topk", "permute_topk + unpermute_topk fwd+bwd", smoke.check_topk),
        ("pad", "permute_and_pad + permute_with_row_map + unpermute fwd+bwd", smoke.check_permute_and_pad),
    )


DISPATCH_CHECKS = _dispatch_checks()


def selfcheck(ops, device, quick: bool = False) -> list:
    """Run the checks of `ops` in every dtype on `device`; print one PASS/FAIL line each; return the records.
    quick: the small permute cases only (the slow part of a full self-check is the fp64 CPU reference of the large
    ones)."""
    results = []
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dname, dtype in names.items():
        todo = []
        if "permute" in ops or "unpermute" in ops:
            todo.append(("permute+unpermute fwd+bwd", lambda dt=dtype: check_permute(dt, device, quick)))
        for op, label, fn in DISPATCH_CHECKS:
            if op in ops:
                todo.append((label, lambda f=fn, dt=dtype: f(dt, device)))
        for check, (op, label) in SWIGLU_CHECKS.items():
            if op in ops or (check == "autograd" and "weighted_swiglu" in ops):
                todo.append((label, lambda c=check, dt=dtype: check_swiglu(c, dt, device)))
        if "layer" in ops:
            todo.append(("MoE layer fwd+bwd, moe_raw vs seed", lambda dt=dtype: check_layer(dt, device)))
        for label, fn in todo:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                ok, detail = fn()
            except Exception as e:  # noqa: BLE001 - a crash is a FAIL line, not a traceback halfway through
                ok, detail = False, f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            status = "PASS" if ok else "FAIL"
            print(f"{status}  {dname:4}  {label}  [{device}, {seconds:.1f}s]  {detail}", flush=True)
            results.append({"op": label, "dtype": dname, "status": status, "detail": detail, "device": device,
                            "seconds": round(seconds, 3)})  # fmt: skip
    return results


def check_layer(dtype, device) -> tuple[bool, str]:
    from . import bench_layer

    inputs = bench_layer.make_layer(37, 6, 32, 2, 24, dtype=dtype, device=device)
    err = bench_layer.compare(inputs)
    tol = bench_layer.LAYER_RTOL[dtype]
    return err <= tol, f"T=37 E=6 H=32 K=2 F=24: max rel err of y, dx, dlogits {err:.1e} (tol {tol:.0e})"


# ------------------------------------------------------------------------------------------------ benchmark


def _speedups(rows: list) -> None:
    seed_ms = {}
    for r in rows:
        if str(r.get("provider", "")).startswith("seed") and r.get("ms"):
            seed_ms.setdefault((r["shape"], r["op"]), r["ms"])
    for r in rows:
        base = seed_ms.get((r["shape"], r["op"]))
        if base and r.get("ms") and not str(r.get("provider")).startswith("seed") and "speedup_vs_seed" not in r:
            r["speedup_vs_seed"] = base / r["ms"]


def _keep_permute_row(op: str, ops) -> bool:
    if op.startswith("round trip"):
        return True
    if op.startswith("unpermute"):
        return "unpermute" in ops
    return "permute" in ops  # permute fwd / bwd, map build


def run_benchmarks(args) -> tuple[list, dict, bool]:
    from . import bench_layer, bench_permute, bench_swiglu

    dtype = common.DTYPES[args.dtype]
    progress("measuring the device copy bandwidth")
    copy_gbs, write_gbs = common.copy_bandwidth_gbs(), common.write_bandwidth_gbs()
    progress(f"copy {copy_gbs:.0f} GB/s (read + write), write-only {write_gbs:.0f} GB/s")
    rows, ok = [], True
    if "permute" in args.ops or "unpermute" in args.ops:
        # Host time first, before torch.compile runs anywhere in this process, as a user's fresh process would see.
        progress("permute+unpermute host time at T=16, 128")
        rows += [{"kind": "host", "dtype": "bf16", **r} for r in bench_permute.host_time_rows()]
        for name in select_shapes(bench_permute.SHAPES, args.shapes, args.quick):
            progress(f"permute/unpermute {name} (the first call compiles torch.compile(seed))")
            for r in bench_permute.bench_shape(name, *bench_permute.SHAPES[name], copy_gbs, dtype=dtype):
                if _keep_permute_row(r["op"], args.ops):
                    rows.append({"kind": "kernel", "dtype": args.dtype, **r})
            torch.cuda.empty_cache()
            if "permute" in args.ops and "unpermute" in args.ops:
                progress(f"permute -> unpermute peak memory {name}")
                rows += [{"dtype": args.dtype, **r} for r in
                         bench_permute.peak_memory_rows(name, *bench_permute.SHAPES[name], dtype=dtype)]  # fmt: skip
                torch.cuda.empty_cache()
    extras = {"sort_chunks": ("sort_chunks_by_idxs",), "topk": ("permute_topk",),
              "pad": ("permute_and_pad", "permute_with_row_map")}  # op -> the row names it owns  # fmt: skip
    wanted = tuple(prefix for op, prefixes in extras.items() if op in args.ops for prefix in prefixes)
    if wanted:
        from . import bench_dispatch

        progress(f"dispatch extras ({', '.join(o for o in extras if o in args.ops)}) at {bench_dispatch.SHAPE[0]}")
        rows += [{"kind": "kernel", "dtype": args.dtype, **r} for r in bench_dispatch.bench_rows(copy_gbs, dtype=dtype)
                 if r["op"].startswith(wanted)]  # fmt: skip
        torch.cuda.empty_cache()
    sw_ops = [SWIGLU_CALLS[o] for o in OPS if o in SWIGLU_CALLS and o in args.ops]
    if sw_ops:
        providers = bench_swiglu._providers()
        for name in select_shapes(bench_swiglu.SHAPES, args.shapes, args.quick):
            progress(f"swiglu family {name} (the first call compiles torch.compile's kernels)")
            n, f = bench_swiglu.SHAPES[name]
            for r in bench_swiglu.bench_shape(name, n, f, copy_gbs, providers, dtype=dtype, ops=sw_ops):
                rows.append({"kind": "kernel", "dtype": args.dtype, **r})
            torch.cuda.empty_cache()
        progress("swiglu host time at N=16")
        rows += [{"kind": "host", "dtype": "bf16", **r} for r in bench_swiglu.host_time_rows(providers)
                 if r["op"] in sw_ops]  # fmt: skip
    if "layer" in args.ops:
        names = (
            [bench_layer.QUICK_LAYER_SHAPE]
            if args.quick and not args.shapes
            else select_shapes(bench_layer.LAYER_SHAPES, args.shapes, args.quick)
        )
        for name in names:
            progress(f"MoE layer {name} (moe_raw vs seed, fwd+bwd)")
            lrows, lok = bench_layer.bench_layer_shape(name, *bench_layer.LAYER_SHAPES[name], dtype=dtype)
            ok &= lok
            rows += [{"dtype": args.dtype, **r} for r in lrows]
    _speedups(rows)
    return rows, {"copy_GBps": copy_gbs, "write_GBps": write_gbs}, ok


# ------------------------------------------------------------------------------------------------ output


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec)


def markdown(rows: list, copy_gbs: float | None) -> str:
    out = []
    if copy_gbs:
        out.append(f"Measured device copy bandwidth: {copy_gbs:.0f} GB/s (bytes read + written).\n")
    kern = [r for r in rows if r.get("kind") == "kernel"]
    if kern:
        out.append("| shape | op | provider | dtype | ms | GB/s | % of copy | speedup vs seed | note |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in kern:
            sp = _fmt(r.get("speedup_vs_seed"), ".2f")
            out.append(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['dtype']} | {_fmt(r.get('ms'), '.3f')} | "
                       f"{_fmt(r.get('GB/s'), '.0f')} | {_fmt(r.get('pct_copy'), '.0f')}{'%' if _fmt(r.get('pct_copy'), '.0f') else ''} | "  # noqa: E501
                       f"{sp + 'x' if sp else ''} | {r.get('note', '')} |")  # fmt: skip
    host = [r for r in rows if r.get("kind") == "host"]
    if host:
        out.append("\n| shape | op | provider | host us / call |\n|---|---|---|---|")
        out += [f"| {r['shape']} | {r['op']} | {r['provider']} | {r['us']:.1f} |" for r in host]
    mem = [r for r in rows if r.get("kind") == "memory"]
    if mem:
        out.append("\n| shape | op | provider | peak GB | note |\n|---|---|---|---|---|")
        out += [f"| {r['shape']} | {r['op']} | {r['provider']} | {r['peak_mem_GB']:.3f} | {r.get('note', '')} |"
                for r in mem]  # fmt: skip
    lay = [r for r in rows if r.get("kind") == "layer"]
    if lay:
        out.append("\n| MoE layer shape | provider | dtype | ms (fwd+bwd) | tokens/s | peak GB | note |")
        out.append("|---|---|---|---|---|---|---|")
        out += [f"| {r['shape']} | {r['provider']} | {r['dtype']} | {r['ms']:.2f} | {r['tokens_per_s']:.3g} | "
                f"{r['peak_mem_GB']:.2f} | {r.get('note', '')} |" for r in lay]  # fmt: skip
    return "\n".join(out)


def write_record(out_dir: str, env: dict, args: dict, selfcheck_rows: list, rows: list,
                 copy_gbs=None, write_gbs=None) -> dict:  # fmt: skip
    """Write bench.json and bench.csv (and bench.png when matplotlib is importable) under out_dir; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"format": RECORD_FORMAT, "env": env, "args": args, "copy_GBps": copy_gbs, "write_GBps": write_gbs,
              "selfcheck": selfcheck_rows, "rows": rows}  # fmt: skip
    paths = {"json": os.path.join(out_dir, "bench.json"), "csv": os.path.join(out_dir, "bench.csv")}
    common.write_json(paths["json"], record)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                        for k, v in r.items()})  # fmt: skip
    png = write_chart(os.path.join(out_dir, "bench.png"), rows, copy_gbs, env)
    if png:
        paths["png"] = png
    return paths


def _chart_provider(provider: str) -> str:
    """The chart's name of a provider: the seed's eager path is "seed" in every panel (bench_swiglu says "seed
    eager" to set it apart from torch.compile(seed))."""
    return "seed" if provider == "seed eager" else provider


def write_chart(path: str, rows: list, copy_gbs, env: dict) -> str | None:
    """Bar chart of GB/s per op and provider, one panel per shape, a dashed line at the copy bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kern = [r for r in rows if r.get("kind") == "kernel" and r.get("GB/s") is not None and not math.isnan(r["GB/s"])]
    if not kern:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in kern))
    providers = list(dict.fromkeys(_chart_provider(r["provider"]) for r in kern))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}  # one color per provider across every panel
    fig, axes = plt.subplots(len(shapes), 1, figsize=(11, 2.8 * len(shapes) + 0.8), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, shape in zip(axes[:, 0], shapes, strict=True):
        mine = [r for r in kern if r["shape"] == shape]
        ops = list(dict.fromkeys(r["op"] for r in mine))
        for i, prov in enumerate(providers):
            vals = {r["op"]: r["GB/s"] for r in mine if _chart_provider(r["provider"]) == prov}
            xs = [j + i * width for j, op in enumerate(ops) if op in vals]
            if xs:
                ax.bar(xs, [vals[op] for op in ops if op in vals], width, color=colors[prov], label=prov)
        if copy_gbs:
            ax.axhline(copy_gbs, color="k", ls="--", lw=1, label=f"device copy {copy_gbs:.0f} GB/s")
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(ops))])
        ax.set_xticklabels(ops, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(shape, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    labels = list(providers)
    if copy_gbs:
        handles.append(plt.Line2D([], [], color="k", ls="--", lw=1))
        labels.append(f"measured device copy bandwidth {copy_gbs:.0f} GB/s")
    height = fig.get_figheight()
    fig.suptitle(f"moe_raw vs seed (GB/s by the minimum-bytes model): {env.get('gpu')}, torch {env.get('torch')}, "
                 f"sha {str(env.get('git_sha'))[:10]}, {env.get('timestamp')}", fontsize=9,
                 y=1 - 0.1 / height)  # fmt: skip
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None, prog: str = "python -m bench") -> int:
    args = parse_args(argv, prog)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        print("no CUDA device found: running the self-check on the CPU path; the benchmark needs CUDA")
    progress(f"self-check on {device} (every dtype, small shapes, against moe_raw.reference in fp64)")
    checks = selfcheck(args.ops, device, args.quick)
    failed = sum(c["status"] == "FAIL" for c in checks)
    print(f"self-check: {len(checks) - failed} PASS, {failed} FAIL", flush=True)
    rows, bw, ok = [], {"copy_GBps": None, "write_GBps": None}, failed == 0
    if cuda and not args.no_bench:
        rows, bw, bench_ok = run_benchmarks(args)
        ok &= bench_ok
    out_dir = args.out or ("bench/results/latest" if cuda else None)
    if out_dir:
        env = common.environment()
        paths = write_record(out_dir, env, {"quick": args.quick, "ops": list(args.ops), "dtype": args.dtype,
                                            "shapes": args.shapes, "no_bench": args.no_bench}, checks, rows,
                             bw["copy_GBps"], bw["write_GBps"])  # fmt: skip
        progress("wrote " + ", ".join(paths.values()))
    if rows:
        print()
        print(markdown(rows, bw["copy_GBps"]))
    return 0 if ok else 1


def console_main() -> int:
    """The ``moe-raw-bench`` command (installed with the package): the same as ``python -m bench`` in a checkout."""
    return main(prog="moe-raw-bench")


if __name__ == "__main__":
    sys.exit(main())
