"""Permute's forward in one line per run, for same-run A/Bs of kernel trees (bench/pending/ab.sh):

    python -m bench.permute_fwd [label]

At every bench shape (bf16, probs, fused): permute with num_out_tokens given (ms, % of the copy bandwidth measured
in the same process), permute with the row count unknown (one device-to-host read), permute_and_pad at align 16
(ms, % of copy counting the padding rows it writes).
"""

from __future__ import annotations

import sys

import torch

import moe_raw

from . import common
from .bench_permute import SHAPES, bytes_permute_fwd, make_inputs


def main() -> None:
    copy = common.copy_bandwidth_gbs()
    cells = [f"copy {copy:.0f} GB/s"]
    for name, (T, E, H, K) in SHAPES.items():
        x, rm, probs = make_inputs(T, E, H, K)
        s = x.element_size()
        ms = common.do_bench(lambda: moe_raw.permute(x, rm, probs, num_out_tokens=T * K, fused=True))  # noqa: B023
        ms_unknown = common.do_bench(lambda: moe_raw.permute(x, rm, probs, fused=True))  # noqa: B023
        rows = moe_raw.permute_and_pad(x, rm, probs, 16)[0].shape[0]
        ms_pad = common.do_bench(lambda: moe_raw.permute_and_pad(x, rm, probs, 16))  # noqa: B023
        pct = 100 * bytes_permute_fwd(T, E, H, K, s) / (ms * 1e-3) / 1e9 / copy
        pct_pad = 100 * (T * H * s + rows * H * s) / (ms_pad * 1e-3) / 1e9 / copy
        cells.append(f"{name} {ms:.4f} ({pct:.1f}%) unknown N {ms_unknown:.4f} pad {ms_pad:.4f} ({pct_pad:.1f}%)")
        x = rm = probs = None
        torch.cuda.empty_cache()
    print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
