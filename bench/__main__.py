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
  --ops     comma list of: permute, unpermute, sort_chunks, topk, pad, fp8, swiglu, weighted_swiglu,
            weighted_swiglu_back, router, layer, automodel; or "all". "permute" and "swiglu" name their groups:
            permute = permute + unpermute (measured together: one shape gives both, fwd, bwd and the autograd round
            trip) + sort_chunks (sort_chunks_by_idxs) + topk (permute_topk / unpermute_topk) + pad (permute_and_pad,
            permute_with_row_map); swiglu = swiglu + weighted_swiglu + weighted_swiglu_back. fp8 =
            permute_quantized, every recipe, at DeepSeek-V3 / Qwen3-30B-A3B beside moe_raw.permute + a torch
            quantize pass, eager and torch.compile'd, and the FP8 expert up-projection of examples/ against bf16
            (bench/bench_fp8.py; not in the permute group). router =
            topk_routing_with_score_function fwd / fwd+bwd beside Megatron's torch router (bench/bench_router.py,
            fp32 logits). layer = the
            end-to-end MoE layer (bench/bench_layer.py), and at DeepSeek-V3 / Qwen3-30B-A3B the dropless layer of
            examples/dropless_moe_layer.py (router + trainable experts, eager vs one CUDA graph vs Megatron's torch
            router and the seed). automodel = NeMo Automodel's own expert block, stock vs
            after apply_to_automodel() (bench/automodel_block.py; skipped when nemo_automodel is not installed).
            Default: all.
  --dtype   bf16 (default) | fp16 | fp32: the benchmark's token/activation dtype (the self-check runs all three).
  --shapes  comma list of shape names from bench_permute.SHAPES (bench_fp8.SHAPES has two of them),
            bench_swiglu.SHAPES (the name up to the first space, e.g. N32768-F2048, is enough),
            bench_layer.LAYER_SHAPES and automodel_block.SHAPES; an op runs the listed shapes of its own table (or,
            if none of them is in its table, its default). Default: every shape (--quick: the first).
  --out DIR where the record goes (default bench/results/latest on CUDA; on CPU nothing is written unless given).

Output: PASS/FAIL lines of the self-check and the benchmark's progress go to stdout/stderr as they happen; the
markdown tables come at the end on stdout. Exit status: 0 when every check passed (and, with the layer case, both
providers agreed and the dropless layer's graph replay equalled eager bit for bit), 1 otherwise, 2 for bad arguments.

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
import sys
import textwrap

import torch

from . import common
from .record import markdown, write_record
from .selfcheck import selfcheck

OPS = ("permute", "unpermute", "sort_chunks", "topk", "pad", "fp8", "swiglu", "weighted_swiglu",
       "weighted_swiglu_back", "router", "layer", "automodel")  # fmt: skip
GROUPS = {
    "all": OPS,
    "permute": ("permute", "unpermute", "sort_chunks", "topk", "pad"),
    "swiglu": ("swiglu", "weighted_swiglu", "weighted_swiglu_back"),
}
SWIGLU_CALLS = {"swiglu": "swiglu fwd", "weighted_swiglu": "weighted_swiglu fwd",
                "weighted_swiglu_back": "weighted_swiglu bwd"}  # fmt: skip
progress = common.progress


# ----------------------------------------------------------------------------------------------- arguments


def shape_tables() -> dict:
    """{"permute": {name: shape}, "fp8": {...}, "swiglu": {...}, "layer": {...}, "automodel": {...}} (names as in the
    modules' tables)."""
    from . import automodel_block, bench_fp8, bench_layer, bench_permute, bench_swiglu

    return {"permute": bench_permute.SHAPES, "fp8": bench_fp8.SHAPES, "swiglu": bench_swiglu.SHAPES,
            "layer": bench_layer.LAYER_SHAPES, "automodel": automodel_block.SHAPES}  # fmt: skip


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
    if "fp8" in args.ops:
        from . import bench_fp8

        for name in select_shapes(bench_fp8.SHAPES, args.shapes, args.quick):
            progress(f"permute_quantized {name}, every recipe (the first call of each compiles the torch.compile "
                     "quantize pass)")  # fmt: skip
            frows = bench_fp8.bench_rows(copy_gbs, dtype=dtype, shapes={name: bench_fp8.SHAPES[name]})
            rows += [{"kind": "kernel", "dtype": args.dtype, **r} for r in frows]
            torch.cuda.empty_cache()
        progress("FP8 expert up-projection (examples/fp8_expert_layer.py) against bf16")
        rows += [{"kind": "kernel", "dtype": "bf16", **r} for r in bench_fp8.layer_rows()]
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
    if "router" in args.ops:
        from . import bench_router

        progress("router host time at T=16")
        rows += [{"kind": "host", "dtype": "fp32", **r} for r in bench_router.host_time_rows()]
        progress("router fwd / fwd+bwd (the first call of each shape compiles torch.compile(seed))")
        tokens = bench_router.TOKENS[:1] if args.quick else bench_router.TOKENS
        rows += [{"kind": "kernel", "dtype": "fp32", **r} for r in bench_router.bench_rows(copy_gbs, tokens=tokens)]
        torch.cuda.empty_cache()
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
        dropless = [n for n in names if n in bench_layer.DROPLESS_PRESETS]
        if dropless and bench_layer.dropless_module() is None:
            progress("dropless MoE layer: skipped (examples/dropless_moe_layer.py is not next to bench/: a checkout)")
            dropless = []
        for name in dropless:
            progress(f"dropless MoE layer {name} (router + experts fwd+bwd: eager, CUDA graph, seed)")
            lrows, lok = bench_layer.bench_dropless_shape(name, *bench_layer.LAYER_SHAPES[name], dtype=dtype)
            ok &= lok
            rows += [{"dtype": args.dtype, **r} for r in lrows]
    if "automodel" in args.ops:
        from . import automodel_block

        try:
            automodel_block.modules()
        except ImportError as e:
            progress(f"automodel: skipped ({e}); pip install --no-deps nemo_automodel==0.7.0 to run it")
        else:
            for name in select_shapes(automodel_block.SHAPES, args.shapes, args.quick):
                progress(f"NeMo Automodel expert block {name} (stock vs apply_to_automodel, fwd+bwd)")
                arows = automodel_block.bench_shape(name, *automodel_block.SHAPES[name], dtype=dtype)
                rows += [{"dtype": args.dtype, **r} for r in arows]
                torch.cuda.empty_cache()
    _speedups(rows)
    return rows, {"copy_GBps": copy_gbs, "write_GBps": write_gbs}, ok


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
