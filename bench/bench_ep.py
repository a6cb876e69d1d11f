"""Expert-parallel MoE layer across GPUs: moe_raw.MoEAlltoAllDispatcher against the same layer built from the seed's
functions, same run, same ranks (issue #8).

    torchrun --nproc-per-node 2 -m bench.bench_ep [--quick] [--shape NAME] [--drop-and-pad] [--out FILE.json]

One rank per GPU (NCCL; gloo on CPU, where only --shape tiny is meant to run). Every rank holds T tokens and
L = E / world_size experts and runs one MoE layer forward + backward:
  router logits [T, E] fp32 -> softmax -> top-K -> routing map + dense probs
  -> dispatch (permute -> all_to_all_single -> regroup chunks by local expert)
  -> up-projection, weighted SwiGLU (the experts apply the router probs, Megatron's default), down-projection
  -> combine (regroup back -> all_to_all_single -> unpermute)
and the backward of sum(y * gy) reaches x and the router logits (the expert weights are frozen, as in
bench/bench_layer.py: their grads are plain matmuls that neither provider touches).

Providers, with the same weights, routing, transport (torch.distributed.all_to_all_single with autograd:
moe_raw.dispatcher.all_to_all) and expert matmuls (bench_layer.grouped_matmul):
  moe_raw  MoEAlltoAllDispatcher(combine_with_probs=False) (moe_raw.permute / sort_chunks_by_idxs / unpermute),
           moe_raw.weighted_bias_swiglu_impl
  seed     SeedAlltoAll below, Megatron's unfused path: bench.seed.permute, split + cat chunk regrouping on host
           lists (bench_dispatch.megatron_sort_chunks), bench.seed.unpermute, the seed's weighted SwiGLU
Dropless, both providers read the exchanged counts on the host once per layer (all_to_all_single needs host split
sizes); with --drop-and-pad neither needs the counts (fixed capacity) and moe_raw does not sync the host at all.
Reported on rank 0: ms per layer fwd+bwd (the slowest rank; median of rounds), tokens/s of all ranks, peak memory
(the largest rank), and the largest relative difference (Frobenius) between the providers' y, dx, dlogits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import moe_raw
from moe_raw import reference
from moe_raw.dispatcher import all_to_all

from . import seed
from .bench_dispatch import megatron_sort_chunks
from .bench_layer import LAYER_RTOL, grouped_matmul, rel_err
from .common import DTYPES

EP_SHAPES = {  # name: (T per rank, E, H, K, F) -- the shapes of bench_layer, T tokens on every rank
    "DeepSeek-V3": (4096, 256, 7168, 8, 2048),
    "Mixtral-8x7B": (16384, 8, 4096, 2, 14336),
    "Qwen3-30B-A3B": (16384, 128, 2048, 8, 768),
    "tiny": (64, 8, 32, 2, 16),  # CPU / gloo smoke run (tests/test_dispatcher.py)
}
QUICK_SHAPE = "Qwen3-30B-A3B"
CAPACITY_FACTOR = 1.25


class SeedAlltoAll:
    """Megatron's MoEAlltoAllTokenDispatcher on the seed's functions (the baseline; same interface as
    moe_raw.MoEAlltoAllDispatcher with combine_with_probs=False). Chunk sizes live in host lists, as in Megatron."""

    def __init__(self, num_experts, num_local_experts, drop_and_pad, capacity):
        self.E, self.L = num_experts, num_local_experts
        self.ep = dist.get_world_size()
        self.drop_and_pad, self.capacity = drop_and_pad, capacity
        self.tokens_per_expert_host = None

    def dispatch(self, x, probs, routing_map):
        ep, L, E = self.ep, self.L, self.E
        if self.drop_and_pad:
            C = self.capacity
            rows, rows_probs, sidx = seed.permute(x, routing_map, probs, num_out_tokens=E * C, drop_and_pad=True)
            in_splits = out_splits = None
            recv_h = [C] * (ep * L)
        else:
            counts = routing_map.sum(0, dtype=torch.int64)
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts)
            host = torch.cat([counts, recv]).tolist()  # the one host sync (Megatron's .cpu() of the counts)
            counts_h, recv_h = host[:E], host[E:]
            in_splits = [sum(counts_h[j * L : (j + 1) * L]) for j in range(ep)]
            out_splits = [sum(recv_h[j * L : (j + 1) * L]) for j in range(ep)]
            rows, rows_probs, sidx = seed.permute(x, routing_map, probs)
        rows = all_to_all(rows, None, out_splits, in_splits)
        rows_probs = all_to_all(rows_probs, None, out_splits, in_splits)
        self.tokens_per_expert_host = [sum(recv_h[j * L + i] for j in range(ep)) for i in range(L)]
        sizes = torch.tensor(recv_h)  # host tensors: megatron_sort_chunks' .tolist() does not sync the device
        restore = sizes.view(ep, L).T.contiguous().view(-1)
        regroup = ep > 1 and L > 1
        if regroup:
            order = torch.arange(ep * L).view(ep, L).T.contiguous().view(-1)
            rows, rows_probs = megatron_sort_chunks(rows, sizes, order, rows_probs)
        self._state = (x.shape, sidx, routing_map, in_splits, out_splits, regroup, restore)
        tpe = torch.tensor(self.tokens_per_expert_host, device=x.device)  # from host values: no sync
        return rows, rows_probs, tpe

    def combine(self, out):
        shape, sidx, routing_map, in_splits, out_splits, regroup, restore = self._state
        if regroup:
            order = torch.arange(self.ep * self.L).view(self.L, self.ep).T.contiguous().view(-1)
            out, _ = megatron_sort_chunks(out, restore, order)
        out = all_to_all(out, None, in_splits, out_splits)
        return seed.unpermute(out, sidx, (shape[0], out.shape[1]), None, routing_map, drop_and_pad=self.drop_and_pad)


def route(logits, k):
    topv, topi = logits.softmax(-1).topk(k, dim=-1)
    rm = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, topi, True)
    return rm, torch.zeros_like(logits).scatter(1, topi, topv)


def layer_step(provider, dispatcher, inputs):
    """One EP layer forward + backward on this rank; returns (y, dx, dlogits)."""
    x = inputs["x"].detach().requires_grad_(True)
    logits = inputs["logits"].detach().requires_grad_(True)
    rm, probs = route(logits, inputs["K"])
    rows, rows_probs, tpe = dispatcher.dispatch(x, probs, rm)
    L = tpe.shape[0]
    if dispatcher.drop_and_pad:
        counts = [rows.shape[0] // L] * L
    else:
        counts = dispatcher.tokens_per_expert_host
    offsets = tpe.cumsum(0, dtype=torch.int32)  # on the device (grouped_mm): no host sync
    h = grouped_matmul(rows, inputs["w_up"], counts, offsets)
    swiglu = moe_raw.weighted_bias_swiglu_impl if provider == "moe_raw" else reference.weighted_bias_swiglu_impl
    a = swiglu(h, rows_probs.unsqueeze(-1))
    y = dispatcher.combine(grouped_matmul(a, inputs["w_down"], counts, offsets))
    y.backward(inputs["gy"])
    return y.detach(), x.grad, logits.grad


def make_inputs(rank, T, E, H, K, F, L, dtype, device):
    """This rank's tokens, router logits, output grad and the weights of its L experts (seeded by the rank)."""
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    gy = torch.randn(T, H, generator=g).to(device, dtype)
    gw = torch.Generator(device=device).manual_seed(rank)
    w_up = torch.randn(L, H, 2 * F, device=device, dtype=dtype, generator=gw).mul_(H**-0.5)
    w_down = torch.randn(L, F, H, device=device, dtype=dtype, generator=gw).mul_(F**-0.5)
    return {"x": x, "logits": logits, "gy": gy, "K": K, "w_up": w_up, "w_down": w_down}


def run_shape(name, drop_and_pad, dtype, rounds, iters, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    T, E, H, K, F = EP_SHAPES[name]
    if E % world:
        raise SystemExit(f"{name}: E = {E} experts do not split over {world} ranks")
    L = E // world
    inputs = make_inputs(rank, T, E, H, K, F, L, dtype, device)
    ours = moe_raw.MoEAlltoAllDispatcher(
        E, L, drop_and_pad=drop_and_pad, capacity_factor=CAPACITY_FACTOR, router_topk=K, combine_with_probs=False
    )
    capacity = ours.get_capacity(T) if drop_and_pad else None
    dispatchers = {"moe_raw": ours, "seed": SeedAlltoAll(E, L, drop_and_pad, capacity)}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    results = {p: layer_step(p, d, inputs) for p, d in dispatchers.items()}  # warm-up and the comparison
    err = torch.tensor([max(rel_err(a, b) for a, b in zip(results["moe_raw"], results["seed"], strict=True))],
                       dtype=torch.float64, device=device)  # fmt: skip
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    del results

    def timed(provider):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            layer_step(provider, dispatchers[provider], inputs)
        sync()
        s = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(s, op=dist.ReduceOp.MAX)  # the layer is done when the slowest rank is
        return s.item() / iters * 1e3

    ms = {p: [] for p in dispatchers}
    for _ in range(rounds):  # interleaved, so that clock or thermal drift hits both providers alike
        for p in dispatchers:
            ms[p].append(timed(p))
    peak = {}
    for p in dispatchers:
        if cuda:
            sync()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            layer_step(p, dispatchers[p], inputs)
            sync()
            m = torch.tensor([(torch.cuda.max_memory_allocated(device) - base) / 1e9], device=device)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            peak[p] = m.item()
        else:
            peak[p] = float("nan")
    mode = f"drop_and_pad C={capacity}" if drop_and_pad else "dropless"
    tol = LAYER_RTOL[dtype]
    rows = []
    for p in dispatchers:
        med = statistics.median(ms[p])
        rows.append({"shape": f"{name} T={T}/rank E={E} H={H} K={K} F={F}", "mode": mode, "ep": world,
                     "provider": p, "ms": med, "ms_rounds": ms[p], "tokens_per_s": T * world / (med * 1e-3),
                     "peak_mem_GB": peak[p], "max_rel_err": err.item(), "tol": tol})  # fmt: skip
    rows[0]["speedup_vs_seed"] = rows[1]["ms"] / rows[0]["ms"]
    inputs.clear()  # free the weights before the next shape
    if cuda:
        torch.cuda.empty_cache()
    return rows, err.item() <= tol


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(EP_SHAPES), help="repeatable; default: all but tiny")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPE}")
    ap.add_argument("--drop-and-pad", action="store_true", help="also the fixed-capacity mode (capacity factor 1.25)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10, help="layer steps per timed round")
    ap.add_argument("--out", default=None, help="write the rows and the environment as JSON (rank 0)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    names = args.shape or ([QUICK_SHAPE] if args.quick else [n for n in EP_SHAPES if n != "tiny"])
    modes = [False, True] if args.drop_and_pad else [False]
    rank = dist.get_rank()
    all_rows, ok = [], True
    if rank == 0:
        print(f"EP over {dist.get_world_size()} ranks ({dist.get_backend()}, {device.type}), "
              f"{str(dtype).removeprefix('torch.')}, {args.rounds} rounds x {args.iters} steps\n"
              "| shape | mode | provider | ms fwd+bwd | tokens/s (all ranks) | peak GB | note |\n"
              "|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    for name in names:
        for dp in modes:
            rows, good = run_shape(name, dp, dtype, args.rounds, args.iters, device)
            ok &= good
            all_rows += rows
            if rank == 0:
                for r in rows:
                    note = ""
                    if "speedup_vs_seed" in r:
                        note = (f"{r['speedup_vs_seed']:.2f}x the seed; outputs/grads "
                                f"{'match' if good else 'DIFFER'} (max rel err {r['max_rel_err']:.1e}, "
                                f"tol {r['tol']:.0e})")  # fmt: skip
                    print(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']:.2f} | "
                          f"{r['tokens_per_s']:.4g} | {r['peak_mem_GB']:.2f} | {note} |", flush=True)  # fmt: skip
    if rank == 0 and args.out:
        from . import common

        record = {"environment": common.environment(), "world_size": dist.get_world_size(),
                  "backend": dist.get_backend(), "rows": all_rows, "ok": ok}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
