"""MoEAlltoAllDispatcher (issue #8) on the CPU: gloo process groups of 2 and 4 ranks spawned by the test, and the
ep_size 1 path in-process.

Every rank draws its own tokens and router logits from a per-rank seed; the experts' weights come from one seed, so
each rank can recompute the whole layer on one process (all ranks' tokens, all E experts, a dense formula that uses
none of moe_raw's ops) and compare its own outputs and gradients with it. Checked, dropless and drop_and_pad:

1. dispatch -> identity experts -> combine: the expert input rows (order, probs, tokens_per_expert) and
   combine(dispatch(x)) = sum over kept experts e of probs[t, e] * x[t]; the gradient of x.
2. a SwiGLU MoE layer (router softmax + top-k, per-expert weights, each rank holding its local experts): the output
   and the gradients of the tokens, the router logits and the local experts' weights, with the probs applied by
   combine (combine_with_probs=True) and by the experts (False, Megatron's current split).

fp64 throughout (gloo moves it; the comparisons are then tight). A failure in a child process fails the test
(torch.multiprocessing.spawn raises ProcessRaisedException).
"""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import moe_raw
from moe_raw.dispatcher import MoEAlltoAllDispatcher

H, FF, K, CF = 8, 6, 2, 1.0  # hidden, SwiGLU width, top-k, capacity factor (drops happen at T = 12, E <= 8)
DT = torch.float64


# ---------------------------------------------------------------------------------------------------- the data


def rank_data(rank: int, num_tokens: int, num_experts: int, device="cpu"):
    """Rank ``rank``'s tokens [T, H], router logits [T, E] and a cotangent [T, H] (its own seed, drawn on the CPU)."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, H, generator=g, dtype=DT)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=DT)
    cot = torch.randn(num_tokens, H, generator=g, dtype=DT)
    return x.to(device), logits.to(device), cot.to(device)


def expert_weights(num_experts: int, device="cpu"):
    """W1 [E, H, 2F], W2 [E, F, H], the same on every rank."""
    g = torch.Generator().manual_seed(7)
    return (
        (torch.randn(num_experts, H, 2 * FF, generator=g, dtype=DT) / H**0.5).to(device),
        (torch.randn(num_experts, FF, H, generator=g, dtype=DT) / FF**0.5).to(device),
    )


def route(logits: torch.Tensor):
    """Softmax top-K router: (routing_map [T, E] bool, probs [T, E] dense, differentiable in logits)."""
    top_p, top_i = logits.softmax(-1).topk(K, dim=-1)
    routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, top_i, True)
    probs = torch.zeros_like(logits).scatter(1, top_i, top_p)
    return routing_map, probs


def kept_pairs(routing_map: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """The routed pairs an expert keeps: all (dropless), or its first ``capacity`` tokens in token order."""
    if capacity is None:
        return routing_map
    return routing_map & (routing_map.long().cumsum(0) <= capacity)


def capacity_of(num_tokens: int, num_experts: int, drop_and_pad: bool):
    if not drop_and_pad:
        return None
    return min(math.ceil(num_tokens * K / num_experts * CF), num_tokens)  # Megatron's get_capacity, capped at T


def swiglu_expert(x, w1, w2):
    gate, up = (x @ w1).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


# ------------------------------------------------------------------------------------------------- the checks


def check_identity(rank, ws, num_experts, num_local, drop_and_pad, group, device="cpu"):
    num_tokens = 12 if drop_and_pad else 10 + rank  # dropless: a different T on every rank
    d = MoEAlltoAllDispatcher(num_experts, num_local, group, drop_and_pad, CF if drop_and_pad else None, K)
    x, logits, cot = rank_data(rank, num_tokens, num_experts, device)
    x.requires_grad_(True)
    routing_map, probs = route(logits)
    expert_in, expert_probs, tokens_per_expert = d.dispatch(x, probs, routing_map)
    y = d.combine(expert_in)
    (y * cot).sum().backward()

    cap = d.capacity
    if drop_and_pad:
        assert cap == capacity_of(num_tokens, num_experts, True)
    kept = kept_pairs(routing_map, cap)
    torch.testing.assert_close(y, (probs * kept).sum(1, keepdim=True) * x.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, (probs * kept).sum(1, keepdim=True) * cot, rtol=1e-12, atol=1e-12)

    # The rows this rank received: for each local expert, rank 0's kept tokens (ascending), then rank 1's, ...
    all_data = [rank_data(j, 12 if drop_and_pad else 10 + j, num_experts, device) for j in range(ws)]
    offset = 0
    counts = []
    for lo in range(num_local):
        e = rank * num_local + lo
        n_e = 0
        for j in range(ws):
            xj, lj, _ = all_data[j]
            rm_j, p_j = route(lj)
            k_j = kept_pairs(rm_j, cap)[:, e]
            want_x, want_p = xj[k_j], p_j[k_j, e]
            n_kept = want_x.shape[0]
            got_x = expert_in[offset : offset + n_kept]
            got_p = expert_probs[offset : offset + n_kept]
            assert torch.equal(got_x.detach(), want_x), (rank, lo, j)
            assert torch.equal(got_p.detach(), want_p), (rank, lo, j)
            rows = cap if drop_and_pad else n_kept
            if drop_and_pad:  # padding rows: prob 0
                assert torch.all(expert_probs[offset + n_kept : offset + rows] == 0)
            offset += rows
            n_e += rows
        counts.append(n_e)
    assert offset == expert_in.shape[0]
    assert tokens_per_expert.tolist() == counts
    if not drop_and_pad:
        assert d.tokens_per_expert_host == counts


def check_layer(rank, ws, num_experts, num_local, drop_and_pad, combine_with_probs, group, device="cpu"):
    num_tokens = 12 if drop_and_pad else 10 + rank
    d = MoEAlltoAllDispatcher(
        num_experts, num_local, group, drop_and_pad, CF if drop_and_pad else None, K, combine_with_probs
    )
    w1_all, w2_all = expert_weights(num_experts, device)
    local = slice(rank * num_local, (rank + 1) * num_local)
    w1 = w1_all[local].clone().requires_grad_(True)
    w2 = w2_all[local].clone().requires_grad_(True)
    x, logits, cot = rank_data(rank, num_tokens, num_experts, device)
    x.requires_grad_(True)
    logits.requires_grad_(True)

    routing_map, probs = route(logits)
    expert_in, expert_probs, tokens_per_expert = d.dispatch(x, probs, routing_map)
    sizes = tokens_per_expert.tolist()
    outs = []
    for lo, (chunk, p) in enumerate(zip(expert_in.split(sizes), expert_probs.split(sizes), strict=True)):
        o = swiglu_expert(chunk, w1[lo], w2[lo])
        outs.append(o if combine_with_probs else o * p.unsqueeze(1))
    y = d.combine(torch.cat(outs))
    (y * cot).sum().backward()

    # One process, every rank's tokens, all E experts, dense: y[t] = sum_e kept[t, e] probs[t, e] expert_e(x[t]).
    w1_ref = w1_all.clone().requires_grad_(True)
    w2_ref = w2_all.clone().requires_grad_(True)
    cap = capacity_of(num_tokens, num_experts, drop_and_pad)
    loss = 0.0
    mine = None
    for j in range(ws):
        xj, lj, cj = rank_data(j, 12 if drop_and_pad else 10 + j, num_experts, device)
        xj.requires_grad_(True)
        lj.requires_grad_(True)
        rm_j, p_j = route(lj)
        w = p_j * kept_pairs(rm_j, cap)
        yj = sum(w[:, e : e + 1] * swiglu_expert(xj, w1_ref[e], w2_ref[e]) for e in range(num_experts))
        loss = loss + (yj * cj).sum()
        if j == rank:
            mine = (yj, xj, lj)
    loss.backward()
    yj, xj, lj = mine
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, yj, **tol)
    torch.testing.assert_close(x.grad, xj.grad, **tol)
    torch.testing.assert_close(logits.grad, lj.grad, **tol)
    torch.testing.assert_close(w1.grad, w1_ref.grad[local], **tol)
    torch.testing.assert_close(w2.grad, w2_ref.grad[local], **tol)


def run_checks(rank, ws, configs, group, device="cpu"):
    for num_experts, num_local in configs:
        for drop_and_pad in (False, True):
            check_identity(rank, ws, num_experts, num_local, drop_and_pad, group, device)
            for combine_with_probs in (True, False):
                check_layer(rank, ws, num_experts, num_local, drop_and_pad, combine_with_probs, group, device)


def check_graph_capture(rank, num_experts, num_local, device):
    """drop_and_pad forward captured in a CUDA graph (fails if anything syncs the host), replayed on new data,
    equals the eager dispatcher."""
    num_tokens = 12
    d = MoEAlltoAllDispatcher(num_experts, num_local, None, True, CF, K)
    x, logits, _ = rank_data(rank, num_tokens, num_experts, device)
    routing_map, probs = route(logits)
    static = [x.clone(), probs.clone(), routing_map.clone()]

    def fwd():
        rows, rows_probs, _ = d.dispatch(*static)
        return d.combine(rows * 2 + rows_probs.unsqueeze(1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd()  # warm-up: NCCL communicators, kernel compiles, index caches
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = fwd()
    x2, logits2, _ = rank_data(rank + 100, num_tokens, num_experts, device)
    rm2, p2 = route(logits2)
    for buf, new in zip(static, (x2, p2, rm2), strict=True):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = MoEAlltoAllDispatcher(num_experts, num_local, None, True, CF, K)
    rows, rows_probs, _ = eager.dispatch(x2, p2, rm2)
    torch.testing.assert_close(y_static, eager.combine(rows * 2 + rows_probs.unsqueeze(1)), rtol=0, atol=0)


def _worker(rank, ws, port, configs, backend="gloo"):
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        run_checks(rank, ws, configs, None, device)  # ep_group None: the default group
        if backend == "nccl":
            for num_experts, num_local in configs:
                check_graph_capture(rank, num_experts, num_local, device)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    "ws,configs",
    [
        (2, [(8, 4), (2, 1)]),  # (E, L): 4 local experts (sort_chunks), 1 local expert (no regrouping)
        (4, [(8, 2), (4, 1)]),
    ],
    ids=["ep2", "ep4"],
)
def test_gloo_dispatch_combine_and_layer(ws, configs):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo needed")
    mp.spawn(_worker, args=(ws, _free_port(), configs), nprocs=ws, join=True)


def test_ep_size_1_in_process():
    """No process group: no collectives; the same checks with every expert local."""
    assert not dist.is_initialized()
    run_checks(0, 1, [(4, 4), (2, 2)], None)


# GPU (skipped without CUDA, the NCCL one without 2 GPUs; passed on 2 H100s: bench/results/2026-11-27-h100x2-ep).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device needed")
def test_ep_size_1_on_cuda():
    run_checks(0, 1, [(4, 4), (2, 2)], None, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="2 CUDA devices needed")
def test_nccl_dispatch_combine_layer_and_graph_capture():
    ws = 4 if torch.cuda.device_count() >= 4 else 2
    configs = [(8, 8 // ws), (ws, 1)]
    mp.spawn(_worker, args=(ws, _free_port(), configs, "nccl"), nprocs=ws, join=True)


def test_no_process_group_is_ep_size_1():
    d = MoEAlltoAllDispatcher(3, 3)
    assert d.ep_size == 1 and d.local_expert_indices == [0, 1, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_local_experts"):
        MoEAlltoAllDispatcher(8, 4)  # ep_size 1 holds all 8
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEAlltoAllDispatcher(4, 4, drop_and_pad=True, router_topk=2)
    with pytest.raises(ValueError, match="router_topk"):
        MoEAlltoAllDispatcher(4, 4, drop_and_pad=True, capacity_factor=1.0)
    d = MoEAlltoAllDispatcher(4, 4)
    with pytest.raises(RuntimeError, match="dispatch first"):
        d.combine(torch.zeros(3, H))
    x = torch.randn(5, H)
    with pytest.raises(ValueError, match="routing_map"):
        d.dispatch(x, torch.rand(5, 3), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="probs"):
        d.dispatch(x, torch.rand(4, 4), torch.ones(5, 4, dtype=torch.bool))


def test_leading_dims_are_restored_and_capacity_formula():
    d = MoEAlltoAllDispatcher(4, 4, drop_and_pad=True, capacity_factor=1.5, router_topk=2)
    assert d.get_capacity(10) == 8  # ceil(10 * 2 / 4 * 1.5) = ceil(7.5)
    assert d.get_capacity(2) == 2  # capped at T
    x = torch.randn(3, 4, H)
    routing_map, probs = route(torch.randn(12, 4, dtype=torch.float32))
    rows, rows_probs, tpe = d.dispatch(x, probs, routing_map)
    assert rows.shape == (4 * d.get_capacity(12), H) and tpe.tolist() == [d.get_capacity(12)] * 4
    assert d.combine(rows).shape == (3, 4, H)
    assert moe_raw.MoEAlltoAllDispatcher is MoEAlltoAllDispatcher


def test_example_runs_with_torchrun():
    """examples/ep_moe_layer.py under torchrun, 2 gloo ranks, tiny sizes: it runs and matches one process."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra in ([], ["--drop-and-pad"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(root, "examples", "ep_moe_layer.py"), "--tokens", "64", "--hidden", "32", "--ffn", "16",
               "--iters", "1", *extra]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=root)
        assert res.returncode == 0, res.stdout + res.stderr
        errs = re.search(r"max \|y - y_single\|: (\S+)\s+max \|dx - dx_single\|: (\S+)", res.stdout)
        assert errs, res.stdout
        assert float(errs.group(1)) <= 1e-5 and float(errs.group(2)) <= 1e-5, res.stdout


def test_ep_benchmark_runs_with_torchrun():
    """bench/bench_ep.py (moe_raw's EP layer vs the seed-built one) under torchrun, 2 ranks, the tiny shape: both
    modes run, print a row per provider and agree (the script exits 1 when the providers' results differ)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "bench.bench_ep", "--shape", "tiny", "--drop-and-pad", "--rounds", "1", "--iters", "1"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| tiny")]
    assert [r.split(" | ")[1:3] for r in rows] == [
        ["dropless", "moe_raw"],
        ["dropless", "seed"],
        ["drop_and_pad C=20", "moe_raw"],
        ["drop_and_pad C=20", "seed"],
    ], res.stdout
    assert all("outputs/grads match" in r for r in rows[::2]), res.stdout
