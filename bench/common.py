"""Shared benchmark helpers: timing, the measured copy bandwidth (the roofline), environment record."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# Benchmark dtypes by their command-line names (every bench CLI takes --dtype from here).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """A progress line on stderr with the seconds since the bench started (stdout keeps the tables)."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def do_bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events; triton.testing.do_bench flushes L2 between reps)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written (dst.copy_(src))."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_gb(fn) -> float:
    """GB the device allocates above what is already allocated while fn() runs once (synchronized on both sides;
    call fn() once before, so compiles and the allocator's pools are not counted)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def host_us(fn, iters: int = 200, repeats: int = 7) -> float:
    """Host microseconds per call of fn() (tiny GPU work: the loop is launch-bound): host_us_many of fn alone."""
    return host_us_many({"fn": fn}, iters, repeats)["fn"]


def host_us_many(fns: dict, iters: int = 200, repeats: int = 7) -> dict:
    """{name: host microseconds per call of fns[name]()} (tiny GPU work: each loop is launch-bound), each the median
    of `repeats` loops of `iters` calls that sync only at their end. The loops are interleaved (round r times every
    fn, starting one further along each round), so a slow spell of the host machine falls on every fn alike, not on
    whichever is measured first: one H100 host ran the first loop of a fixed-order run 1.5x slower than the same
    call measured later (bench/results/2026-12-06-h100-twelfth-main). The median damps the rest of the noise."""
    names = list(fns)
    for name in names:
        for _ in range(20):
            fns[name]()
    torch.cuda.synchronize()
    per_call = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call[name].append((time.perf_counter() - t0) / iters * 1e6)
            torch.cuda.synchronize()
    return {name: sorted(v)[len(v) // 2] for name, v in per_call.items()}


def write_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured write-only bandwidth in GB/s (cudaMemsetAsync): the roofline of write-heavy ops such as permute,
    which writes K bytes for each byte it reads. (torch's uint8 ``fill_`` writes 4 bytes a store and reached only
    79% of the H200's copy rate, memset 106%: bench/results/2026-12-04-h200-issue16.)"""
    from moe_raw import _cupy_cache

    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    runtime = _cupy_cache.cupy().cuda.runtime
    ms = do_bench(lambda: runtime.memsetAsync(dst.data_ptr(), 1, nbytes, torch.cuda.current_stream().cuda_stream))
    return nbytes / (ms * 1e-3) / 1e9


def _git_sha() -> str:
    """MOE_RAW_GIT_SHA if set (the commit a copied tree was made from), else HEAD of the checkout this file is in,
    with "-dirty" when tracked files differ from it, or "unknown" (e.g. a copied tree without .git)."""
    if os.environ.get("MOE_RAW_GIT_SHA"):
        return os.environ["MOE_RAW_GIT_SHA"]
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=False)

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    sha = head.stdout.strip()
    if head.returncode != 0 or len(sha) != 40:
        return "unknown"
    return sha + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")


def environment() -> dict:
    import numpy

    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("cupy", "numba", "numba_cuda", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            env[mod] = None
    env["git_sha"] = os.environ.get("MOE_RAW_GIT_SHA") or _git_sha()
    return env


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def print_rows_main(bench_rows) -> int:
    """``python -m bench.<module>``'s body for a module whose ``bench_rows(copy_gbs)`` returns the common row dicts:
    the measured copy bandwidth, then one markdown table."""
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    copy_gbs = copy_bandwidth_gbs()
    print(f"# copy {copy_gbs:.0f} GB/s\n\n| shape | op | provider | ms | GB/s | % of copy | note |")
    print("|---|---|---|---|---|---|---|")
    for r in bench_rows(copy_gbs):
        print(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
              f"{r['pct_copy']:.0f}% | {r['note']} |")  # fmt: skip
    return 0


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_module(name: str):
    """examples/<name>.py as the module ``name`` (loaded once), or None where the file is not next to bench/ (an
    installed wheel ships bench/ without examples/)."""
    if name in sys.modules:
        return sys.modules[name]
    path = EXAMPLES / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
