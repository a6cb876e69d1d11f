"""Quick-GEGLU and gpt-oss's clamped SwiGLU: the SwiGLU kernels with another activation (moe_raw.activations ``act``).

Semantics: Megatron-LM megatron/core/fusions/fused_bias_geglu.py (quick_geglu, weighted_quick_geglu, their _back,
WeightedQuickGeGLUFunction, weighted_bias_quick_geglu_impl with clamp_value; NeMo Automodel's moe_utils has the same
functions) and gpt-oss's clamped SwiGLU (alpha, limit) on ``[gate | linear]`` halves.

CPU (CI):
* the torch reference against autograd of the forward formula in fp64, Megatron's torch-op clamp and gpt-oss's
  interleaved formula;
* the kernels under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) against the fp64 reference, with the rule of
  tests/test_swiglu.py: error <= 2x torch's own error in the same dtype + half an ulp;
* PTX of every new kind of kernel compiled by real NVVM (a subprocess without the simulator; no GPU needed);
* validation, names and signatures.

GPU (``python -m pytest -q -m gpu tests/test_activations.py``; skipped without CUDA): every op forward and backward
vs fp64, 16-byte and element kernels, strided rows, fp32 / bf16 weights, an active clamp, deterministic dweights,
a side stream, CUDA-graph replay, the autograd wrappers, the fast launch against Numba's own.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs_cuda, numba_launch, run_on_side_stream

import moe_raw
from moe_raw import reference as R

S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24

# Each family's four functions, their keyword constants for one case, and that case's act (alpha, offset, limit).
FAMILIES = {
    "quick": (("quick_geglu", "weighted_quick_geglu", "quick_geglu_back", "weighted_quick_geglu_back"),
              {"linear_offset": 0.5}, (1.702, 0.5, None)),
    "clamped": (("clamped_swiglu", "weighted_clamped_swiglu", "clamped_swiglu_back", "weighted_clamped_swiglu_back"),
                {"alpha": 1.702, "limit": 7.0}, (1.702, 1.0, 7.0)),
}  # fmt: skip


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _assert_close(out, ref64, torch_same, what=""):
    """Flash-attention's rule: |out - ref64| <= 2 |torch_same - ref64| + half an ulp of the output dtype (scaled to
    the output's magnitude: a one-element case can have torch land exactly by luck)."""
    assert out.dtype == torch_same.dtype and out.shape == ref64.shape, what
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * _err(torch_same, ref64) + (HALF_ULP[out.dtype] + 1e-7) * scale
    assert _err(out, ref64) <= bound, f"{what}: err {_err(out, ref64):.3g} > bound {bound:.3g}"


def _assert_dw_close(dw, dw64, dw_torch, terms64, what="dweights"):
    """dweights sums F products: the 2x rule, or the worst-case bound of moe_raw's fp32 order (F / 32 terms a lane,
    then a 5-level tree, plus each product's rounding) where that is larger (as tests/test_swiglu_gpu.py)."""
    assert dw.dtype == dw_torch.dtype and dw.shape == dw64.shape, what
    depth = terms64.shape[-1] // 32 + 10
    bound_rows = depth * U32 * terms64.abs().sum(-1, keepdim=True) + HALF_ULP[dw.dtype] * dw64.abs()
    err_rows = (dw.double() - dw64).abs()
    torch_err = _err(dw_torch, dw64)
    assert bool((err_rows <= torch.clamp(bound_rows, min=2 * torch_err) + 1e-30).all()), (
        f"{what}: err {err_rows.max().item():.3g}, torch err {torch_err:.3g}"
    )


def _inputs(n, f, dtype, wdtype=torch.float32, lead=(), device="cpu", scale=5.0):
    """y [*lead, n, 2F] spread to +-3 sigma = +-15, so a limit of 7 clamps about 16% of the values."""
    y = (torch.randn(*lead, n, 2 * f) * scale).to(dtype).to(device)
    g = torch.randn(*lead, n, f).to(dtype).to(device)
    w = torch.rand(n, 1).to(wdtype).to(device)
    return y, g, w


def _check_family(family, y, g, w, unweighted=True):
    """All four functions of a family vs the fp64 reference; the weighted pair on 2-D y only."""
    names, kw, act = FAMILIES[family]
    ours = [getattr(moe_raw, n) for n in names]
    refs = [getattr(R, n) for n in names]
    y64, g64, w64 = y.double(), g.double(), w.double()
    if unweighted:
        _assert_close(ours[0](y, **kw), refs[0](y64, **kw), refs[0](y, **kw), names[0])
        _assert_close(ours[2](g, y, **kw), refs[2](g64, y64, **kw), refs[2](g, y, **kw), names[2])
    if y.dim() != 2:
        return
    _assert_close(ours[1](y, w, **kw), refs[1](y64, w64, **kw), refs[1](y, w, **kw), names[1])
    dy, dw = ours[3](g, y, w, **kw)
    dy_t, dw_t = refs[3](g, y, w, **kw)
    dy_r, dw_r = refs[3](g64, y64, w64, **kw)
    _assert_close(dy, dy_r, dy_t, names[3] + " dy")
    _assert_dw_close(dw, dw_r, dw_t, R.quick_glu(y64, *act) * g64, names[3] + " dweights")


# ---------------------------------------------------------------------------------------------------------------
# The reference: the backward is the derivative of the forward, the clamp is Megatron's, the layout gpt-oss's


def _formula(y, w, alpha, offset, limit):
    """The forward written out once more (torch.clamp for the clamp, as Megatron's weighted_bias_quick_geglu_impl)."""
    gate, linear = y.chunk(2, -1)
    if limit is not None:
        gate, linear = torch.clamp(gate, max=limit), torch.clamp(linear, -limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + offset) * w


ACTS = [(1.702, 0.0, None), (1.702, -1.25, None), (1.702, 1.0, 7.0), (1.0, 1.0, 3.5), (0.5, 0.25, 2.0)]


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_reference_backward_is_autograd_of_the_formula(act):
    y = torch.randn(6, 40, dtype=torch.float64) * 5
    if act[2] is not None:  # torch.clamp passes the gradient at the bounds themselves: have some values there
        y[0, :4] = torch.tensor([act[2], -act[2], act[2], 2 * act[2]], dtype=torch.float64)
        y[1, 20:24] = torch.tensor([act[2], -act[2], -2 * act[2], act[2]], dtype=torch.float64)
    w = torch.rand(6, 1, dtype=torch.float64)
    g = torch.randn(6, 20, dtype=torch.float64)
    y_, w_ = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = _formula(y_, w_, *act)
    dy_auto, dw_auto = torch.autograd.grad(out, (y_, w_), g)
    torch.testing.assert_close(R.weighted_quick_glu(y, w, *act), out.detach(), rtol=1e-13, atol=1e-13)
    dy, dw = R.weighted_quick_glu_back(g, y, w, *act)
    torch.testing.assert_close(dy, dy_auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        R.quick_glu_back(g, y, *act), R.weighted_quick_glu_back(g, y, torch.ones_like(w), *act)[0]
    )


def test_reference_names_are_the_generic_form():
    y, g, w = (t.double() for t in _inputs(3, 8, torch.float32))
    assert torch.equal(R.quick_geglu(y, 0.5), R.quick_glu(y, 1.702, 0.5))
    assert torch.equal(R.quick_geglu(y), y[:, :8] * torch.sigmoid(1.702 * y[:, :8]) * y[:, 8:])  # Megatron's default
    assert torch.equal(R.clamped_swiglu_back(g, y, 1.5, 3.0), R.quick_glu_back(g, y, 1.5, 1.0, 3.0))
    ours, generic = R.weighted_quick_geglu_back(g, y, w, 0.5), R.weighted_quick_glu_back(g, y, w, 1.702, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ours, generic, strict=True))


def test_gpt_oss_interleaved_layout_is_the_halves_deinterleaved():
    """gpt-oss's own swiglu reads gate / linear from even / odd columns; moe_raw reads [gate | linear] halves."""
    x = torch.randn(5, 24, dtype=torch.float64) * 6
    x_glu, x_linear = x[..., ::2].clamp(min=None, max=7.0), x[..., 1::2].clamp(min=-7.0, max=7.0)
    gpt_oss = x_glu * torch.sigmoid(1.702 * x_glu) * (x_linear + 1)
    halves = torch.cat((x[..., ::2], x[..., 1::2]), -1)
    torch.testing.assert_close(R.clamped_swiglu(halves, alpha=1.702, limit=7.0), gpt_oss, rtol=0, atol=0)


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_impl_is_megatrons_torch_clamp(fp8):
    """The reference impl clamps with torch ops before the Function (Megatron's order); the generic reference fuses
    the clamp. Same values and gradients in fp64, the bounds included."""
    y = torch.randn(6, 16, dtype=torch.float64) * 5
    y[0, :3] = torch.tensor([7.0, -7.0, 7.0])
    y[1, 8:11] = torch.tensor([7.0, -7.0, 9.0])
    w, g = torch.rand(6, 1, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    y_, w_ = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    R.weighted_bias_quick_geglu_impl(y_, None, w_, False, linear_offset=1.0, clamp_value=7.0).backward(g)
    dy, dw = R.weighted_quick_glu_back(g, y, w, 1.702, 1.0, 7.0)
    torch.testing.assert_close(y_.grad, dy, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(w_.grad, dw, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Kernels under the CUDA simulator


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,f", [(7, 8), (5, 13)])  # F = 8: 16-byte kernels (every dtype); 13: element kernels
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_match_reference(kernels, family, dtype, n, f):
    wdtype = torch.float32 if f == 8 else dtype
    y, g, w = _inputs(n, f, dtype, wdtype)
    _check_family(family, y, g, w)
    act = FAMILIES[family][2]
    assert len(kernels) == 4 and all(spec[7] == act for spec in kernels), kernels
    assert all(spec[2] == (f * y.element_size() % 16 == 0) for spec in kernels), kernels
    if act[2] is not None:
        assert (y.abs() > act[2]).float().mean() > 0.05  # the clamp is active on both halves


def test_vector_and_element_paths_agree(kernels):
    y, g, w = _inputs(5, 16, torch.bfloat16)
    y_odd = torch.zeros(5 * 32 + 1, dtype=torch.bfloat16)[1:].view(5, 32)  # 2-byte aligned rows: element kernels
    y_odd.copy_(y)
    kw = FAMILIES["clamped"][1]
    out_vec, out_elem = moe_raw.weighted_clamped_swiglu(y, w, **kw), moe_raw.weighted_clamped_swiglu(y_odd, w, **kw)
    (dy_v, dw_v), (dy_e, dw_e) = (moe_raw.weighted_clamped_swiglu_back(g, yy, w, **kw) for yy in (y, y_odd))
    assert [spec[2] for spec in kernels] == [True, False, True, False]
    assert torch.equal(out_vec, out_elem) and torch.equal(dy_v, dy_e)
    # dweights: the same fp32 terms summed in another grouping; both within the bound of their summation order
    y64, g64, w64 = y.double(), g.double(), w.double()
    dw_r, dw_t = (
        R.weighted_clamped_swiglu_back(g64, y64, w64, **kw)[1],
        R.weighted_clamped_swiglu_back(g, y, w, **kw)[1],
    )
    for dw in (dw_v, dw_e):
        _assert_dw_close(dw, dw_r, dw_t, R.clamped_swiglu(y64, **kw) * g64)


def _strided(n, f, dtype, device):
    """Strided rows (16-byte aligned: the same 16-byte kernels; shifted by one element: element kernels), a
    column-major y (copied), sliced g, strided weights and a stride-0 g give the contiguous results."""
    y, g, w = _inputs(n, f, dtype, device=device)
    pad = 16 // y.element_size()
    y_rows = torch.zeros(n, 2 * f + 2 * pad, dtype=dtype, device=device)[:, pad:-pad]
    y_rows.copy_(y)
    y_shifted = torch.zeros(n, 2 * f + 1, dtype=dtype, device=device)[:, 1:]
    y_shifted.copy_(y)
    y_cols = y.t().contiguous().t()  # last stride != 1
    g_rows = torch.zeros(n, 3 * f, dtype=dtype, device=device)[:, f : 2 * f]
    g_rows.copy_(g)
    w_strided = torch.zeros(n, 3, device=device)[:, 1:2]
    w_strided.copy_(w)
    out = moe_raw.weighted_quick_geglu(y, w, 1.0)
    dy, dw = moe_raw.weighted_quick_geglu_back(g, y, w, 1.0)
    y64, g64 = y.double(), g.double()
    dw_r, dw_t = R.weighted_quick_geglu_back(g64, y64, w.double(), 1.0)[1], R.weighted_quick_geglu_back(g, y, w, 1.0)[1]
    for yy in (y_rows, y_shifted, y_cols):
        assert torch.equal(moe_raw.weighted_quick_geglu(yy, w_strided, 1.0), out)
        dy_s, dw_s = moe_raw.weighted_quick_geglu_back(g_rows, yy, w_strided, 1.0)
        assert torch.equal(dy_s, dy)
        # the shifted rows take the element kernels: dweights summed in another grouping, within its bound
        _assert_dw_close(dw_s, dw_r, dw_t, R.quick_geglu(y64, 1.0) * g64)
    g_bcast = g[:1].expand(n, f)  # row stride 0, as y.sum().backward() gives
    assert torch.equal(
        moe_raw.clamped_swiglu_back(g_bcast, y_rows), moe_raw.clamped_swiglu_back(g_bcast.contiguous(), y)
    )


def test_strided_rows_and_grads(kernels):
    _strided(6, 8, torch.bfloat16, "cpu")


def _three_d(n, f, dtype, device):
    """3-D inputs of the unweighted functions, with their default constants."""
    y, g, _ = _inputs(n, f, dtype, lead=(2,), device=device)
    for fwd, back, ref_fwd, ref_back in (
        (moe_raw.quick_geglu, moe_raw.quick_geglu_back, R.quick_geglu, R.quick_geglu_back),
        (moe_raw.clamped_swiglu, moe_raw.clamped_swiglu_back, R.clamped_swiglu, R.clamped_swiglu_back),
    ):
        out, dy = fwd(y), back(g, y)
        assert out.shape == (2, n, f) and dy.shape == y.shape
        assert torch.equal(out, fwd(y.reshape(2 * n, 2 * f)).view(2, n, f))
        _assert_close(out, ref_fwd(y.double()), ref_fwd(y), "3-D forward")
        _assert_close(dy, ref_back(g.double(), y.double()), ref_back(g, y), "3-D backward")


def test_three_d_and_default_constants(kernels):
    _three_d(3, 8, torch.float16, "cpu")
    assert [spec[7] for spec in kernels[::4]] == [(1.702, 0.0, None), (1.702, 1.0, 7.0)]


def _dtype_mixes(n, f, device):
    """g and weights in other dtypes than y: the element kernels, the seed's output dtypes."""
    y, _, _ = _inputs(n, f, torch.bfloat16, device=device)
    g, w = torch.randn(n, f, device=device), torch.rand(n, 1, device=device).to(torch.float16)
    kw = FAMILIES["clamped"][1]
    dy = moe_raw.clamped_swiglu_back(g, y, **kw)
    assert dy.dtype == torch.float32
    _assert_close(dy, R.clamped_swiglu_back(g.double(), y.double(), **kw), R.clamped_swiglu_back(g, y, **kw))
    dyw, dw = moe_raw.weighted_clamped_swiglu_back(g, y, w, **kw)
    assert (dyw.dtype, dw.dtype) == (torch.bfloat16, torch.float16)
    dyw_t, dw_t = R.weighted_clamped_swiglu_back(g, y, w, **kw)
    dyw_r, dw_r = R.weighted_clamped_swiglu_back(g.double(), y.double(), w.double(), **kw)
    _assert_close(dyw, dyw_r, dyw_t, "dy")
    _assert_dw_close(dw, dw_r, dw_t, R.clamped_swiglu(y.double(), **kw) * g.double())


def test_dtype_mixes(kernels):
    _dtype_mixes(3, 8, "cpu")
    assert len(kernels) == 2 and not any(spec[2] for spec in kernels)


def _special_values(device):
    """The clamp at and beyond its bounds, infinities and NaN, in fp32: moe_raw vs the reference (same NaNs, close
    values), the gradient exactly 0 where the clamp is active and passed at the bounds (torch.clamp's rule)."""
    inf, nan = float("inf"), float("nan")
    gate = [inf, 1e30, 7.0, 7.5, nan, -1e30, -inf, 0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -0.5, 2.0]
    linear = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, inf, -inf, 7.0, -7.0, 7.5, -8.0, nan, 0.0]
    y = torch.tensor([gate + linear], device=device)
    g = torch.ones(1, 16, device=device)
    out, dy = moe_raw.clamped_swiglu(y), moe_raw.clamped_swiglu_back(g, y)
    ref, dy_ref = R.clamped_swiglu(y.double()), R.clamped_swiglu_back(g.double(), y.double())
    for ours, theirs in ((out, ref), (dy, dy_ref)):
        assert torch.equal(ours.isnan(), theirs.isnan()), (ours, theirs)
        finite = ~theirs.isnan()
        torch.testing.assert_close(ours[finite].double(), theirs[finite], rtol=1e-6, atol=1e-6)
    dgate, dlinear = dy[0, :16].cpu(), dy[0, 16:].cpu()
    assert torch.isfinite(out[0, :2]).all()  # gate +inf / 1e30 clamped to 7: finite
    assert (dgate[[0, 1, 3]] == 0).all() and dgate[2] != 0  # clamped: zero; at the bound: passed
    assert (dlinear[[8, 9, 12, 13]] == 0).all() and (dlinear[[10, 11]] != 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow / NaN notes from the simulator
def test_special_values(kernels):
    _special_values("cpu")


def test_empty_inputs_launch_nothing(kernels):
    y0, w0 = torch.empty(0, 16, dtype=torch.bfloat16), torch.empty(0, 1)
    assert moe_raw.quick_geglu(y0).shape == (0, 8)
    assert moe_raw.weighted_clamped_swiglu(y0, w0).shape == (0, 8)
    dy, dw = moe_raw.weighted_quick_geglu_back(torch.empty(0, 8, dtype=torch.bfloat16), y0, w0)
    assert dy.shape == (0, 16) and dw.shape == (0, 1)
    dy, dw = moe_raw.weighted_clamped_swiglu_back(torch.empty(3, 0), torch.empty(3, 0), torch.ones(3, 1))
    assert dy.shape == (3, 0) and torch.equal(dw, torch.zeros(3, 1))
    assert kernels == []


def test_constants_share_one_kernel(kernels):
    """linear_offset as an int, a float, a numpy float or a 0-d CPU tensor: one act, one spec (one compile)."""
    import numpy as np

    y = torch.randn(2, 16)
    outs = [moe_raw.quick_geglu(y, off) for off in (1, 1.0, np.float32(1.0), torch.tensor(1.0))]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert len({spec for spec in kernels}) == 1 and kernels[0][7] == (1.702, 1.0, None)


def _autograd(fn, y, w, g, bias=None):
    y_, w_ = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    args = (y_, w_) if bias is None else (y_, w_, bias.clone().requires_grad_(True))
    out = fn(*args)
    out.backward(g)
    return out, *(a.grad for a in args)


def _impl_vs_megatron(n, f, dtype, fp8, lead, device):
    """moe_raw's impl (the clamp inside the kernels) vs the reference (Megatron's: torch clamp, then the Function)."""
    y, g, w = _inputs(n * (lead[0] if lead else 1), f, dtype, device=device)
    if lead:
        y, g = y.view(lead[0], n, 2 * f), g.view(lead[0], n, f)
    kw = dict(linear_offset=1.0, clamp_value=7.0)
    ours = _autograd(lambda a, b: moe_raw.weighted_bias_quick_geglu_impl(a, None, b, fp8, **kw), y, w, g)
    ref = _autograd(lambda a, b: R.weighted_bias_quick_geglu_impl(a, None, b, fp8, **kw), y, w, g)
    for o, r, name in zip(ours, ref, ("out", "d input", "d weights"), strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype, name
    y2, g2 = y.reshape(-1, 2 * f), g.reshape(-1, f)
    _assert_close(ours[0].reshape(-1, f), R.weighted_quick_glu(y2.double(), w.double(), 1.702, 1.0, 7.0),
                  ref[0].reshape(-1, f), "forward")  # fmt: skip
    # backward: both at the saved input (fp8-rounded with fp8_input_store; moe_raw's clamp test sees that one too)
    y_saved = y2.to(torch.float8_e4m3fn).to(dtype) if fp8 else y2
    dy_r, dw_r = R.weighted_quick_glu_back(g2.double(), y_saved.double(), w.double(), 1.702, 1.0, 7.0)
    dy_t, dw_t = R.weighted_quick_glu_back(g2, y_saved, w, 1.702, 1.0, 7.0)
    _assert_close(ours[1].reshape(-1, 2 * f), dy_r, dy_t, "d input")
    _assert_dw_close(ours[2], dw_r, dw_t, R.quick_glu(y_saved.double(), 1.702, 1.0, 7.0) * g2.double(), "d weights")
    assert torch.equal(ours[0], moe_raw.weighted_bias_quick_geglu_impl(y, None, w, False, **kw))  # fp8: grads only
    # the Function itself, called as the impl calls it
    y3, w3 = y2.clone().requires_grad_(True), w.clone().requires_grad_(True)
    moe_raw.WeightedQuickGeGLUFunction.apply(y3, w3, fp8, 1.0, 7.0).backward(g2)
    assert torch.equal(y3.grad, ours[1].reshape(-1, 2 * f)) and torch.equal(w3.grad, ours[2])


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_impl_matches_megatrons(kernels, fp8, lead):
    _impl_vs_megatron(4, 8, torch.bfloat16, fp8, lead, "cpu")


def _impl_with_bias(n, f, device):
    """A bias (Megatron adds it after the clamp) runs as torch ops before the kernels: values and all three grads
    vs the reference (Megatron's order) in fp64, under the 2x rule against the same reference in fp32."""
    y, g, w = _inputs(n, f, torch.float32, device=device)
    bias = torch.randn(2 * f, device=device)
    kw = dict(linear_offset=1.0, clamp_value=7.0)
    ours = _autograd(lambda a, b, c: moe_raw.weighted_bias_quick_geglu_impl(a, c, b, False, **kw), y, w, g, bias)
    ref = _autograd(lambda a, b, c: R.weighted_bias_quick_geglu_impl(a, c, b, False, **kw), y, w, g, bias)
    ref64 = _autograd(
        lambda a, b, c: R.weighted_bias_quick_geglu_impl(a, c, b, False, **kw), y.double(), w.double(), g.double(),
        bias.double(),
    )  # fmt: skip
    for o, r, r64, name in zip(ours, ref, ref64, ("out", "d input", "d weights", "d bias"), strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        if name == "d weights":
            terms = R.quick_glu(R.clamp_glu(y.double(), 7.0) + bias.double(), 1.702, 1.0) * g.double()
            _assert_dw_close(o, r64, r, terms, name)
        else:
            _assert_close(o, r64, r, name)
    for impl in (moe_raw.weighted_bias_quick_geglu_impl, R.weighted_bias_quick_geglu_impl):
        out = impl(y.bfloat16(), bias, w, False, **kw)
        assert out.dtype == torch.bfloat16  # an fp32 bias promotes the sum; the output keeps input.dtype (Megatron's)


def test_impl_with_bias(kernels):
    _impl_with_bias(4, 8, "cpu")
    assert all(spec[7] == (1.702, 1.0, None) for spec in kernels)  # the kernels get the biased input, clamp done


def test_function_takes_megatrons_arguments(kernels):
    """Megatron calls WeightedQuickGeGLUFunction.apply(input, weights, fp8_input_store, linear_offset) with
    linear_offset a 0-d tensor; only the needed gradients are computed, and once."""
    y, g, w = _inputs(3, 8, torch.float32)
    y_ = y.clone().requires_grad_(True)
    out = moe_raw.WeightedQuickGeGLUFunction.apply(y_, w, False, torch.tensor(0.5))
    out.backward(g)
    assert w.grad is None
    torch.testing.assert_close(out, R.weighted_quick_geglu(y, w, 0.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_.grad, R.weighted_quick_geglu_back(g, y, w, 0.5)[0], rtol=1e-5, atol=1e-5)
    y2 = y.clone().requires_grad_(True)
    out = moe_raw.weighted_bias_quick_geglu_impl(y2, None, w.clone().requires_grad_(True))
    (dy,) = torch.autograd.grad(out, y2, g.clone().requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dy.sum().backward()


def test_cpu_tensors_compute_in_fp32_and_round_once():
    """Without the simulator's patch CPU tensors take the torch reference's formula computed in fp32 and rounded
    once to the input dtype, bit for bit: the kernels' arithmetic, so CPU and CUDA results agree to rounding."""
    y, g, w = _inputs(4, 6, torch.float16)
    y32, g32, w32 = y.float(), g.float(), w.float()
    for name in FAMILIES:
        names, kw, _ = FAMILIES[name]
        assert torch.equal(getattr(moe_raw, names[0])(y, **kw), getattr(R, names[0])(y32, **kw).half())
        assert torch.equal(getattr(moe_raw, names[2])(g, y, **kw), getattr(R, names[2])(g32, y32, **kw).half())
        ours, ref = getattr(moe_raw, names[3])(g, y, w, **kw), getattr(R, names[3])(g32, y32, w32, **kw)
        assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(ours, ref, strict=True))


def test_gradcheck_fp64_reference_path():
    y = (torch.randn(3, 8, dtype=torch.float64) * 4).requires_grad_(True)  # no value within 1e-6 of +-2 here
    w = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: moe_raw.WeightedQuickGeGLUFunction.apply(a, b, False, 0.5, 2.0), (y, w)
    )


# ---------------------------------------------------------------------------------------------------------------
# Real NVVM: every new kind of kernel compiles, with the act's constants in the code and the launch ABI unchanged

_ENV = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}

_PTX_CHECK = r"""
import importlib, re, sys
S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")
clamped, quick = (1.702, 1.0, 7.0), (1.702, 0.0, None)
# per dtype: both kinds on both paths (the act's element and word code), weighted and not
specs = []
for c in ("f32", "f16", "bf16"):
    for kind, vec, weighted in (("fwd", True, True), ("fwd", False, False), ("bwd", True, False), ("bwd", False, True)):
        specs.append((kind, weighted, vec, c, c, c, c if weighted else "f32", clamped))
specs += [
    ("fwd", True, False, "bf16", "bf16", "bf16", "f32", clamped),  # weights fp32, y bf16
    ("bwd", True, False, "bf16", "f32", "bf16", "f16", clamped),  # g fp32, weights fp16
    ("bwd", False, False, "f16", "bf16", "f32", "f32", clamped),  # dy promoted to fp32
    ("fwd", False, True, "bf16", "bf16", "bf16", "f32", quick),
    ("bwd", True, True, "bf16", "bf16", "bf16", "f32", quick),
]
sizes = {"u64": 8, "b64": 8, "s64": 8, "f64": 8}
for spec in specs:
    try:
        ptx = GC._ptx(spec)
    except Exception as e:  # noqa
        if "nvvm" in str(e).lower() or "NVVM" in type(e).__name__:
            print("NO_NVVM"); sys.exit(0)
        raise
    entry = ptx[ptx.index(".entry"):]
    params = re.findall(r"\.param \.(\w+)", entry[: entry.index(")")])
    assert [sizes[p] for p in params] == [8] * len(GC._abi(spec)), (spec, params)  # SwiGLU's launch layout
    consts = set(re.findall(r"0f[0-9A-F]{8}", ptx))
    has = lambda c: c in consts
    # 1.702f = 0x3FD9DB23 (times log2(e) for ex2 on the fast path: folded into one constant there); 7.0f = 0x40E00000
    assert spec[7] is quick or (has("0f40E00000") and has("0fC0E00000")), spec  # +-limit
    assert spec[7] is clamped or not has("0f40E00000"), spec  # no clamp compiled in
    print("OK", spec)
"""


def test_every_new_kernel_kind_compiles_with_nvvm():
    """The clamped act (every term of the template: alpha, offset, clamp) in forward and backward kernels, 16-byte
    and element, weighted and not, for fp32 / fp16 / bf16 data (each of the act's device functions for each dtype;
    the rest of the template is SwiGLU's, compiled by tests/test_swiglu.py), dtype mixes, and the unclamped
    Quick-GEGLU act: real PTX, SwiGLU's parameter list (moe_raw's packed launch), the clamp constants present exactly
    when clamping. About 0.4 s a compile."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PTX_CHECK)], env=_ENV, capture_output=True, text=True, timeout=300
    )
    if "No module named 'numba'" in proc.stderr:
        pytest.skip("numba-cuda is not installed (it comes with the cuda12 / cuda13 extra)")
    if "NO_NVVM" in proc.stdout:
        pytest.skip("libnvvm not found: cannot compile PTX here")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK") == 17, proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Names, signatures and validation


_ = inspect.Parameter.empty
# Megatron-LM's (megatron/core/fusions/fused_bias_geglu.py) and NeMo Automodel's (moe_utils) signatures; the impl
# ends with Automodel's alpha. clamped_swiglu takes gpt-oss's (alpha, limit) in gpt-oss's order.
SIGNATURES = {
    "quick_geglu": [("y", _), ("linear_offset", 0.0)],
    "weighted_quick_geglu": [("y", _), ("weights", _), ("linear_offset", 0.0)],
    "quick_geglu_back": [("g", _), ("y", _), ("linear_offset", 0.0)],
    "weighted_quick_geglu_back": [("g", _), ("y", _), ("weights", _), ("linear_offset", 0.0),
                                  ("need_weight_grad", True)],
    "weighted_bias_quick_geglu_impl": [("input", _), ("bias", _), ("weights", _), ("fp8_input_store", False),
                                       ("linear_offset", 0.0), ("clamp_value", None), ("alpha", 1.702)],
    "clamped_swiglu": [("y", _), ("alpha", 1.702), ("limit", 7.0)],
    "weighted_clamped_swiglu": [("y", _), ("weights", _), ("alpha", 1.702), ("limit", 7.0)],
    "clamped_swiglu_back": [("g", _), ("y", _), ("alpha", 1.702), ("limit", 7.0)],
    "weighted_clamped_swiglu_back": [("g", _), ("y", _), ("weights", _), ("alpha", 1.702), ("limit", 7.0),
                                     ("need_weight_grad", True)],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures(name):
    expected = [(n, repr(d)) for n, d in SIGNATURES[name]]
    for module in (moe_raw, R):
        params = inspect.signature(getattr(module, name)).parameters.values()
        assert [(p.name, repr(p.default)) for p in params] == expected, module.__name__
        # need_weight_grad is keyword-only, as in NeMo Automodel 0.7
        kinds = [p.kind for p in params]
        expected_kinds = [
            inspect.Parameter.KEYWORD_ONLY if n == "need_weight_grad" else inspect.Parameter.POSITIONAL_OR_KEYWORD
            for n, _d in SIGNATURES[name]
        ]
        assert kinds == expected_kinds, module.__name__


def test_function_forward_starts_with_megatrons_parameters():
    params = list(inspect.signature(moe_raw.WeightedQuickGeGLUFunction.forward).parameters)
    assert params[:5] == ["ctx", "input", "weights", "fp8_input_store", "linear_offset"]
    assert params[5:] == ["clamp_value", "alpha"]


def _bad_calls():
    y, w, g = torch.ones(3, 4), torch.ones(3, 1), torch.ones(3, 2)
    impl = moe_raw.weighted_bias_quick_geglu_impl
    return [
        (lambda: moe_raw.quick_geglu(torch.ones(3, 5)), ValueError, "last dim of y must be even"),
        (lambda: moe_raw.quick_geglu(torch.ones(3, 4, dtype=torch.int32)), TypeError, "y must be float32"),
        (lambda: moe_raw.quick_geglu(y, "1.0"), TypeError, "linear_offset must be a float"),
        (lambda: moe_raw.quick_geglu(y, True), TypeError, "linear_offset must be a float"),
        (lambda: moe_raw.quick_geglu(y, float("nan")), ValueError, "linear_offset must be finite"),
        (lambda: moe_raw.quick_geglu(y, torch.ones(2)), TypeError, "linear_offset must be a Python float or a 0-d"),
        (lambda: moe_raw.quick_geglu(y, torch.tensor(1.0, device="meta")), TypeError, "would sync the host"),
        (lambda: moe_raw.weighted_quick_geglu(torch.ones(2, 3, 4), w), ValueError, "y must be 2-D"),
        (lambda: moe_raw.weighted_quick_geglu(y, torch.ones(3)), ValueError, r"weights must be \[N, 1\]"),
        (lambda: moe_raw.weighted_quick_geglu(y, None), TypeError, "weights must be a torch.Tensor"),
        (lambda: moe_raw.quick_geglu_back(torch.ones(3, 3), y), ValueError, r"g must be \[..., F\]"),
        (lambda: moe_raw.weighted_quick_geglu_back(g, y, torch.ones(2, 1)), ValueError, "weights must be"),
        (lambda: moe_raw.clamped_swiglu(y, limit=0.0), ValueError, "limit must be > 0"),
        (lambda: moe_raw.clamped_swiglu(y, limit=-7.0), ValueError, "limit must be > 0"),
        (lambda: moe_raw.clamped_swiglu(y, limit=float("inf")), ValueError, "limit must be finite"),
        (lambda: moe_raw.clamped_swiglu(y, limit=None), TypeError, "limit must be a float"),
        (lambda: moe_raw.clamped_swiglu(y, alpha=float("nan")), ValueError, "alpha must be finite"),
        (lambda: moe_raw.weighted_clamped_swiglu(y, torch.ones(3, 1, device="meta")), ValueError, "device"),
        (lambda: moe_raw.clamped_swiglu_back(torch.ones(3, 2, dtype=torch.int8), y), TypeError, "g must be"),
        (lambda: moe_raw.weighted_clamped_swiglu_back(g, torch.ones(3, 5), w), ValueError, "even"),
        (lambda: impl(torch.ones(2, 2, 2, 4), None, torch.ones(8, 1)), ValueError, "2-D"),
        (lambda: impl(y, None, w, "yes"), TypeError, "fp8_input_store"),
        (lambda: impl(y, None, w, clamp_value=-1.0), ValueError, "clamp_value must be > 0"),
        (lambda: impl(y, torch.ones(3), w), ValueError, "bias must broadcast"),
        (lambda: impl(y, [0.0] * 4, w), TypeError, "bias must be a torch.Tensor"),
        (lambda: impl(y, torch.ones(4, dtype=torch.int64), w), TypeError, "bias must be float32"),
        (lambda: impl(y, torch.ones(4, device="meta"), w), ValueError, "bias is on"),
        (lambda: impl(y, w), TypeError, "missing 1 required positional argument: 'weights'"),  # SwiGLU's call shape
        (lambda: moe_raw.WeightedQuickGeGLUFunction.apply(torch.ones(2, 3), torch.ones(2, 1), False, 0.0), ValueError,
         "even"),
        (lambda: moe_raw.WeightedQuickGeGLUFunction.apply(y, w, False, 0.0, 0.0), ValueError, "clamp_value must be"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_validation_errors(case):
    call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# GPU: python -m pytest -q -m gpu tests/test_activations.py


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("f", [1, 13, 768, 2048])  # 768, 2048: 16-byte kernels for every dtype; 1, 13: element
@pytest.mark.parametrize("n", [1, 7, 1027])
@pytest.mark.parametrize("wdtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_matches_reference(family, dtype, wdtype, n, f):
    y, g, w = _inputs(n, f, dtype, torch.float32 if wdtype == "fp32" else dtype, device="cuda")
    _check_family(family, y, g, w)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_three_d_strided_and_dtype_mixes(dtype):
    _three_d(5, 768, dtype, "cuda")
    _strided(1027, 768, dtype, "cuda")
    if dtype is torch.bfloat16:
        _dtype_mixes(9, 768, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_clamp_active_and_special_values():
    y, _, _ = _inputs(1027, 768, torch.float32, device="cuda")
    assert 0.1 < (y.abs() > 7.0).float().mean().item() < 0.3  # the GPU cases above clamp about 16% of the inputs
    _special_values("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_every_output_element_written(dtype):
    """Outputs poisoned with NaN before the launch (the launchers take preallocated outputs)."""
    act = FAMILIES["clamped"][2]
    for n, f in ((7, 13), (1027, 768)):
        y, g, w = _inputs(n, f, dtype, device="cuda")
        out = torch.full((n, f), float("nan"), device="cuda", dtype=dtype)
        GL._fwd_into(y, w, out, act)
        dy = torch.full((n, 2 * f), float("nan"), device="cuda", dtype=dtype)
        dw = torch.full((n, 1), float("nan"), device="cuda")
        GL._bwd_into(g, y, w, dy, dw, act)
        assert not out.isnan().any() and not dy.isnan().any() and not dw.isnan().any()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_dweights_bitwise_deterministic(dtype):
    y, g, w = _inputs(1027, 2048, dtype, device="cuda")
    shifted = torch.zeros(1027, 4097, device="cuda", dtype=dtype)[:, 1:].copy_(y)  # element kernels
    for yy in (y, shifted):
        for back in (moe_raw.weighted_clamped_swiglu_back, moe_raw.weighted_quick_geglu_back):
            dy0, dw0 = back(g, yy, w)
            for _ in range(20):
                dy, dw = back(g, yy, w)
                assert torch.equal(dw, dw0) and torch.equal(dy, dy0)


def _all_ops(y, g, w):
    kw = FAMILIES["quick"][1]
    return (
        moe_raw.weighted_clamped_swiglu(y, w),
        *moe_raw.weighted_clamped_swiglu_back(g, y, w),
        moe_raw.weighted_quick_geglu(y, w, **kw),
        *moe_raw.weighted_quick_geglu_back(g, y, w, **kw),
        moe_raw.quick_geglu_back(g, y, **kw),
    )


@pytest.mark.gpu
@needs_cuda
def test_gpu_side_stream(side_stream):
    """Inputs are written on the side stream behind a long sleep: a launch on any other stream reads zeros."""
    expected, got = run_on_side_stream(side_stream, _all_ops, *_inputs(1027, 2048, torch.bfloat16, device="cuda"))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay():
    y, g, w = _inputs(1027, 768, torch.bfloat16, device="cuda")
    _all_ops(y, g, w)  # compile + load before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _all_ops(y, g, w)
    for _ in range(3):
        y.copy_((torch.randn_like(y, dtype=torch.float32) * 5).to(y.dtype))
        g.copy_(torch.randn_like(g, dtype=torch.float32).to(g.dtype))
        w.copy_(torch.rand_like(w))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, _all_ops(y, g, w), strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("lead", [(), (4,)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_autograd_vs_reference(dtype, lead, fp8):
    _impl_vs_megatron(257, 768, dtype, fp8, lead, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_impl_with_bias():
    _impl_with_bias(257, 768, "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fast_launch_equalsnumba_launch(dtype):
    """moe_raw's packed launch of an act kernel vs Numba's own launch of the same compiled kernel."""
    n, f = 131, 768
    act = FAMILIES["clamped"][2]
    y, g, w = _inputs(n, f, dtype, device="cuda")
    shifted = torch.zeros(n, 2 * f + 1, device="cuda", dtype=dtype)[:, 1:].copy_(y)
    for yy in (y, shifted):
        out_fast, out_numba = (torch.empty(n, f, device="cuda", dtype=dtype) for _ in range(2))
        GL._fwd_into(yy, w, out_fast, act)
        numba_launch(*GL._fwd_args(yy, w, out_numba, act), n)
        dy_f, dy_n = torch.empty_like(y), torch.empty_like(y)
        dw_f, dw_n = torch.empty(n, 1, device="cuda"), torch.empty(n, 1, device="cuda")
        GL._bwd_into(g, yy, w, dy_f, dw_f, act)
        numba_launch(*GL._bwd_args(g, yy, w, dy_n, dw_n, act), n)
        torch.cuda.synchronize()
        assert torch.equal(out_fast, out_numba) and torch.equal(dy_f, dy_n) and torch.equal(dw_f, dw_n)
