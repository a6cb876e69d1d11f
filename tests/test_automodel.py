"""moe_raw against the package it is a drop-in for: NeMo Automodel 0.7's ``moe_utils`` itself, not a transcription.

Install it without its (heavy) dependencies, as the README's test block does: ``pip install --no-deps
nemo_automodel==0.7.0`` (its ``moe_utils`` needs only torch and packaging). Its functions are wrapped in
``torch.compile``; the tests call the same functions eagerly (the wrapped originals), so CI does not spend minutes
compiling them on a CPU. For every public name both have:

* the signature: the package's parameters, in order, with the same defaults; moe_raw may add parameters after them
  only with defaults (Megatron's ``clamp_value`` / ``alpha`` on ``WeightedQuickGeGLUFunction``);
* the values and the gradients of every differentiable input, on CPU (and CUDA when present): pure moves bit for
  bit against the package in the same dtype; arithmetic within flash-attention's rule against the package run in
  fp64 (|moe_raw - fp64| <= 2 |package in the same dtype - fp64| + one rounding of the dtype).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import DEVICES, make_probs, make_routing

import moe_raw

M = pytest.importorskip(
    "nemo_automodel.components.moe.megatron.moe_utils",
    reason="NeMo Automodel is not installed: pip install --no-deps nemo_automodel==0.7.0",
)

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _eager(fn):
    """The function under torch.compile's wrapper (the package's own eager code)."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


@pytest.fixture
def package(monkeypatch):
    """The package's module with every torch.compile'd function swapped for its eager original."""
    for name, fn in vars(M).items():
        if name != "transformer_engine" and hasattr(fn, "_torchdynamo_orig_callable"):  # TE: a raising placeholder
            monkeypatch.setattr(M, name, fn._torchdynamo_orig_callable)
    return M


def _common_names():
    return sorted(n for n in moe_raw.__all__ if hasattr(M, n))


def test_the_shared_names_are_the_ones_expected():
    # every public function and class of the package's moe_utils is in moe_raw (its torch / TE helpers aside)
    missing = {n for n in vars(M) if not n.startswith("_") and callable(getattr(M, n, None))} - set(moe_raw.__all__)
    assert missing - {"F", "torch", "safe_import_te", "transformer_engine"} == set()


@pytest.mark.parametrize("name", _common_names())
def test_signature_is_the_packages(name):
    ours, theirs = getattr(moe_raw, name), getattr(M, name)
    if inspect.isclass(ours):
        ours, theirs = ours.forward, theirs.forward
    ours_p = list(inspect.signature(ours).parameters.values())
    theirs_p = list(inspect.signature(_eager(theirs)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours_p[: len(theirs_p)]] == [
        (p.name, p.kind, p.default) for p in theirs_p
    ], f"{name}: {inspect.signature(ours)} vs the package's {inspect.signature(_eager(theirs))}"
    extra = ours_p[len(theirs_p) :]
    assert all(p.default is not inspect.Parameter.empty for p in extra), f"{name}: extra parameters need defaults"


def _activation_inputs(device, dtype, n=5, f=8):
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(n, 2 * f, generator=gen) * 3).to(dtype).to(device)
    g = torch.randn(n, f, generator=gen).to(dtype).to(device)
    w = torch.rand(n, 1, generator=gen).to(device)
    return y, g, w


def _outputs_and_grads(fn, inputs, wanted):
    leaves = [t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * (j + 1)).sum() for j, o in enumerate(outs) if o is not None and o.requires_grad)
    grads = []
    if wanted:
        grads = torch.autograd.grad(loss, [leaves[i] for i in wanted])
    return [o.detach() for o in outs if o is not None], [g.detach() for g in grads]


def _check(name, ours, theirs64, theirs_same, dtype):
    for a, b, c in zip(ours, theirs64, theirs_same, strict=True):
        assert a.shape == b.shape and a.dtype == c.dtype, f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{c.dtype}"
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        same = (c.double() - b.double()).abs().max().item() if c.numel() else 0.0
        scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
        assert err <= 2 * same + FLOOR[dtype] * scale, f"{name}: error {err:.3g}, the package's own {same:.3g}"


# (name, arguments builder (y, g, w) -> tuple, indices of differentiable tensor arguments)
ACTIVATION_CASES = [
    ("swiglu", lambda y, g, w: (y,), (0,)),
    ("weighted_swiglu", lambda y, g, w: (y, w), (0, 1)),
    ("swiglu_back", lambda y, g, w: (g, y), ()),
    ("weighted_swiglu_back", lambda y, g, w: (g, y, w), ()),
    ("quick_geglu", lambda y, g, w: (y, 0.5), (0,)),
    ("weighted_quick_geglu", lambda y, g, w: (y, w, 0.5), (0, 1)),
    ("quick_geglu_back", lambda y, g, w: (g, y, 0.5), ()),
    ("weighted_quick_geglu_back", lambda y, g, w: (g, y, w, 0.5), ()),
    ("weighted_bias_swiglu_impl", lambda y, g, w: (y, w, False), (0, 1)),
    ("weighted_bias_quick_geglu_impl", lambda y, g, w: (y, None, w, False, 0.5), (0, 2)),
    ("quick_gelu", lambda y, g, w: (y,), (0,)),
    ("weighted_bias_quick_geglu", lambda y, g, w: (y, y[0] * 0.5, w, 0.5), (0, 1, 2)),
    ("weighted_bias_quick_geglu_back", lambda y, g, w: (g, y, y[0] * 0.5, w, 0.5), ()),
    ("geglu", lambda y, g, w: (y,), (0,)),
    ("weighted_geglu", lambda y, g, w: (y, w), (0, 1)),
    ("geglu_back", lambda y, g, w: (g, y), ()),
    ("weighted_geglu_back", lambda y, g, w: (g, y, w), ()),
    ("weighted_bias_geglu_impl", lambda y, g, w: (y, w, False), (0, 1)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name, args, diff", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_activations_match_the_package(package, name, args, diff, dtype, device):
    y, g, w = _activation_inputs(device, dtype)

    def run(fn, cast):
        tensors = [a.to(cast) if isinstance(a, torch.Tensor) and cast is not None else a for a in args(y, g, w)]
        pos = [i for i, a in enumerate(tensors) if isinstance(a, torch.Tensor)]
        want = [pos.index(i) for i in diff]

        def call(*ts):
            it = iter(ts)
            return fn(*[next(it) if isinstance(a, torch.Tensor) else a for a in tensors])

        return _outputs_and_grads(call, [tensors[i] for i in pos], want)

    ours = run(getattr(moe_raw, name), None)
    theirs64 = run(getattr(package, name), torch.float64)
    theirs = run(getattr(package, name), None)
    _check(name, ours[0], theirs64[0], theirs[0], dtype)
    _check(f"{name} gradients", ours[1], theirs64[1], theirs[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True])
def test_functions_match_the_package(package, device, fp8):
    y, g, w = _activation_inputs(device, torch.bfloat16)
    functions = (("WeightedSwiGLUFunction", ()), ("WeightedGEGLUFunction", ()),
                 ("WeightedQuickGeGLUFunction", (torch.tensor(0.5),)))  # fmt: skip
    for name, extra in functions:
        ours = _outputs_and_grads(
            lambda a, b, n=name, e=extra: getattr(moe_raw, n).apply(a, b, fp8, *e), (y, w), [0, 1]
        )
        t64 = _outputs_and_grads(
            lambda a, b, n=name, e=extra: getattr(package, n).apply(a, b, fp8, *e), (y.double(), w.double()), [0, 1]
        )
        same = _outputs_and_grads(
            lambda a, b, n=name, e=extra: getattr(package, n).apply(a, b, fp8, *e), (y, w), [0, 1]
        )
        _check(name, ours[0] + ours[1], t64[0] + t64[1], same[0] + same[1], torch.bfloat16)
    # forward(ctx, input, bias, weights, fp8_input_store, linear_offset): input, bias and weights get gradients
    bias = y[0].detach() * 0.5
    off = torch.tensor(0.5)
    ours = _outputs_and_grads(
        lambda a, b, c: moe_raw.WeightedBiasQuickGeGLUFunction.apply(a, b, c, fp8, off), (y, bias, w), [0, 1, 2]
    )
    t64 = _outputs_and_grads(
        lambda a, b, c: package.WeightedBiasQuickGeGLUFunction.apply(a, b, c, fp8, off.double()),
        (y.double(), bias.double(), w.double()), [0, 1, 2],
    )  # fmt: skip
    same = _outputs_and_grads(
        lambda a, b, c: package.WeightedBiasQuickGeGLUFunction.apply(a, b, c, fp8, off.to(y.dtype)), (y, bias, w),
        [0, 1, 2],
    )  # fmt: skip
    _check("WeightedBiasQuickGeGLUFunction", ours[0] + ours[1], t64[0] + t64[1], same[0] + same[1], torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["weighted_swiglu_back", "weighted_quick_geglu_back", "weighted_geglu_back"])
def test_need_weight_grad_false_matches_the_package(package, device, name):
    y, g, w = _activation_inputs(device, torch.bfloat16)
    ours = getattr(moe_raw, name)(g, y, w, need_weight_grad=False)
    theirs = getattr(package, name)(g.double(), y.double(), w.double(), need_weight_grad=False)
    same = getattr(package, name)(g, y, w, need_weight_grad=False)
    assert ours[1] is None and theirs[1] is None
    _check(name, ours[:1], theirs[:1], same[:1], torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_aux_loss_scaler_matches_the_package(package, device):
    for scale in (None, 0.25):
        grads = []
        for cls in (moe_raw.MoEAuxLossAutoScaler, package.MoEAuxLossAutoScaler):
            cls.main_loss_backward_scale = None if scale is None else torch.tensor(scale, device=device)
            out = torch.randn(4, 3, device=device, requires_grad=True)
            aux = (out.detach().sum() * 0 + 2.0).requires_grad_()
            y = cls.apply(out, aux)
            grads.append(torch.autograd.grad((y * 3).sum(), (out, aux)))
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), (scale, grads)
    moe_raw.MoEAuxLossAutoScaler.main_loss_backward_scale = package.MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_permute_unpermute_match_the_package(package, device, fused, drop_and_pad):
    """The package's unfused path (TE is not installed, so fused=True falls back to it there): moe_raw's permuted
    rows and probs equal it bit for bit; unfused sorted_indices too; the combine agrees to fp32 rounding."""
    torch.manual_seed(0)
    T, E, K, H = 9, 4, 2, 6
    rm = make_routing(T, E, K, device)
    probs = make_probs(rm)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    n = T * K if drop_and_pad else None
    ours = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=fused, drop_and_pad=drop_and_pad)
    theirs = package.permute(x, rm, probs, num_out_tokens=n, fused=False, drop_and_pad=drop_and_pad)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    if not fused:
        assert torch.equal(ours[2], theirs[2])
    rows = torch.randn(ours[0].shape, device=device).to(torch.bfloat16)
    y = moe_raw.unpermute(rows, ours[2], x.shape, probs, None if fused else rm, fused, drop_and_pad)
    ref = package.unpermute(rows.double(), theirs[2], x.shape, probs.double(), rm, False, drop_and_pad)
    torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3)
