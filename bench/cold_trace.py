"""Where a cold call's extra latency goes, from a torch.profiler (CUPTI) trace: python -m bench.cold_trace [--out F]

bench.cold_call measures how much longer a dispatch op takes when issued to an idle GPU than back to back; this
traces the same calls to say why. For each op of bench.cold_call at its shapes, --calls calls issued cold (after a
synchronize, which stays outside the traced range) and as many issued back to back are traced. Per call, in
microseconds from the moment the call started on the host (its record_function range):

  host         the call's host time (the range's length)
  launches     kernel launch API calls in the range (cuLaunchKernel from moe_raw, cudaLaunchKernel from torch)
  last_launch  end of the last launch call
  first_start  start of the op's first kernel on the GPU
  gpu_end      end of its last kernel
  kernels      the sum of its kernels' durations
  gaps         gpu_end - first_start - kernels: GPU time between the op's kernels (waiting for the host's launches)

Medians over the calls. The same kernels measured back to back tell whether a kernel itself runs slower from idle
(clocks, caches, TLB) or whether the GPU waits for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from .bench_permute import SHAPES
from .cold_call import COLD_SHAPES, cases
from .common import environment

_LAUNCH_APIS = ("cuLaunchKernel", "cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
FIELDS = ("host", "launches", "last_launch", "first_start", "gpu_end", "kernels", "gaps")


def analyse(events: list, prefix: str) -> list[dict]:
    """Per record_function range whose name starts with ``prefix`` (a Chrome-trace event list, as torch.profiler's
    export_chrome_trace writes it): the FIELDS above and the kernels [(name, start, duration)], times relative to
    the range's start. Kernels belong to a range through the correlation id of a launch call inside it; a range
    with no such launch (a trace without driver-API records) takes the kernels that start before the next range."""
    ranges = sorted(
        (e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix)),
        key=lambda e: e["ts"],
    )
    launches = [e for e in events if e.get("name") in _LAUNCH_APIS]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    by_corr = {k.get("args", {}).get("correlation"): k for k in kernels}
    rows = []
    for i, r in enumerate(ranges):
        t0, t1 = r["ts"], r["ts"] + r["dur"]
        mine = [c for c in launches if t0 <= c["ts"] <= t1]
        ks = [by_corr[c["args"]["correlation"]] for c in mine if c.get("args", {}).get("correlation") in by_corr]
        if not ks:
            t_next = ranges[i + 1]["ts"] if i + 1 < len(ranges) else float("inf")
            ks = [k for k in kernels if t0 <= k["ts"] < t_next]
        row = {"host": r["dur"], "launches": len(mine)}
        row["last_launch"] = max((c["ts"] + c["dur"] - t0 for c in mine), default=float("nan"))
        if ks:
            first, end = min(k["ts"] for k in ks), max(k["ts"] + k["dur"] for k in ks)
            busy = sum(k["dur"] for k in ks)
            row.update(first_start=first - t0, gpu_end=end - t0, kernels=busy, gaps=end - first - busy)
        else:
            row.update(first_start=float("nan"), gpu_end=float("nan"), kernels=0.0, gaps=float("nan"))
        row["kernel_list"] = [(k["name"], k["ts"] - t0, k["dur"]) for k in sorted(ks, key=lambda k: k["ts"])]
        rows.append(row)
    return rows


def median(rows: list[dict], field: str) -> float:
    values = sorted(r[field] for r in rows)
    return values[len(values) // 2] if values else float("nan")


def trace(fn, calls: int, cold: bool) -> list[dict]:
    """Trace ``calls`` calls of fn, each synchronized before (cold) or all issued in a row (back to back)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            if cold:
                torch.cuda.synchronize()
            with record_function(f"call {i}"):
                fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return analyse(events, "call ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cold_trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write every call's figures and kernels as JSON here")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    record = []
    print("| shape | op | mode | " + " | ".join(f"{f} us" if f != "launches" else f for f in FIELDS) + " |")
    print("|" + " --- |" * (3 + len(FIELDS)))
    for shape in COLD_SHAPES:
        for op, fn in cases(*SHAPES[shape]).items():
            for mode in ("cold", "back to back"):
                rows = trace(fn, args.calls, mode == "cold")
                record.append({"shape": shape, "op": op, "mode": mode, "calls": rows})
                cells = " | ".join(f"{median(rows, f):.1f}" for f in FIELDS)
                print(f"| {shape} | {op} | {mode} | {cells} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "rows": record}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
