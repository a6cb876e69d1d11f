"""The gated activations' public ops (moe_raw.activations): SwiGLU, Quick-GEGLU and gpt-oss's clamped SwiGLU, their
weighted forms, backwards, autograd Functions and ``*_impl`` wrappers: values against the fp64 reference, dtype
rules, strided and 3-D inputs, autograd, determinism.

Semantics: Megatron-LM megatron/core/fusions/fused_bias_swiglu.py and fused_bias_geglu.py (NeMo Automodel's
moe_utils has the same functions) and gpt-oss's clamped SwiGLU (alpha, limit) on ``[gate | linear]`` halves.

The rule for values: flash-attention's, error <= 2x torch's own error in the same dtype + half an ulp
(conftest.assert_close_2x; dweights: conftest.assert_dw_close).

* ``device`` params: the same check on the CPU (moe_raw/_cpu.py: the reference's formula in fp32, rounded once; run
  in CI, on small shapes) and on CUDA (the Numba kernels; the original large shapes, marked ``gpu``).
* ``kernels`` tests: the kernels on CPU tensors under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), with the
  launch specs they pick.
* GPU only: a side stream, CUDA-graph replay, a second device.

The reference formulas, signatures and validation are tests/test_activations_api.py; the kernels themselves
(simulated SwiGLU kernels, conversions, ABI, NVVM, fast launch) tests/test_glu_kernels.py.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
from conftest import (
    DEVICES,
    GLU_DTYPES,
    assert_close_2x,
    assert_dw_close,
    device_cases,
    glu_inputs,
    needs_cuda,
    needs_two_gpus,
    run_on_side_stream,
)

import moe_raw
from moe_raw import reference as R

S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")

DTYPES = GLU_DTYPES

# Each family's four functions, their keyword constants for one case, and that case's act (alpha, offset, limit).
FAMILIES = {
    "quick": (("quick_geglu", "weighted_quick_geglu", "quick_geglu_back", "weighted_quick_geglu_back"),
              {"linear_offset": 0.5}, GC.Act(1.702, 0.5, None)),
    "clamped": (("clamped_swiglu", "weighted_clamped_swiglu", "clamped_swiglu_back", "weighted_clamped_swiglu_back"),
                {"alpha": 1.702, "limit": 7.0}, GC.Act(1.702, 1.0, 7.0)),
}  # fmt: skip


# y spread to +-3 sigma = +-15, so a limit of 7 clamps about 16% of the values.
_inputs = functools.partial(glu_inputs, scale=5.0)
_assert_close, _assert_dw_close = assert_close_2x, assert_dw_close


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
# Kernels under the CUDA simulator


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
    assert [spec[7] for spec in kernels[::4]] == [GC.Act(1.702, 0.0, None), GC.Act(1.702, 1.0, 7.0)]


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
    assert len({spec for spec in kernels}) == 1 and kernels[0][7] == GC.Act(1.702, 1.0, None)


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
    assert all(spec[7] == GC.Act(1.702, 1.0, None) for spec in kernels)  # the kernels get the biased input, clamp done


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
# Quick-GEGLU and clamped SwiGLU on every device: the CPU on small shapes (CI), CUDA on the large ones (16-byte
# kernels at F = 768, 2048 for every dtype; element kernels at F = 1, 13)

_FAMILY_CASES = [(fam, dt, wd) for fam in FAMILIES for dt in DTYPES for wd in ("fp32", "same")]


def _case_id(case) -> str:
    return "-".join(str(v) for v in case)


@pytest.mark.parametrize(
    "device,case",
    device_cases(
        [(*c, n, f) for c in _FAMILY_CASES for n, f in ((1, 1), (7, 13), (33, 64))],
        [(*c, n, f) for c in _FAMILY_CASES for n in (1, 7, 1027) for f in (1, 13, 768, 2048)],
        ids=_case_id,
    ),
)
def test_family_matches_reference(device, case):
    family, dtype, wdtype, n, f = case
    y, g, w = _inputs(n, f, dtype, torch.float32 if wdtype == "fp32" else dtype, device=device)
    _check_family(family, y, g, w)


def _size(device, cuda_size, cpu_size):
    """The original (large) size on CUDA, a small one for the same check on the CPU (CI's 2 cores)."""
    return cuda_size if device == "cuda" else cpu_size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_three_d_strided_and_dtype_mixes(device, dtype):
    _three_d(5, _size(device, 768, 24), dtype, device)
    _strided(_size(device, 1027, 33), _size(device, 768, 24), dtype, device)
    if dtype is torch.bfloat16:
        _dtype_mixes(9, _size(device, 768, 24), device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_clamp_active_and_special_values(device):
    y, _, _ = _inputs(1027, 768, torch.float32, device=device)
    assert 0.1 < (y.abs() > 7.0).float().mean().item() < 0.3  # the cases above clamp about 16% of the inputs
    _special_values(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dweights_bitwise_deterministic(device, dtype):
    n, f = _size(device, 1027, 33), _size(device, 2048, 64)
    y, g, w = _inputs(n, f, dtype, device=device)
    shifted = torch.zeros(n, 2 * f + 1, device=device, dtype=dtype)[:, 1:].copy_(y)  # element kernels
    for yy in (y, shifted):
        for back in (moe_raw.weighted_clamped_swiglu_back, moe_raw.weighted_quick_geglu_back):
            dy0, dw0 = back(g, yy, w)
            for _ in range(20):
                dy, dw = back(g, yy, w)
                assert torch.equal(dw, dw0) and torch.equal(dy, dy0)


_AUTOGRAD_CASES = [(dt, lead, fp8) for dt in DTYPES for lead in ((), (4,)) for fp8 in (False, True)]


def _autograd_id(case) -> str:
    dtype, lead, fp8 = case
    return f"{dtype}-{'3d' if lead else '2d'}-{fp8}"


@pytest.mark.parametrize("device,case", device_cases(_AUTOGRAD_CASES, _AUTOGRAD_CASES, ids=_autograd_id))
def test_autograd_vs_reference(device, case):
    dtype, lead, fp8 = case
    _impl_vs_megatron(_size(device, 257, 9), _size(device, 768, 24), dtype, fp8, lead, device)


@pytest.mark.parametrize("device", DEVICES)
def test_impl_with_bias_on_device(device):
    _impl_with_bias(_size(device, 257, 9), _size(device, 768, 24), device)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: streams, CUDA graphs


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


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU on every device: the CPU on small shapes (CI), CUDA on the large ones


def _check_swiglu_ops(y, g, w):
    y64, g64, w64 = y.double(), g.double(), w.double()
    _assert_close(S.swiglu(y), R.swiglu(y64), R.swiglu(y), "swiglu")
    _assert_close(S.weighted_swiglu(y, w), R.weighted_swiglu(y64, w64), R.weighted_swiglu(y, w), "weighted_swiglu")
    _assert_close(S.swiglu_back(g, y), R.swiglu_back(g64, y64), R.swiglu_back(g, y), "swiglu_back")
    dy, dw = S.weighted_swiglu_back(g, y, w)
    dy_t, dw_t = R.weighted_swiglu_back(g, y, w)
    dy_r, dw_r = R.weighted_swiglu_back(g64, y64, w64)
    _assert_close(dy, dy_r, dy_t, "weighted_swiglu_back dy")
    _assert_dw_close(dw, dw_r, dw_t, R.swiglu(y64) * g64)


_SWIGLU_CASES = [(dt, wd) for dt in DTYPES for wd in ("fp32", "same")]


@pytest.mark.parametrize(
    "device,case",
    device_cases(
        [(*c, n, f) for c in _SWIGLU_CASES for n, f in ((1, 1), (7, 13), (33, 64))],
        [(*c, n, f) for c in _SWIGLU_CASES for n in (1, 7, 1027) for f in (1, 13, 768, 2048)],
        ids=_case_id,
    ),
)
def test_swiglu_matches_reference(device, case):
    dtype, wdtype, n, f = case
    _check_swiglu_ops(*glu_inputs(n, f, dtype, torch.float32 if wdtype == "fp32" else dtype, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_three_d(device, dtype):
    y, g, w = glu_inputs(5, _size(device, 768, 24), dtype, lead=(3,), device=device)
    _assert_close(S.swiglu(y), R.swiglu(y.double()), R.swiglu(y), "swiglu 3-D")
    _assert_close(S.swiglu_back(g, y), R.swiglu_back(g.double(), y.double()), R.swiglu_back(g, y), "back 3-D")
    out = S.weighted_bias_swiglu_impl(y, torch.rand(15, 1, device=device))
    assert out.shape == (3, 5, y.shape[-1] // 2) and out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_dtype_mixes(device, dtype):
    """g / weights in another dtype than y: the seed's output dtypes (element kernels on CUDA)."""
    f = _size(device, 768, 24)
    for other in DTYPES:
        y, _, _ = glu_inputs(9, f, dtype, device=device)
        g = torch.randn(9, f).to(other).to(device)
        w = torch.rand(9, 1).to(other).to(device)
        dy = S.swiglu_back(g, y)
        dy_t = R.swiglu_back(g, y)
        _assert_close(dy, R.swiglu_back(g.double(), y.double()), dy_t, f"swiglu_back g {other}")
        dyw, dw = S.weighted_swiglu_back(g, y, w)
        dyw_t, dw_t = R.weighted_swiglu_back(g, y, w)
        dyw_r, dw_r = R.weighted_swiglu_back(g.double(), y.double(), w.double())
        _assert_close(dyw, dyw_r, dyw_t, "dy")
        _assert_dw_close(dw, dw_r, dw_t, R.swiglu(y.double()) * g.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_noncontiguous_inputs_and_grads(device, dtype):
    n, f = _size(device, 1027, 33), _size(device, 768, 24)
    y, g, w = glu_inputs(n, f, dtype, device=device)
    ref_out = S.weighted_swiglu(y, w)
    ref_dy, ref_dw = S.weighted_swiglu_back(g, y, w)
    pad = 16 // y.element_size()
    aligned = torch.zeros(n, 2 * f + 2 * pad, device=device, dtype=dtype)[:, pad:-pad]  # strided rows, 16 B aligned
    aligned.copy_(y)
    shifted = torch.zeros(n, 2 * f + 1, device=device, dtype=dtype)[:, 1:]  # misaligned: element kernels
    shifted.copy_(y)
    col_major = y.t().contiguous().t()  # last stride != 1: copied
    w_strided = torch.zeros(n, 4, device=device)[:, 2:3]
    w_strided.copy_(w)
    g_sliced = torch.zeros(n, 2 * f, device=device, dtype=dtype)[:, f:]
    g_sliced.copy_(g)
    for yy in (aligned, shifted, col_major):
        torch.testing.assert_close(S.weighted_swiglu(yy, w_strided), ref_out, rtol=0, atol=0)
        dy, dw = S.weighted_swiglu_back(g_sliced, yy, w_strided)
        torch.testing.assert_close(dy, ref_dy, rtol=0, atol=0)
        # misaligned rows take the element kernels: the same fp32 terms summed in another grouping
        torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4)
    # stride-0 grads: what y.sum().backward() produces
    g0 = torch.ones(n, f, device=device, dtype=dtype)
    for g_exp in (g0[:1].expand(n, f), torch.ones((), device=device, dtype=dtype).expand(n, f)):
        torch.testing.assert_close(S.swiglu_back(g_exp, y), S.swiglu_back(g0, y), rtol=0, atol=0)
    yr = y.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    S.weighted_bias_swiglu_impl(yr, wr).sum().backward()
    dy0, dw0 = R.weighted_swiglu_back(g0.double(), y.double(), w.double())
    _assert_close(yr.grad, dy0, R.weighted_swiglu_back(g0, y, w)[0], "d input from .sum()")


@pytest.mark.parametrize("device,case", device_cases(_AUTOGRAD_CASES, _AUTOGRAD_CASES, ids=_autograd_id))
def test_swiglu_autograd_vs_reference(device, case):
    dtype, lead, fp8 = case
    n, f = _size(device, 257, 9), _size(device, 768, 24)
    y, g, w = glu_inputs(n * (lead[0] if lead else 1), f, dtype, device=device)
    if lead:
        y, g = y.view(lead[0], n, 2 * f), g.view(lead[0], n, f)
    out, *grads = _autograd(lambda a, b: S.weighted_bias_swiglu_impl(a, b, fp8), y, w, g)
    ref, *ref_grads = _autograd(lambda a, b: R.weighted_bias_swiglu_impl(a, b, fp8), y, w, g)
    assert out.shape == ref.shape and grads[0].dtype == ref_grads[0].dtype and grads[1].dtype == ref_grads[1].dtype
    _assert_close(out, R.weighted_bias_swiglu_impl(y.double(), w.double()), ref, "forward")
    y_saved = (y.to(torch.float8_e4m3fn).to(dtype) if fp8 else y).reshape(-1, 2 * f)
    g2 = g.reshape(-1, f)
    dy_r, dw_r = R.weighted_swiglu_back(g2.double(), y_saved.double(), w.double())
    _assert_close(grads[0].reshape(-1, 2 * f), dy_r, ref_grads[0].reshape(-1, 2 * f), "d input")
    _assert_dw_close(grads[1], dw_r, ref_grads[1], R.swiglu(y_saved.double()) * g2.double(), "d weights")
    # the Function itself
    y3, w3 = y.reshape(-1, 2 * f).clone().requires_grad_(True), w.clone().requires_grad_(True)
    S.WeightedSwiGLUFunction.apply(y3, w3, fp8).backward(g2)
    assert torch.equal(y3.grad, grads[0].reshape(-1, 2 * f)) and torch.equal(w3.grad, grads[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_dweights_bitwise_deterministic(device, dtype):
    n, f = _size(device, 1027, 33), _size(device, 2048, 64)
    y, g, w = glu_inputs(n, f, dtype, device=device)
    shifted = torch.zeros(n, 2 * f + 1, device=device, dtype=dtype)[:, 1:].copy_(y)  # 16-byte and element kernels
    for yy in (y, shifted):
        dy0, dw0 = S.weighted_swiglu_back(g, yy, w)
        for _ in range(20):
            dy, dw = S.weighted_swiglu_back(g, yy, w)
            assert torch.equal(dw, dw0) and torch.equal(dy, dy0)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_empty_and_zero_width(device):
    y0 = torch.empty(0, 16, device=device, dtype=torch.bfloat16)
    assert S.swiglu(y0).shape == (0, 8)
    dy, dw = S.weighted_swiglu_back(
        torch.empty(0, 8, device=device, dtype=torch.bfloat16), y0, torch.empty(0, 1, device=device)
    )
    assert dy.shape == (0, 16) and dw.shape == (0, 1)
    dy, dw = S.weighted_swiglu_back(
        torch.empty(4, 0, device=device), torch.empty(4, 0, device=device), torch.ones(4, 1, device=device)
    )
    assert torch.equal(dw, torch.zeros(4, 1, device=device))
    if device == "cuda":
        torch.cuda.synchronize()  # an asynchronous launch error surfaces here, in this test


def test_swiglu_fp8_input_store_cpu_path_is_the_seeds():
    """CPU tensors: moe_raw's Function gives the seed's (reference) outputs and gradients computed in fp32 and
    rounded once, exactly (the fp8 copy of the input is the same from bf16 or from its fp32 widening)."""
    y, g, w = glu_inputs(5, 6, torch.bfloat16)
    ours = _autograd(lambda a, b: S.WeightedSwiGLUFunction.apply(a, b, True), y, w, g)
    ref = _autograd(lambda a, b: R.WeightedSwiGLUFunction.apply(a.float(), b.float(), True).to(a.dtype), y, w, g)
    for o, r in zip(ours, ref, strict=True):
        assert torch.equal(o, r)
    plain = _autograd(lambda a, b: S.WeightedSwiGLUFunction.apply(a, b, False), y, w, g)
    assert torch.equal(ours[0], plain[0])  # forward unaffected
    assert not torch.equal(ours[1], plain[1])  # the gradient sees the fp8 rounding


def test_swiglu_gradcheck_fp64_reference_path():
    y = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: S.WeightedSwiGLUFunction.apply(a, b, False), (y, w))


def test_swiglu_cpu_tensors_run_the_reference_in_fp32():
    """CPU tensors: the reference's formula computed in fp32 and rounded once (the kernels' arithmetic)."""
    y, g, w = glu_inputs(4, 6, torch.float16)
    assert torch.equal(S.swiglu(y), R.swiglu(y.float()).half())
    assert torch.equal(S.swiglu_back(g, y), R.swiglu_back(g.float(), y.float()).half())
    for a, b in zip(
        S.weighted_swiglu_back(g, y, w), R.weighted_swiglu_back(g.float(), y.float(), w.float()), strict=True
    ):
        assert torch.equal(a, b.to(a.dtype))


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU, GPU only: streams, CUDA graphs, a second device


@pytest.mark.gpu
@needs_cuda
def test_swiglu_side_stream(side_stream):
    """Inputs are written on the side stream behind a long sleep: a launch on any other stream reads zeros."""

    def ops(y, g, w):
        return (S.weighted_swiglu(y, w), *S.weighted_swiglu_back(g, y, w))

    expected, got = run_on_side_stream(side_stream, ops, *glu_inputs(1027, 2048, torch.bfloat16, device="cuda"))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_swiglu_cuda_graph_capture_and_replay():
    n, f = 1027, 768
    y, g, w = glu_inputs(n, f, torch.bfloat16, device="cuda")
    S.weighted_swiglu(y, w)  # compile + load before capture
    S.weighted_swiglu_back(g, y, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = S.weighted_swiglu(y, w)
        dy, dw = S.weighted_swiglu_back(g, y, w)
    for _ in range(3):
        y.copy_(torch.randn_like(y, dtype=torch.float32).to(y.dtype))
        g.copy_(torch.randn_like(g, dtype=torch.float32).to(g.dtype))
        w.copy_(torch.rand_like(w))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, S.weighted_swiglu(y, w))
        dy_e, dw_e = S.weighted_swiglu_back(g, y, w)
        assert torch.equal(dy, dy_e) and torch.equal(dw, dw_e)


@pytest.mark.gpu
@needs_two_gpus
def test_swiglu_second_device():
    dev0, dev1 = torch.device("cuda", 0), torch.device("cuda", 1)
    torch.cuda.set_device(0)  # current device 0, tensors on device 1
    y = (torch.randn(257, 1536, device=dev1) * 2).to(torch.bfloat16)
    g = torch.randn(257, 768, device=dev1).to(torch.bfloat16)
    w = torch.rand(257, 1, device=dev1)
    out = S.weighted_swiglu(y, w)
    dy, dw = S.weighted_swiglu_back(g, y, w)
    assert out.device == dev1 and dy.device == dev1 and dw.device == dev1
    ref = (S.weighted_swiglu(y.to(dev0), w.to(dev0)), *S.weighted_swiglu_back(g.to(dev0), y.to(dev0), w.to(dev0)))
    for a, b in zip((out, dy, dw), ref, strict=True):
        assert torch.equal(a.to(dev0), b)
    with torch.cuda.device(1):  # and with device 1 current
        assert torch.equal(S.weighted_swiglu(y, w), out)
