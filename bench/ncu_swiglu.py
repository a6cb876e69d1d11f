"""The SwiGLU forward at N 32768, F 2048 (bf16), moe_raw's kernel and torch.compile's of the reference, for
Nsight Compute (the shape where torch.compile's kernel is faster on the H200).

ncu --clock-control none -k regex:"swiglu|triton" python -m bench.ncu_swiglu
"""

import torch

import moe_raw
from moe_raw import reference

y = torch.randn(32768, 4096, device="cuda", dtype=torch.bfloat16)
compiled = torch.compile(reference.swiglu)
for _ in range(2):
    moe_raw.swiglu(y)
    compiled(y)
torch.cuda.synchronize()
