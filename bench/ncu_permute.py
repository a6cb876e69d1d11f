"""One permute forward at a benchmark shape, for Nsight Compute.

ncu --clock-control none -k regex:permute_scatter -c 1 python -m bench.ncu_permute [shape name]
"""

import sys

import torch

import moe_raw

from .bench_permute import SHAPES, make_inputs

name = sys.argv[1] if len(sys.argv) > 1 else "DeepSeek-V3"
T, E, H, K = SHAPES[name]
x, rm, probs = make_inputs(T, E, H, K)
for _ in range(3):
    moe_raw.permute(x, rm, probs, num_out_tokens=T * K, fused=True)
torch.cuda.synchronize()
