"""The gated activations' API, on the CPU (CI): the torch reference against autograd of the forward formula in
fp64, Megatron's torch-op clamp and gpt-oss's interleaved layout; names and signatures (Megatron-LM's and NeMo
Automodel's); bad input raising ValueError / TypeError naming the argument; documented fp8 precision.

Values, autograd and dtypes of the ops on CPU and CUDA are tests/test_activations.py.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from conftest import glu_inputs

import moe_raw
from moe_raw import reference as R

S = importlib.import_module("moe_raw.activations")


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
    y, g, w = (t.double() for t in glu_inputs(3, 8, torch.float32, scale=5.0))
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
# SwiGLU validation: ValueError / TypeError naming the argument


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: S.swiglu(torch.ones(3, 5)), ValueError, "last dim of y must be even"),
        (lambda: S.swiglu(torch.tensor(1.0)), ValueError, "y must have a last dimension"),
        (lambda: S.swiglu(torch.ones(3, 4, dtype=torch.int32)), TypeError, "y must be float32"),
        (lambda: S.swiglu([[1.0, 2.0]]), TypeError, "y must be a torch.Tensor"),
        (lambda: S.weighted_swiglu(torch.ones(2, 3, 4), torch.ones(2, 1)), ValueError, "y must be 2-D"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), torch.ones(3)), ValueError, r"weights must be \[N, 1\]"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), torch.ones(3, 2)), ValueError, r"weights must be \[N, 1\]"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), torch.ones(4, 1)), ValueError, r"weights must be \[N, 1\]"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), torch.ones(3, 1, dtype=torch.int64)), TypeError, "weights"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), None), TypeError, "weights must be a torch.Tensor"),
        (lambda: S.weighted_swiglu(torch.ones(3, 4), torch.ones(3, 1, device="meta")), ValueError, "device"),
        (lambda: S.swiglu_back(torch.ones(3, 3), torch.ones(3, 4)), ValueError, r"g must be \[..., F\]"),
        (lambda: S.swiglu_back(torch.ones(3, 2, dtype=torch.int8), torch.ones(3, 4)), TypeError, "g must be"),
        (lambda: S.swiglu_back(torch.ones(3, 2, device="meta"), torch.ones(3, 4)), ValueError, "g is on"),
        (lambda: S.weighted_swiglu_back(torch.ones(3, 2), torch.ones(3, 4), torch.ones(2, 1)), ValueError, "weights"),
        (lambda: S.weighted_swiglu_back(torch.ones(3, 2), torch.ones(3, 5), torch.ones(3, 1)), ValueError, "even"),
        (lambda: S.weighted_bias_swiglu_impl(torch.ones(2, 2, 2, 4), torch.ones(8, 1)), ValueError, "2-D"),
        (lambda: S.weighted_bias_swiglu_impl(torch.ones(2, 4), torch.ones(2, 1), "yes"), TypeError, "fp8_input_store"),
        (lambda: S.WeightedSwiGLUFunction.apply(torch.ones(2, 3), torch.ones(2, 1), False), ValueError, "even"),
    ],
)
def test_swiglu_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bias_is_rejected_as_in_the_seed():
    x, bias, w = torch.ones(2, 8), torch.ones(8), torch.ones(2, 1)
    with pytest.raises(NotImplementedError, match="[Bb]ias is not supported"):
        S.weighted_bias_swiglu_impl(x, bias, w)  # Megatron's (input, bias, weights)
    with pytest.raises(NotImplementedError, match="[Bb]ias is not supported"):
        S.weighted_bias_swiglu_impl(x, None, w)


def test_swiglu_fp8_precision_stated_in_docstring():
    doc = S.WeightedSwiGLUFunction.__doc__
    assert "float8_e4m3fn" in doc and "2^-4" in doc and "448" in doc
    assert "WeightedSwiGLUFunction" in S.weighted_bias_swiglu_impl.__doc__
