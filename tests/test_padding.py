"""permute_and_pad (issue #7): per-expert rows padded to align_size with zero rows, on the device; unpermute takes
it back. The reference is checked by hand and against permute on the CPU (CI); the kernels against the reference
on the GPU (bit-exact for the rows, fp64-close for the combine), with backward, no host sync and graph replay."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, make_probs, make_routing, needs_cuda

import moe_raw
from moe_raw import reference


def test_reference_by_hand():
    # experts: 0 gets tokens 0, 2; 1 gets token 1; 2 gets nothing. align 4 -> rows [0, 1 | pad 2, 3 | 4 | pad 5-7]
    rm = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    probs = torch.tensor([[0.5, 0, 0], [0, 0.25, 0], [0.75, 0, 0]])
    out, pp, row_map, tpe, padded = reference.permute_and_pad(x, rm, probs, 4)
    assert out.squeeze(1).tolist() == [1.0, 3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    assert pp.tolist() == [0.5, 0.75, 0, 0, 0.25, 0, 0, 0]
    assert tpe.tolist() == [2, 1, 0] and padded.tolist() == [4, 4, 0]
    assert row_map[:3].tolist() == [[0, -1, -1], [-1, 4, -1], [1, -1, -1]]
    assert row_map[3].tolist() == [8, 0, 0]
    assert row_map[4].tolist() == [2, 5, 8] and row_map[5].tolist() == [4, 8, 8]


@pytest.mark.parametrize("align", [1, 8, 16])
def test_reference_unpadded_rows_are_permutes(align):
    rm = make_routing(50, 6, 2, kind="sparse")
    x = torch.randn(50, 10, dtype=torch.float64)
    probs = make_probs(rm, torch.float64)
    out, pp, row_map, tpe, padded = reference.permute_and_pad(x, rm, probs, align)
    exp, pexp, _ = reference.permute(x, rm, probs)
    keep = torch.zeros(out.shape[0], dtype=torch.bool)
    start = 0
    for e in range(6):
        keep[start : start + int(tpe[e])] = True
        assert int(padded[e]) % align == 0 and 0 <= int(padded[e]) - int(tpe[e]) < align
        start += int(padded[e])
    assert torch.equal(out[keep], exp) and torch.equal(pp[keep], pexp)
    assert not out[~keep].any() and not pp[~keep].any()
    y = moe_raw.unpermute(out, row_map, (50, 10), probs, fused=True)
    y_exp = reference.unpermute(exp, reference.build_row_map(rm)[0], (50, 10), probs, fused=True)
    assert torch.allclose(y, y_exp)


def _case(T, E, K, H, dtype, device, kind="topk"):
    rm = make_routing(T, E, K, device, kind=kind)
    probs = make_probs(rm, torch.float32)
    x = torch.randn(T, H).to(dtype).to(device)
    return x, rm, probs


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("align", [1, 16, 128, 300])  # 300: up to 299 padding rows an expert
@pytest.mark.parametrize("T,E,K,H,kind", [(300, 8, 2, 64, "topk"), (1000, 64, 6, 136, "empty_expert"),
                                          (257, 16, 3, 13, "sparse"), (5, 4, 1, 8, "balanced")])  # fmt: skip
@pytest.mark.parametrize("n_out", [None, "routed", "below"])
def test_gpu_matches_reference(dtype, align, T, E, K, H, kind, n_out):
    x, rm, probs = _case(T, E, K, H, dtype, "cuda", kind)
    routed = int(rm.sum())
    n = {None: None, "routed": routed, "below": max(routed - 11, 0)}[n_out]
    got = moe_raw.permute_and_pad(x, rm, probs, align, n)
    exp = reference.permute_and_pad(x.cpu(), rm.cpu(), probs.cpu(), align, n)
    for name, a, b in zip(("permuted", "probs", "row_map", "tokens_per_expert", "padded"), got, exp, strict=True):
        assert a.shape == b.shape and torch.equal(a.cpu(), b), name
    y = moe_raw.unpermute(got[0], got[2], (T, H), probs, fused=True)
    y_ref = reference.unpermute(exp[0].double(), exp[2][: T + 1], (T, H), probs.cpu().double(), fused=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(y.cpu().double(), y_ref, rtol=tol, atol=tol)
    # the other two kernels that zero the padding rows: permute_with_row_map and unpermute's backward
    n_rows = got[0].shape[0]
    moved = moe_raw.permute_with_row_map(x, got[2], n_rows)
    assert torch.equal(moved.cpu(), reference.permute_with_row_map(x.cpu(), exp[2], n_rows))
    rows = got[0].detach().clone().requires_grad_(True)
    g = torch.randn(T, H, device="cuda").to(dtype)
    moe_raw.unpermute(rows, got[2], (T, H), fused=True).backward(g)
    codes = exp[2][:T]  # row r >= 0 of token t gets g[t]; padding and spare rows get zero
    want = torch.zeros(n_rows, H, dtype=dtype)
    want[codes[codes >= 0].long()] = g.cpu()[(codes >= 0).nonzero()[:, 0]]
    assert torch.equal(rows.grad.cpu(), want), "d_rows (padding rows zero)"


@needs_cuda
@pytest.mark.gpu
def test_gpu_backward_and_padding_rows_get_zero_gradient():
    x, rm, probs = _case(200, 8, 2, 32, torch.float64, "cuda")
    xa, pa = x.clone().requires_grad_(True), probs.double().clone().requires_grad_(True)
    out, pp, row_map, tpe, padded = moe_raw.permute_and_pad(xa, rm, pa, 16, num_out_tokens=400)
    rows = out.detach().clone().requires_grad_(True)  # stand-in for the experts' output
    y = moe_raw.unpermute(rows, row_map, (200, 32), pa, fused=True)
    g = torch.randn_like(y)
    gp = torch.randn_like(pp)
    ((y * g).sum() + (pp * gp).sum() + (out * 0).sum()).backward()
    padding = torch.ones(out.shape[0], dtype=torch.bool, device="cuda")
    start = 0
    for e in range(8):
        padding[start : start + int(tpe[e])] = False
        start += int(padded[e])
    assert not rows.grad[padding].any(), "padding rows must get a zero gradient"
    xb, pb = x.cpu().clone().requires_grad_(True), probs.cpu().double().clone().requires_grad_(True)
    out_b, pp_b, map_b, _, _ = reference.permute_and_pad(xb, rm.cpu(), pb, 16, 400)
    rows_b = out_b.detach().clone().requires_grad_(True)
    y_b = reference.unpermute(rows_b, map_b[:201], (200, 32), pb, fused=True)
    ((y_b * g.cpu()).sum() + (pp_b * gp.cpu()).sum() + (out_b * 0).sum()).backward()
    assert torch.allclose(rows.grad.cpu(), rows_b.grad) and torch.allclose(pa.grad.cpu(), pb.grad)
    # gradient of permute_and_pad itself (tokens through the padded rows, probs through permuted_probs)
    xa.grad = pa.grad = None
    out, pp, *_ = moe_raw.permute_and_pad(xa, rm, pa, 16, num_out_tokens=400)
    go = torch.randn_like(out)
    ((out * go).sum() + (pp * gp).sum()).backward()
    xb.grad = pb.grad = None
    out_b, pp_b, *_ = reference.permute_and_pad(xb, rm.cpu(), pb, 16, 400)
    ((out_b * go.cpu()).sum() + (pp_b * gp.cpu()).sum()).backward()
    assert torch.allclose(xa.grad.cpu(), xb.grad) and torch.allclose(pa.grad.cpu(), pb.grad)


@needs_cuda
@pytest.mark.gpu
def test_gpu_no_host_sync_and_graph_replay():
    x, rm, probs = _case(512, 32, 4, 256, torch.bfloat16, "cuda")
    n = 512 * 4
    moe_raw.permute_and_pad(x, rm, probs, 32, n)  # compile outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, pp, row_map, tpe, padded = moe_raw.permute_and_pad(x, rm, probs, 32, n)
        moe_raw.unpermute(out, row_map, (512, 256), probs, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_pp, g_map, g_tpe, g_padded = moe_raw.permute_and_pad(x, rm, probs, 32, n)
    rm.copy_(make_routing(512, 32, 4, "cuda", kind="sparse"))  # new routing: the replay follows the device map
    graph.replay()
    exp = reference.permute_and_pad(x.cpu(), rm.cpu(), probs.cpu(), 32, n)
    assert torch.equal(g_out.cpu(), exp[0]) and torch.equal(g_map.cpu(), exp[2]) and torch.equal(g_tpe.cpu(), exp[3])


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    x, rm, probs = _case(10, 4, 2, 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"align_size must be in \[1, 1024\]"):
        moe_raw.permute_and_pad(x, rm, probs, 0)
    with pytest.raises(TypeError, match="align_size must be an int"):
        moe_raw.permute_and_pad(x, rm, probs, 16.0)
    with pytest.raises(ValueError, match="routing_map has 9 rows"):
        moe_raw.permute_and_pad(x, rm[:9], probs, 16)
    with pytest.raises(ValueError, match="num_out_tokens must be >= 0"):
        moe_raw.permute_and_pad(x, rm, probs, 16, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    x, rm, probs = _case(0, 4, 2, 8, torch.float32, device)
    out, pp, row_map, tpe, padded = moe_raw.permute_and_pad(x, rm, probs, 16, 0)
    assert out.shape == (4 * 15, 8) and not out.any() and row_map.shape == (3, 4) and not tpe.any()
    y = moe_raw.unpermute(out, row_map, (0, 8), probs, fused=True)
    assert y.shape == (0, 8)
