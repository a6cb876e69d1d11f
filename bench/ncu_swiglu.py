"""One SwiGLU-family op at N 32768, F 2048 (bf16 y, fp32 router weights), moe_raw's kernel and torch.compile's of
the reference, for Nsight Compute (the shape where torch.compile's forward is level with or faster than ours on
the H200, and the weighted backward is furthest from copy).

ncu --clock-control none -k regex:"glu|triton" python -m bench.ncu_swiglu [fwd|weighted_fwd|bwd|weighted_bwd]
"""

import sys

import torch

import moe_raw
from moe_raw import reference

N, F = 32768, 2048
op = sys.argv[1] if len(sys.argv) > 1 else "fwd"
y = torch.randn(N, 2 * F, device="cuda", dtype=torch.bfloat16)
g = torch.randn(N, F, device="cuda", dtype=torch.bfloat16)
w = torch.rand(N, 1, device="cuda", dtype=torch.float32)
calls = {
    "fwd": ("swiglu", (y,)),
    "weighted_fwd": ("weighted_swiglu", (y, w)),
    "bwd": ("swiglu_back", (g, y)),
    "weighted_bwd": ("weighted_swiglu_back", (g, y, w)),
}
if op not in calls:
    raise SystemExit(f"op must be one of {sorted(calls)}, got {op!r}")
name, args = calls[op]
ours, compiled = getattr(moe_raw, name), torch.compile(getattr(reference, name))
for _ in range(2):
    ours(*args)
    compiled(*args)
torch.cuda.synchronize()
