"""FP8 gradient rows for the dgrad grouped GEMM (issue 19's backward direction): ``moe_raw.unpermute_grad_quantized``
against what a user would otherwise write, ``reference_fp8.quantize`` of the row gradient ``unpermute``'s autograd
gives, bit for bit; and against the exact fp64 gradient within the FP8 step. CPU (CI) and CUDA (marked ``gpu``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_exact, make_probs, make_routing

import moe_raw
from moe_raw import reference_fp8 as RF

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
H = 160  # a partial 1x128 block, five MX blocks


def _forward(device, dtype, align, rule, with_probs, num_tokens=37, seed=0):
    """(routing_map, probs | None, row_map, N) of a forward permute (permute_and_pad with align), and dy [T, H]."""
    gen = torch.Generator().manual_seed(seed)
    rm = make_routing(num_tokens, 6, 2, device, kind="empty_expert")
    p = make_probs(rm, torch.float32, off_route=float("nan")) if with_probs else None
    routed = int(rm.sum())
    n = {"none": None, "more": routed + 5, "fewer": max(routed - 5, 0)}[rule]
    x = torch.zeros(num_tokens, 0, dtype=dtype, device=device)  # zero-width: only the row map is wanted
    if align is None:
        rows, _, row_map = moe_raw.permute(x, rm, p, n, fused=True)
    else:
        rows, _, row_map, _, _ = moe_raw.permute_and_pad(x, rm, p, align, n)
    scale = 2.0 ** torch.randint(-6, 7, (num_tokens, 1), generator=gen).float()
    dy = (torch.randn(num_tokens, H, generator=gen) * scale).to(dtype).to(device)
    return rm, p, row_map, rows.shape[0], dy


def _autograd_rows(dy, row_map, n, p):
    """The row gradient unpermute's autograd gives: what a user quantizes without this op."""
    rows = torch.zeros(n, dy.shape[1], dtype=dy.dtype, device=dy.device, requires_grad=True)
    out = moe_raw.unpermute(rows, row_map, tuple(dy.shape), p, fused=True)
    return torch.autograd.grad(out, rows, dy)[0]


@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "no-probs"])
@pytest.mark.parametrize("align, rule", [(None, "none"), (None, "more"), (None, "fewer"), (16, "none"), (8, "more")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_equals_quantized_autograd_gradient(device, recipe, dtype, align, rule, with_probs):
    _, p, row_map, n, dy = _forward(device, dtype, align, rule, with_probs)
    for fp8 in (E4M3, E5M2):
        q, scales = moe_raw.unpermute_grad_quantized(dy, row_map, n, p, recipe, fp8)
        q_ref, s_ref = RF.quantize(_autograd_rows(dy, row_map, n, p), recipe, fp8)
        assert q.dtype == fp8 and q.shape == (n, H) and q.device == dy.device
        assert_exact(q.view(torch.uint8), q_ref.view(torch.uint8), f"codes {fp8}")
        assert_exact(scales, s_ref, f"scales {fp8}")


@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dequantized_rows_are_the_weighted_gradient_within_the_fp8_step(device, recipe):
    """Row r of token t and expert e dequantizes to dy[t] * probs[t, e] (fp64) within half an E4M3 step (2^-4
    relative; mxfp8 2^-3: its power-of-two scale saturates a block's largest elements by up to 448 / 512) plus the
    bf16 rounding of the product (2^-9) and the subnormal floor (2^-17 of the group's amax); rows of no token are
    zero with scale 1 (byte 127)."""
    rm, p, row_map, n, dy = _forward(device, torch.bfloat16, 16, "more", True)
    q, scales = moe_raw.unpermute_grad_quantized(dy, row_map, n, p, recipe, E4M3)
    got = moe_raw.dequantize(q, scales, recipe).double().cpu()
    exact = torch.zeros(n, H, dtype=torch.float64)
    codes = row_map[: dy.shape[0]].cpu()
    for t, e in (rm.cpu() & (codes >= 0)).nonzero().tolist():
        exact[codes[t, e]] = dy[t].double().cpu() * float(p[t, e])
    group = {"rowwise": H, "blockwise": 128, "mxfp8": 32}[recipe]
    amax = torch.nn.functional.pad(exact.abs(), (0, -H % group)).view(n, -1, group).amax(-1)
    floor = (amax * 2.0**-17).repeat_interleave(group, 1)[:, :H]
    rel = (2.0**-3 if recipe == "mxfp8" else 2.0**-4) + 2.0**-8
    assert bool(((got - exact).abs() <= rel * exact.abs() + floor + 1e-30).all())
    owned = torch.zeros(n, dtype=torch.bool)
    owned[codes[codes >= 0]] = True
    assert int((~owned).sum()) > 0, "the case should have spare or padding rows"
    assert not got[~owned].any()
    one = 127 if recipe == "mxfp8" else 1.0
    assert bool((scales.cpu()[~owned] == one).all())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_strided(device):
    _, p, row_map, n, dy = _forward(device, torch.bfloat16, None, "none", True, num_tokens=0)
    q, scales = moe_raw.unpermute_grad_quantized(dy, row_map, n, p, "blockwise")
    assert q.shape == (0, H) and scales.shape == (0, 2)
    _, p, row_map, n, dy = _forward(device, torch.bfloat16, None, "more", True)
    wide = torch.cat([dy, dy[:, :5]], 1)[:, :H]  # rows with stride H + 5
    assert not wide.is_contiguous()
    got = moe_raw.unpermute_grad_quantized(wide, row_map, n, p)
    expected = moe_raw.unpermute_grad_quantized(dy, row_map, n, p)
    assert_exact(got[0].view(torch.uint8), expected[0].view(torch.uint8), "strided codes")
    assert_exact(got[1], expected[1], "strided scales")


def _bad_calls():
    _, p, row_map, n, dy = _forward("cpu", torch.bfloat16, None, "none", True, num_tokens=4)
    ok = dict(grad_output=dy, row_map=row_map, num_rows=n, probs=p)
    return [
        (dict(ok, row_map=row_map.long()), TypeError, "row_map must be permute\\(fused=True\\)'s row map"),
        (dict(ok, row_map=row_map[1:]), ValueError, "T = grad_output.shape\\[0\\] = 4"),
        (dict(ok, row_map=row_map[:, :0]), ValueError, "1 to 4096 expert columns"),
        (dict(ok, num_rows=None), TypeError, "num_rows must be an int"),
        (dict(ok, num_rows=-1), ValueError, "num_rows must be >= 0"),
        (dict(ok, probs=p[:, :2]), ValueError, "probs must be"),
        (dict(ok, grad_output=dy.double()), TypeError, "grad_output must have dtype in"),
        (dict(ok, grad_output=dy[0]), ValueError, "grad_output must be 2-D"),
        (dict(ok, recipe="tensorwise"), ValueError, "recipe must be one of"),
        (dict(ok, fp8_dtype=torch.float16), TypeError, "fp8_dtype must be"),
        (dict(ok, grad_output=dy[:, :48], recipe="mxfp8"), ValueError, "multiple of 32"),
        (dict(ok, scale_layout="swizzled"), ValueError, "scale_layout 'swizzled' is for recipe 'mxfp8'"),
        (dict(ok, row_map=row_map.to("meta")), ValueError, "row_map is on meta"),
    ]


@pytest.mark.parametrize("kwargs, exc, match", _bad_calls())
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        moe_raw.unpermute_grad_quantized(**kwargs)
    assert "moe_raw.unpermute_grad_quantized" in str(info.value)
