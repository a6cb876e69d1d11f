"""Top-k index routing (issue #7): permute_topk / unpermute_topk give the mask form's rows and results bit for bit,
differentiate in topk_probs, reject duplicates and out-of-range ids where a host read happens (or MOE_RAW_DEBUG=1),
and stay in bounds otherwise. CPU tests run in CI; GPU tests skip without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, needs_cuda

import moe_raw
from moe_raw import _validate


def topk_case(T, E, K, drop_frac=0.0, dtype=torch.float32, device="cpu", seed=0):
    """Distinct top-k ids per row (some set to -1 when drop_frac > 0), their probs, and the equivalent dense map."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    idx = scores.topk(K, dim=1).indices
    probs = torch.rand(T, K, generator=g)
    if drop_frac:
        dropped = torch.rand(T, K, generator=g) < drop_frac
        idx = idx.masked_fill(dropped, -1)
    rm = torch.zeros(T, E, dtype=torch.bool)
    dense = torch.zeros(T, E)
    for t in range(T):
        for k in range(K):
            if idx[t, k] >= 0:
                rm[t, idx[t, k]] = True
                dense[t, idx[t, k]] = probs[t, k]
    x = torch.randn(T, 24, generator=g).to(dtype)
    return x.to(device), idx.to(device), probs.to(device), rm.to(device), dense.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_to_routing_is_the_dense_map(device):
    _, idx, probs, rm, dense = topk_case(50, 12, 3, drop_frac=0.2, device=device)
    for idx_dtype in (torch.int32, torch.int64):
        got_rm, got_probs = moe_raw.topk_to_routing(idx.to(idx_dtype), 12, probs)
        assert got_rm.dtype == torch.bool and torch.equal(got_rm, rm) and torch.equal(got_probs, dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_out", [None, "routed", "below", "above"])
def test_permute_topk_equals_mask_form(device, fused, num_out):
    x, idx, probs, rm, dense = topk_case(64, 8, 2, drop_frac=0.1, device=device)
    routed = int(rm.sum())
    n = {None: None, "routed": routed, "below": routed - 7, "above": routed + 5}[num_out]
    got = moe_raw.permute_topk(x, idx, 8, probs, num_out_tokens=n, fused=fused)
    exp = moe_raw.permute(x, rm, dense, num_out_tokens=n, fused=fused)
    for a, b in zip(got, exp, strict=True):
        assert torch.equal(a, b)
    y = moe_raw.unpermute_topk(got[0], got[2], x.shape, probs, idx, 8, fused=fused)
    y_exp = moe_raw.unpermute(exp[0], exp[2], x.shape, dense, None if fused else rm, fused=fused)
    assert torch.equal(y, y_exp)


@pytest.mark.parametrize("device", DEVICES)
def test_drop_and_pad_equals_mask_form(device):
    x, idx, probs, rm, dense = topk_case(40, 4, 2, device=device)
    got = moe_raw.permute_topk(x, idx, 4, probs, num_out_tokens=48, drop_and_pad=True)
    exp = moe_raw.permute(x, rm, dense, num_out_tokens=48, drop_and_pad=True)
    assert all(torch.equal(a, b) for a, b in zip(got, exp, strict=True))
    y = moe_raw.unpermute_topk(got[0], got[2], x.shape, probs, idx, 4, drop_and_pad=True)
    assert torch.equal(y, moe_raw.unpermute(exp[0], exp[2], x.shape, dense, rm, drop_and_pad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_topk_probs(device):
    x, idx, probs, rm, dense = topk_case(30, 6, 2, drop_frac=0.2, dtype=torch.float64, device=device)
    xa, pa = x.clone().requires_grad_(True), probs.double().clone().requires_grad_(True)
    out, pp, row_map = moe_raw.permute_topk(xa, idx, 6, pa, fused=True)
    y = moe_raw.unpermute_topk(out, row_map, x.shape, pa, idx, fused=True)
    g, gp = torch.randn_like(y), torch.randn_like(pp)
    ((y * g).sum() + (pp * gp).sum()).backward()
    xb, db = x.clone().requires_grad_(True), dense.double().clone().requires_grad_(True)
    out_b, pp_b, row_map_b = moe_raw.permute(xb, rm, db, fused=True)
    y_b = moe_raw.unpermute(out_b, row_map_b, x.shape, db, fused=True)
    ((y_b * g).sum() + (pp_b * gp).sum()).backward()
    assert torch.equal(xa.grad, xb.grad)
    valid = idx >= 0
    expected = torch.where(valid, db.grad.gather(1, idx.clamp_min(0).long()), torch.zeros_like(pa))
    assert torch.equal(pa.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_and_out_of_range_raise_when_counted(device):
    x, idx, probs, _, _ = topk_case(10, 6, 2, device=device)
    dup = idx.clone()
    dup[3, 1] = dup[3, 0]
    with pytest.raises(ValueError, match="same expert twice"):
        moe_raw.permute_topk(x, dup, 6, probs)
    far = idx.clone()
    far[2, 0] = 6
    with pytest.raises(ValueError, match=r"outside \[-1, num_experts\)"):
        moe_raw.permute_topk(x, far, 6, probs)
    neg = idx.clone()
    neg[0, 0] = -3
    with pytest.raises(ValueError, match="outside"):
        moe_raw.permute_topk(x, neg, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_bad_ids_stay_in_bounds_and_debug_checks_them(device, monkeypatch):
    x, idx, probs, _, _ = topk_case(10, 6, 2, device=device)
    bad = idx.clone()
    bad[2, 0], bad[4, 1] = 99, -7
    monkeypatch.setattr(_validate, "DEBUG", False)
    out, pp, rm_rows = moe_raw.permute_topk(x, bad, 6, probs, num_out_tokens=20, fused=True)
    assert out.shape == (20, 24)  # the two bad ids are ignored like -1: 18 routed rows, 2 zero rows
    assert torch.equal(out[18:], torch.zeros_like(out[18:]))
    monkeypatch.setattr(_validate, "DEBUG", True)
    with pytest.raises(ValueError, match="outside"):
        moe_raw.permute_topk(x, bad, 6, probs, num_out_tokens=20)
    with pytest.raises(ValueError, match="outside"):
        moe_raw.topk_to_routing(bad, 6, probs)


def test_argument_errors():
    x, idx, probs, _, _ = topk_case(10, 6, 2)
    with pytest.raises(TypeError, match="topk_indices must have dtype"):
        moe_raw.permute_topk(x, idx.float(), 6)
    with pytest.raises(ValueError, match="topk_probs must have topk_indices' shape"):
        moe_raw.permute_topk(x, idx, 6, probs[:, :1])
    with pytest.raises(ValueError, match="topk_indices has 9 rows but tokens has 10"):
        moe_raw.permute_topk(x, idx[:9], 6)
    with pytest.raises(ValueError, match="num_experts must be in"):
        moe_raw.permute_topk(x, idx, 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        moe_raw.permute_topk(x, idx, None)
    out, _, sidx = moe_raw.permute_topk(x, idx, 6)
    with pytest.raises(ValueError, match="topk_probs needs topk_indices"):
        moe_raw.unpermute_topk(out, sidx, x.shape, probs)
    with pytest.raises(ValueError, match="num_experts is needed"):
        moe_raw.unpermute_topk(out, sidx, x.shape, probs, idx)


@needs_cuda
@pytest.mark.gpu
def test_gpu_no_host_sync_with_num_out_tokens_and_graph_replay():
    x, idx, probs, rm, dense = topk_case(256, 16, 4, device="cuda")
    n = 256 * 4
    moe_raw.permute_topk(x, idx, 16, probs, num_out_tokens=n, fused=True)  # compile outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, pp, row_map = moe_raw.permute_topk(x, idx, 16, probs, num_out_tokens=n, fused=True)
        y = moe_raw.unpermute_topk(out, row_map, x.shape, probs, idx, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, _, g_map = moe_raw.permute_topk(x, idx, 16, probs, num_out_tokens=n, fused=True)
        g_y = moe_raw.unpermute_topk(g_out, g_map, x.shape, probs, idx, fused=True)
    graph.replay()
    assert torch.equal(g_out, out) and torch.equal(g_y, y)
    _, idx2, probs2, _, _ = topk_case(256, 16, 4, device="cuda", seed=3)
    idx.copy_(idx2), probs.copy_(probs2)  # new routing in the same tensors: the replay follows it
    graph.replay()
    exp = moe_raw.permute_topk(x, idx2, 16, probs2, num_out_tokens=n, fused=True)[0]
    assert torch.equal(g_out, exp)


def bad_ids_case(T, E, K, prob_dtype, seed=0):
    """Random ids in [-2, E + 1] (duplicates, -1, out-of-range values included) and probs: any input the routing
    must turn into one deterministic map."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-2, E + 2, (T, K), generator=g)
    return idx, torch.rand(T, K, generator=g).to(prob_dtype)


def test_repeated_expert_takes_its_first_probability_and_gradient():
    """Unchecked, a repeated expert routes once, with the first k's probability; only that k gets a gradient."""
    idx = torch.tensor([[2, 0, 2], [1, -1, 1]])
    probs = torch.tensor([[0.5, 0.25, 0.125], [0.75, 0.5, 0.0625]], requires_grad=True)
    rm, dense = moe_raw.topk_to_routing(idx, 3, probs)
    assert rm.tolist() == [[True, False, True], [False, True, False]]
    assert dense.tolist() == [[0.25, 0.0, 0.5], [0.0, 0.75, 0.0]]
    dense.backward(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert probs.grad.tolist() == [[3.0, 1.0, 0.0], [5.0, 0.0, 0.0]]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("prob_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,E,K", [(0, 8, 2), (1, 1, 1), (13, 5, 3), (257, 300, 8), (40, 70, 40), (9, 16, 0)])
def test_gpu_kernel_equals_torch_path(prob_dtype, idx_dtype, T, E, K):
    """kernels/topk.cu against the torch ops the CPU runs, bit for bit, on inputs with duplicates, -1 and
    out-of-range ids (K = 40 > 32 exercises the lane stride), map and probs and the probs' gradient."""
    idx, probs = bad_ids_case(T, E, K, prob_dtype)
    rm_cpu, dense_cpu = moe_raw.topk_to_routing(idx.to(idx_dtype), E, probs)
    p = probs.cuda().requires_grad_(True)
    rm, dense = moe_raw.topk_to_routing(idx.to(idx_dtype).cuda(), E, p)
    assert rm.shape == (T, E) and rm.dtype == torch.bool and torch.equal(rm.cpu(), rm_cpu)
    assert dense.dtype == prob_dtype and torch.equal(dense.cpu(), dense_cpu)
    g = torch.randn(T, E).to(prob_dtype)
    p_cpu = probs.clone().requires_grad_(True)
    moe_raw.topk_to_routing(idx.to(idx_dtype), E, p_cpu)[1].backward(g)
    dense.backward(g.cuda())
    assert torch.equal(p.grad.cpu(), p_cpu.grad)
    rm_only, none = moe_raw.topk_to_routing(idx.to(idx_dtype).cuda(), E)
    assert none is None and torch.equal(rm_only.cpu(), rm_cpu)


@needs_cuda
@pytest.mark.gpu
def test_gpu_non_contiguous_inputs_and_side_stream():
    idx, probs = bad_ids_case(33, 20, 4, torch.float32, seed=5)
    idx_t, probs_t = idx.T.contiguous().cuda().T, probs.T.contiguous().cuda().T  # column-major [T, K]
    assert not idx_t.is_contiguous()
    rm_cpu, dense_cpu = moe_raw.topk_to_routing(idx, 20, probs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rm, dense = moe_raw.topk_to_routing(idx_t, 20, probs_t)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(rm.cpu(), rm_cpu) and torch.equal(dense.cpu(), dense_cpu)
