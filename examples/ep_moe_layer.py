"""An expert-parallel MoE layer on moe_raw.MoEAlltoAllDispatcher (issue #8).

    torchrun --nproc-per-node 2 examples/ep_moe_layer.py                  # dropless
    torchrun --nproc-per-node 2 examples/ep_moe_layer.py --drop-and-pad   # fixed capacity, no host sync

NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU. Every rank routes its own tokens (softmax top-k
router, replicated), holds E / world_size experts (SwiGLU MLPs; all weights come from one seed) and runs forward +
backward through dispatch -> experts -> combine. It prints the throughput (tokens of all ranks per second, forward +
backward) and the largest error of the output and of the tokens' gradient against the same layer computed on one
process with all E experts (moe_raw.permute / unpermute, no communication).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_raw


def swiglu_mlp(x, w1, w2):
    gate, up = (x @ w1).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


def route(x, w_router, k):
    top_p, top_i = (x @ w_router).softmax(-1).topk(k, dim=-1)
    routing_map = torch.zeros(top_p.shape[0], w_router.shape[1], dtype=torch.bool, device=x.device)
    routing_map.scatter_(1, top_i, True)
    probs = torch.zeros(routing_map.shape, dtype=top_p.dtype, device=x.device).scatter(1, top_i, top_p)
    return routing_map, probs


def run_experts(rows, sizes, w1, w2):
    """Expert e of w1 / w2 on its block of ``sizes[e]`` rows (host ints)."""
    outs = [swiglu_mlp(chunk, w1[e], w2[e]) for e, chunk in enumerate(rows.split(sizes))]
    return torch.cat(outs) if outs else rows.new_zeros((0, w2.shape[-1]))


def ep_layer(dispatcher, x, w_router, w1, w2, k):
    routing_map, probs = route(x, w_router, k)
    rows, _, tokens_per_expert = dispatcher.dispatch(x, probs, routing_map)
    if dispatcher.drop_and_pad:  # static: ep_size * C rows per local expert
        sizes = [rows.shape[0] // dispatcher.num_local_experts] * dispatcher.num_local_experts
    else:  # read on the host by dispatch's one sync already
        sizes = dispatcher.tokens_per_expert_host
    return dispatcher.combine(run_experts(rows, sizes, w1, w2))  # combine weights the rows by the probs


def single_process_layer(x, w_router, w1_all, w2_all, k, capacity):
    """The same layer on one process: every expert local, no communication."""
    routing_map, probs = route(x, w_router, k)
    num_experts = routing_map.shape[1]
    if capacity is None:
        rows, _, row_map = moe_raw.permute(x, routing_map, fused=True)
        sizes = routing_map.sum(0).tolist()
    else:
        rows, _, row_map = moe_raw.permute(
            x, routing_map, num_out_tokens=num_experts * capacity, fused=True, drop_and_pad=True
        )
        sizes = [capacity] * num_experts
    out = run_experts(rows, sizes, w1_all, w2_all)
    return moe_raw.unpermute(out, row_map, (x.shape[0], out.shape[1]), probs=probs, fused=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512, help="SwiGLU width F (W1 is [H, 2F])")
    ap.add_argument("--experts-per-rank", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--drop-and-pad", action="store_true")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    T, H, FF, K = args.tokens, args.hidden, args.ffn, args.topk
    L = args.experts_per_rank
    E = L * world

    g = torch.Generator().manual_seed(0)  # the same weights on every rank
    w_router = (torch.randn(H, E, generator=g) / math.sqrt(H)).to(dev, dtype)
    w1_all = (torch.randn(E, H, 2 * FF, generator=g) / math.sqrt(H)).to(dev, dtype)
    w2_all = (torch.randn(E, FF, H, generator=g) / math.sqrt(FF)).to(dev, dtype)
    local = slice(rank * L, (rank + 1) * L)
    w1, w2 = w1_all[local].clone().requires_grad_(), w2_all[local].clone().requires_grad_()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1 + rank)).to(dev, dtype).requires_grad_()

    dispatcher = moe_raw.MoEAlltoAllDispatcher(
        E, L, drop_and_pad=args.drop_and_pad, capacity_factor=args.capacity_factor, router_topk=K
    )

    def step():
        y = ep_layer(dispatcher, x, w_router, w1, w2, K)
        y.float().square().mean().backward()
        return y

    y = step()  # warm-up (and the result checked below)
    dx = x.grad.clone()
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        x.grad = w1.grad = w2.grad = None
        step()
    sync()
    dist.barrier()
    seconds = time.perf_counter() - t0

    # The same layer on one process for this rank's tokens (x's gradient depends on these tokens only).
    x_ref = x.detach().clone().requires_grad_()
    capacity = dispatcher.capacity if args.drop_and_pad else None
    y_ref = single_process_layer(x_ref, w_router, w1_all, w2_all, K, capacity)
    y_ref.float().square().mean().backward()
    errs = torch.tensor(
        [(y - y_ref).abs().max().item(), (dx - x_ref.grad).abs().max().item()], dtype=torch.float64, device=dev
    )
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if rank == 0:
        mode = f"drop_and_pad (C = {dispatcher.capacity})" if args.drop_and_pad else "dropless"
        print(
            f"EP {world} ranks ({'nccl' if use_cuda else 'gloo'}, {dev.type}), {mode}, T={T}/rank H={H} F={FF} "
            f"E={E} K={K} {args.dtype}"
        )
        print(
            f"forward + backward: {args.iters * T * world / seconds:.4g} tokens/s ({seconds / args.iters * 1e3:.2f} ms)"
        )
        print(f"max |y - y_single|: {errs[0].item():.3g}   max |dx - dx_single|: {errs[1].item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
