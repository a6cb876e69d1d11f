"""The gated-activation forward's row segment (moe_raw/_kernels/glu_codegen.py ``_FWD_SEGMENT_UNITS``) against its
time, one value per process, beside torch.compile of the seed in the same process.

    python -m bench.probe_swiglu SEGMENT_UNITS [--compile]

SEGMENT_UNITS 0 means one warp per whole row (the layout before segments). Prints one table row per shape and op.
"""

from __future__ import annotations

import sys

import torch

import moe_raw
from moe_raw import reference
from moe_raw._kernels import glu_codegen

from . import common
from .bench_swiglu import SHAPES, _inputs, bytes_swiglu_fwd, bytes_weighted_swiglu_fwd


def main() -> None:
    seg = int(sys.argv[1])
    glu_codegen._FWD_SEGMENT_UNITS = seg if seg > 0 else 1 << 40  # read when the kernel is built and launched
    copy = common.copy_bandwidth_gbs()
    print(f"segment {seg or 'whole row'} units, copy {copy:.0f} GB/s")
    for name, (n, f) in SHAPES.items():
        y, _, w = _inputs(n, f)
        s = y.element_size()
        calls = {"swiglu fwd": (moe_raw.swiglu, reference.swiglu, (y,), bytes_swiglu_fwd(n, f, s)),
                 "weighted_swiglu fwd": (moe_raw.weighted_swiglu, reference.weighted_swiglu, (y, w),
                                         bytes_weighted_swiglu_fwd(n, f, s))}  # fmt: skip
        for op, (ours, seed, args, nbytes) in calls.items():
            ms = common.do_bench(lambda: ours(*args))  # noqa: B023
            line = f"| {name} | {op} | {ms:.4f} ms | {100 * nbytes / (ms * 1e-3) / 1e9 / copy:.1f}% of copy |"
            if "--compile" in sys.argv:
                compiled = torch.compile(seed)
                compiled(*args)
                ms_c = common.do_bench(lambda: compiled(*args))  # noqa: B023
                line += f" torch.compile {ms_c:.4f} ms ({ms_c / ms:.3f}x) |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
