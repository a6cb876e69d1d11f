"""One phased row mover of bench.probe_permute (--phased) at a benchmark shape, three launches, for Nsight Compute:

    ncu --clock-control none -k regex:phased_rows -s 2 -c 1 python -m bench.ncu_phased [shape name] [config label]

The rows permute moves at that shape (bf16), from a finished [T, K] destination table, in the named configuration
of bench.probe_permute._PHASED_CONFIGS (default "1/4 per batch"): the lookup-free mover to set beside permute's row
kernel (bench.ncu_permute) under the same sections.
"""

import sys

import torch

import moe_raw

from .bench_permute import SHAPES, make_inputs
from .probe_permute import _PHASED_CONFIGS, _phased


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "Qwen3-30B-A3B"
    label = sys.argv[2] if len(sys.argv) > 2 else "1/4 per batch"
    T, E, H, K = SHAPES[name]
    x, rm, probs = make_inputs(T, E, H, K)
    out, _, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=T * K, fused=True)
    routed = row_map[:T] >= 0
    dest = row_map[:T][routed].view(T, K).contiguous()
    rows_out = torch.zeros_like(out)
    _, divisor, persistent, mode, threads = next(c for c in _PHASED_CONFIGS if c[0] == label)
    launch = _phased(x, rows_out, dest, divisor, persistent, mode, threads)
    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    assert torch.equal(rows_out, out), f"phased_rows {label} moved the wrong rows at {name}"


if __name__ == "__main__":
    main()
