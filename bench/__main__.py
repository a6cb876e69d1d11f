"""python -m bench: self-check every op against moe_raw.reference, then (on CUDA) the benchmark tables.

Today: the permute/unpermute self-check (bench.smoke) and benchmark (bench.bench_permute), plus the SwiGLU
benchmark when bench.bench_swiglu exists. Options of the full tool (--quick, --ops, --shapes, charts) are issue #5.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from bench import smoke


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one benchmark shape per op")
    ap.add_argument("--no-bench", action="store_true", help="self-check only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device found: checking the CPU path (moe_raw.reference) only; the GPU benchmark needs CUDA")
        ok = smoke.main(device="cpu") == 0
        return 0 if ok else 1
    if smoke.main() != 0:
        return 1
    if args.no_bench:
        return 0
    from bench import bench_permute

    rc = bench_permute.main(["--quick"] if args.quick else [])
    if importlib.util.find_spec("bench.bench_swiglu") is not None:
        from bench import bench_swiglu

        rc |= bench_swiglu.main(["--quick"] if args.quick else [])
    return rc


if __name__ == "__main__":
    sys.exit(main())
