"""One dispatch op at a benchmark shape (bench.bench_permute's shapes, bf16), three calls, for Nsight Compute.

ncu --clock-control none -k regex:KERNEL -c 1 python -m bench.ncu_permute [shape name] [op]

op (default permute): permute (kernel permute_scatter), unpermute (gather_reduce; gather_warp with
MOE_RAW_BLOCK_KERNELS=0), unpermute_bwd (unpermute_bwd), permute_and_pad (permute_scatter, aligned layout),
sort_chunks (chunk_sort; EP 8 ranks' chunks), copy_only (scatter_rows: permute's rows moved from a finished row
map, no routing lookups: bench.probe_permute's "copy only"), quantize_rowwise / quantize_blockwise / quantize_mxfp8
(permute_quantized with that recipe: kernel quantize_warp; quantize_rows with MOE_RAW_BLOCK_KERNELS=1).
"""

import sys

import torch

import moe_raw

from .bench_permute import SHAPES, make_inputs

name = sys.argv[1] if len(sys.argv) > 1 else "DeepSeek-V3"
op = sys.argv[2] if len(sys.argv) > 2 else "permute"
T, E, H, K = SHAPES[name]
x, rm, probs = make_inputs(T, E, H, K)
n = T * K
if op != "permute" and op != "permute_and_pad":  # the op's input rows (a permute launch ncu's -c 1 would catch)
    permuted, _, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)
    rows = permuted.detach().clone().requires_grad_(True)
grad = torch.randn(T, H, device="cuda", dtype=x.dtype)
sizes = rm.sum(0)
ep = 8  # bench_dispatch's regrouping: EP ranks x E / EP local experts, rank-major -> local-expert-major
order = torch.arange(E).view(ep, E // ep).t().reshape(-1).cuda() if E % ep == 0 else torch.arange(E - 1, -1, -1).cuda()


def unpermute_bwd():
    out = moe_raw.unpermute(rows, row_map, (T, H), probs.detach().requires_grad_(True), fused=True)
    out.backward(grad)


OPS = {
    "permute": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True),
    "unpermute": lambda: moe_raw.unpermute(permuted, row_map, (T, H), probs, fused=True),
    "unpermute_bwd": unpermute_bwd,
    "permute_and_pad": lambda: moe_raw.permute_and_pad(x, rm, probs, 16),
    "sort_chunks": lambda: moe_raw.sort_chunks_by_idxs(permuted, sizes, order),
    "copy_only": lambda: moe_raw.permute_with_row_map(x, row_map, n),
}
for recipe in ("rowwise", "blockwise", "mxfp8"):
    OPS[f"quantize_{recipe}"] = lambda r=recipe: moe_raw.permute_quantized(x, rm, probs, num_out_tokens=n, recipe=r)
for _ in range(3):
    OPS[op]()
torch.cuda.synchronize()
