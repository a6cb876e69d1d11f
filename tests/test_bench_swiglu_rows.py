"""CPU tests of bench/bench_swiglu.py's op table (the SwiGLU, Quick-GEGLU and clamped SwiGLU rows) and its CLI.

The timing itself needs CUDA; here: every activation op of moe_raw.activations has a row, the argument builders fit the
seed's functions, the byte models equal the SwiGLU counterparts', the closeness check, and --activations.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import moe_raw
from bench import __main__ as cli
from bench import bench_swiglu as B
from moe_raw import reference

swiglu_module = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")

# Forward / backward ops of moe_raw.activations without a row, and why. Everything else in its __all__ that is a plain
# function (not a class, not a *_impl autograd wrapper) must be in B.OPS.
NOT_BENCHED = {
    "swiglu_back": "the SwiGLU rows stay as python -m bench runs them (fwd, weighted fwd, weighted bwd)",
    "quick_gelu": "an elementwise torch helper (NeMo Automodel's), no kernel of moe_raw's",
    "weighted_bias_quick_geglu": "a torch bias add, then weighted_quick_geglu's kernels (which have rows)",
    "weighted_bias_quick_geglu_back": "a torch bias add, then weighted_quick_geglu_back's kernels (which have rows)",
}


def _activation_ops() -> set:
    return {
        name
        for name in moe_raw.__all__
        if hasattr(swiglu_module, name)
        if inspect.isfunction(getattr(swiglu_module, name)) and not name.endswith("_impl")
    }


def test_every_activation_op_has_a_row():
    ops = _activation_ops()
    assert {"quick_geglu", "weighted_clamped_swiglu_back"} <= ops  # the filter finds the variants
    benched = {op.fn for op in B.OPS.values()}
    missing = ops - benched - set(NOT_BENCHED)
    assert not missing, f"moe_raw.activations ops without a bench_swiglu.OPS row: {sorted(missing)}"
    assert not set(NOT_BENCHED) & benched  # stale exclusion


@pytest.mark.parametrize("row", list(B.OPS))
def test_row_wires_the_same_function_on_both_sides(row):
    op = B.OPS[row]
    assert op.family in B.ACTIVATIONS
    assert op.moe_raw is getattr(swiglu_module, op.fn)
    assert op.seed is getattr(reference, op.fn)
    assert op.moe_raw.__name__ == op.seed.__name__ == op.fn
    assert row == f"{op.fn.removesuffix('_back')} {op.kind.split()[-1]}"  # "weighted_quick_geglu bwd"
    assert op.kind.startswith("weighted") == op.fn.startswith("weighted_")


def test_every_family_has_forward_weighted_forward_and_weighted_backward():
    for family in B.ACTIVATIONS:
        kinds = {op.kind for op in B.OPS.values() if op.family == family}
        assert {"fwd", "weighted fwd", "weighted bwd"} <= kinds, family


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", list(B.OPS))
def test_args_fit_the_seed_on_cpu(row, dtype):
    n, f = 6, 8
    y, g, w = B._inputs(n, f, dtype, device="cpu")
    op = B.OPS[row]
    out = op.seed(*op.args(y, g, w))
    if op.kind == "weighted bwd":
        dy, dw = out
        assert dy.shape == (n, 2 * f) and dy.dtype == dtype
        assert dw.shape == (n, 1) and dw.dtype == w.dtype
    elif op.kind == "bwd":
        assert out.shape == (n, 2 * f) and out.dtype == dtype
    else:
        assert out.shape == (n, f) and out.dtype == dtype
    if dtype == torch.float32:  # moe_raw on CPU tensors runs the same reference: the same fp32 math
        assert B.check_op(row, y, g, w) == ""


def test_variant_args_carry_the_constants():
    y, g, w = B._inputs(2, 4, device="cpu")
    assert B.OPS["quick_geglu fwd"].args(y, g, w)[1:] == (B.QUICK_GEGLU_OFFSET,)
    assert B.OPS["weighted_clamped_swiglu bwd"].args(y, g, w)[3:] == (B.CLAMPED_ALPHA, B.CLAMPED_LIMIT)
    assert B.OPS["weighted_clamped_swiglu bwd"].args(y, g, w)[:3] == (g, y, w)


def test_check_op_reports_a_mismatch(monkeypatch):
    y, g, w = B._inputs(16, 32, torch.float32, device="cpu")
    row = "quick_geglu fwd"
    monkeypatch.setitem(B.OPS, row, B.OPS[row]._replace(moe_raw=lambda y, off: reference.swiglu(y)))
    msg = B.check_op(row, y, g, w)
    assert msg.startswith("output 0:") and "Mismatched elements" in msg and "\n" not in msg
    row = "weighted_swiglu bwd"  # dweights (output 1) off by 1, dy right

    def off_by_one(g, y, w):
        dy, dw = reference.weighted_swiglu_back(g, y, w)
        return dy, dw + 1

    monkeypatch.setitem(B.OPS, row, B.OPS[row]._replace(moe_raw=off_by_one))
    assert B.check_op(row, y, g, w).startswith("output 1: Mismatched elements")
    monkeypatch.setitem(B.OPS, row, B.OPS[row]._replace(moe_raw=lambda g, y, w: (off_by_one(g, y, w)[0], w.double())))
    assert B.check_op(row, y, g, w) == "output 1: dtype torch.float64, the seed's torch.float32"


def _fp64_rounded_once(seed):
    """The seed computed in fp64 from the same values, each output rounded once to the seed's dtype: a stand-in for
    moe_raw's kernels (one rounding of a slightly different higher-precision result, so a last-bit flip here and there,
    and another summation order for dweights)."""

    def run(*args):
        dtypes = [t.dtype for t in args if isinstance(t, torch.Tensor)]
        out = seed(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        if isinstance(out, tuple):
            return out[0].to(dtypes[1]), out[1].to(dtypes[2])  # (dy in y's dtype, dweights in the weights')
        return out.to(dtypes[0])  # y's (fwd: y, ...; bwd: g, y)

    return run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("row", list(B.OPS))
def test_check_op_accepts_one_rounding_of_exact_math(row, dtype, monkeypatch):
    y, g, w = B._inputs(256, 768, dtype, device="cpu")
    y = (y.float() * 3).to(dtype)  # reach the clamp (limit 7) and sigmoid's tails
    op = B.OPS[row]
    monkeypatch.setitem(B.OPS, row, op._replace(moe_raw=_fp64_rounded_once(op.seed)))
    assert B.check_op(row, y, g, w) == ""


def test_check_op_reference_is_fp32_math_not_the_bf16_chain(monkeypatch):
    # The seed's eager bf16 path rounds each intermediate; near sigmoid's tails it is off by more than bf16 tolerance
    # from fp32 math rounded once. check_op compares with the latter, so such a "moe_raw" is flagged, not accepted.
    y, g, w = B._inputs(256, 768, torch.bfloat16, device="cpu")
    y = (y.float() * 3).to(torch.bfloat16)
    row = "weighted_quick_geglu bwd"
    assert B.check_op(row, y, g, w) == ""  # moe_raw's CPU path: fp32 math rounded once
    monkeypatch.setitem(B.OPS, row, B.OPS[row]._replace(moe_raw=B.OPS[row].seed))  # the seed's bf16 chain
    assert B.check_op(row, y, g, w) != ""


@pytest.mark.parametrize("row", list(B.OPS))
def test_byte_models_match_the_swiglu_counterparts(row):
    n, f, s, ws = 10, 4, 2, 4
    counterpart = {
        "fwd": B.bytes_swiglu_fwd(n, f, s),
        "weighted fwd": B.bytes_weighted_swiglu_fwd(n, f, s, ws),
        "bwd": n * (f + 2 * f + 2 * f) * s,  # read g, y; write dy
        "weighted bwd": B.bytes_weighted_swiglu_bwd(n, f, s, ws),
    }[B.OPS[row].kind]
    assert B._bytes(row, n, f, s, ws) == counterpart


def test_providers_default_is_the_swiglu_family_as_python_m_bench_uses_it():
    y, g, w = B._inputs(2, 4, device="cpu")
    default = B._providers()
    assert set(default) == {"moe_raw", "seed eager", "torch.compile(seed)"}
    for fns in default.values():
        assert list(B._calls(fns, y, g, w)) == list(cli.SWIGLU_CALLS.values())
    every = B._providers(B.ACTIVATIONS)
    for fns in every.values():
        assert list(B._calls(fns, y, g, w)) == list(B.OPS)
    only = B._providers(("clamped_swiglu",))["moe_raw"]
    assert set(B._calls(only, y, g, w)) == {r for r, op in B.OPS.items() if op.family == "clamped_swiglu"}


def test_calls_run_on_cpu():
    y, g, w = B._inputs(3, 4, device="cpu")
    fns = B._providers(B.ACTIVATIONS)["seed eager"]
    for row, call in B._calls(fns, y, g, w).items():
        out = call()
        assert (out[0] if isinstance(out, tuple) else out).shape[0] == 3, row


def test_cli_activations_flag():
    assert B.parse_args([]).activations == B.ACTIVATIONS == ("swiglu", "geglu", "quick_geglu", "clamped_swiglu")
    assert B.parse_args(["--activations", "all"]).activations == B.ACTIVATIONS
    assert B.parse_args(["--activations", "swiglu"]).activations == ("swiglu",)
    a = B.parse_args(["--activations", "clamped_swiglu, quick_geglu", "--quick", "--out", "x.json"])
    assert a.activations == ("quick_geglu", "clamped_swiglu") and a.quick and a.out == "x.json"


@pytest.mark.parametrize("bad", ["gelu", "", "swiglu,nope"])
def test_cli_rejects_unknown_activations(bad, capsys):
    with pytest.raises(SystemExit) as e:
        B.parse_args(["--activations", bad])
    assert e.value.code == 2 and "--activations" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_main_without_cuda_exits_0(capsys):
    assert B.main(["--quick", "--activations", "swiglu"]) == 0
    assert "no CUDA device found" in capsys.readouterr().out
