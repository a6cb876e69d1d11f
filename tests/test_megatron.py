"""``moe_raw.integrations.apply_to_megatron()`` on an installed Megatron-LM (``pip install --no-deps
megatron-core==0.16.1``; the modules it patches import with torch alone), CPU (and CUDA where present): it swaps
exactly ``MEGATRON_MODULES``' names, in those modules and in every ``megatron`` module holding the same object, is
idempotent and undone by ``undo_megatron()``; and each swapped function gives Megatron's results (pure moves bit for
bit; arithmetic within flash-attention's rule against Megatron's own function run in fp64).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from conftest import DEVICES, assert_close_2x, make_probs, make_routing

import moe_raw
from moe_raw import integrations

with warnings.catch_warnings():  # megatron.core warns that Transformer Engine and Apex are absent
    warnings.simplefilter("ignore")
    MOE = pytest.importorskip(
        "megatron.core.transformer.moe.moe_utils",
        reason="megatron-core is not installed: pip install --no-deps megatron-core==0.16.1",
    )
    SWIGLU = importlib.import_module("megatron.core.fusions.fused_bias_swiglu")
    GEGLU = importlib.import_module("megatron.core.fusions.fused_bias_geglu")

MODULES = {m.__name__: m for m in (MOE, SWIGLU, GEGLU)}


@pytest.fixture
def restore():
    yield
    integrations.undo_megatron()


def test_apply_patches_exactly_the_listed_names_and_undoes(restore):
    originals = {(m, n): getattr(MODULES[m], n) for m, names in integrations.MEGATRON_MODULES.items() for n in names}
    patched = integrations.apply_to_megatron()
    for (m, n), original in originals.items():
        assert getattr(MODULES[m], n) is getattr(moe_raw, n) and original is not getattr(moe_raw, n), (m, n)
        assert f"{m}:{n}" in patched
    # left alone: different signatures or a GPU tensor argument (module docstring)
    assert SWIGLU.weighted_bias_swiglu_impl is not moe_raw.weighted_bias_swiglu_impl
    assert GEGLU.WeightedQuickGeGLUFunction is not moe_raw.WeightedQuickGeGLUFunction
    assert MOE.MoEAuxLossAutoScaler is not moe_raw.MoEAuxLossAutoScaler
    assert integrations.apply_to_megatron() == []  # idempotent
    assert integrations.undo_megatron() == patched
    for (m, n), original in originals.items():
        assert getattr(MODULES[m], n) is original, (m, n)
    assert integrations.undo_megatron() == []


@pytest.mark.parametrize("device", DEVICES)
def test_megatrons_own_impl_runs_moe_raws_function(restore, device):
    y = torch.randn(6, 16, device=device)
    w = torch.rand(6, 1, device=device)
    expected = SWIGLU.weighted_bias_swiglu_impl(y, None, w)
    integrations.apply_to_megatron()
    yl = y.clone().requires_grad_()
    got = SWIGLU.weighted_bias_swiglu_impl(yl, None, w)  # Megatron's wrapper, moe_raw's WeightedSwiGLUFunction
    assert type(got.grad_fn) is moe_raw.WeightedSwiGLUFunction._backward_cls  # grad_fn=<WeightedSwiGLUFunctionBackward>
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# name -> (arguments from (y, g, w, bias), indices of the differentiable tensor arguments)
CASES = {
    "swiglu": (lambda y, g, w, b: (y,), (0,)),
    "swiglu_back": (lambda y, g, w, b: (g, y), ()),
    "weighted_swiglu": (lambda y, g, w, b: (y, w), (0, 1)),
    "weighted_swiglu_back": (lambda y, g, w, b: (g, y, w), ()),
    "geglu": (lambda y, g, w, b: (y,), (0,)),
    "geglu_back": (lambda y, g, w, b: (g, y), ()),
    "quick_geglu": (lambda y, g, w, b: (y, 0.5), (0,)),
    "quick_geglu_back": (lambda y, g, w, b: (g, y, 0.5), ()),
    "weighted_quick_geglu": (lambda y, g, w, b: (y, w, 0.5), (0, 1)),
    "weighted_quick_geglu_back": (lambda y, g, w, b: (g, y, w, 0.5), ()),
    "weighted_bias_quick_geglu": (lambda y, g, w, b: (y, b, w, 0.5), (0, 1, 2)),
    "weighted_bias_quick_geglu_back": (lambda y, g, w, b: (g, y, b, w, 0.5), ()),
    "weighted_bias_quick_geglu_impl": (lambda y, g, w, b: (y, b, w, False, 0.5, 3.0), (0, 1, 2)),
}


def _run(fn, args, diff):
    leaves = [a.detach().clone().requires_grad_(i in diff) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]  # fmt: skip
    out = fn(*leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    grads = []
    if diff:
        loss = sum((o.double() * (j + 1)).sum() for j, o in enumerate(outs))
        grads = list(torch.autograd.grad(loss, [leaves[i] for i in diff]))
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def test_cases_cover_every_swapped_activation():
    swapped = {n for names in integrations.MEGATRON_MODULES.values() for n in names}
    router = {
        "topk_routing_with_score_function",
        "compute_routing_scores_for_aux_loss",
        "switch_load_balancing_loss_func",
        "z_loss_func",
    }  # checked against Megatron in test_router.py
    assert swapped - set(CASES) == {"permute", "unpermute", "sort_chunks_by_idxs", "WeightedSwiGLUFunction"} | router


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_swapped_activation_matches_megatron(name, dtype, device):
    module = GEGLU if name in integrations.MEGATRON_MODULES[GEGLU.__name__] else SWIGLU
    theirs = getattr(module, name)
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(5, 16, generator=gen) * 3).to(dtype).to(device)
    g = torch.randn(5, 8, generator=gen).to(dtype).to(device)
    w = torch.rand(5, 1, generator=gen).to(device)
    b = (torch.randn(16, generator=gen) * 0.5).to(dtype).to(device)
    make, diff = CASES[name]
    ours = _run(getattr(moe_raw, name), make(y, g, w, b), diff)
    ref64 = _run(theirs, [a.double() if isinstance(a, torch.Tensor) else a for a in make(y, g, w, b)], diff)
    same = _run(theirs, make(y, g, w, b), diff)
    assert len(ours) == len(ref64) == len(same), name
    for k, (a, r, s) in enumerate(zip(ours, ref64, same, strict=True)):
        assert_close_2x(a, r, s, f"{name} output/gradient {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_swapped_permute_unpermute_sort_chunks_match_megatron(device, drop_and_pad):
    T, E, H, K = 37, 8, 24, 2
    routing_map = make_routing(T, E, K, device)
    probs = make_probs(routing_map).to(device)
    x = torch.randn(T, H, device=device)
    n_out = E * 6 if drop_and_pad else None
    got = moe_raw.permute(x, routing_map, probs, n_out, drop_and_pad=drop_and_pad)
    want = MOE.permute(x, routing_map, probs, n_out, drop_and_pad=drop_and_pad)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)  # pure moves
    back = moe_raw.unpermute(got[0], got[2], (T, H), probs, routing_map, drop_and_pad=drop_and_pad)
    back_m = MOE.unpermute(want[0], want[2], (T, H), probs, routing_map, drop_and_pad=drop_and_pad)
    torch.testing.assert_close(back, back_m, rtol=1e-6, atol=1e-6)
    splits = torch.tensor([5, 0, 9, 3])
    order = torch.tensor([2, 0, 3, 1])
    rows = torch.randn(17, H, device=device)
    assert torch.equal(
        moe_raw.sort_chunks_by_idxs(rows, splits, order)[0], MOE.sort_chunks_by_idxs(rows, splits, order)[0]
    )


def test_a_grown_signature_is_left_alone(restore, monkeypatch):
    # a permute that grew a parameter neither moe_raw.permute nor moe_raw.megatron.permute takes
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
                tokens_per_expert=None, align_size=0, capacity_factor=None):  # fmt: skip
        raise AssertionError("not called")

    monkeypatch.setattr(MOE, "permute", permute)
    with pytest.warns(RuntimeWarning, match=r"moe_utils\.permute has a signature moe_raw's does not take"):
        patched = integrations.apply_to_megatron()
    assert MOE.permute is permute and f"{MOE.__name__}:permute" not in patched
    assert MOE.unpermute is moe_raw.unpermute


# Megatron-LM main's signatures (moe_utils.py): the 5-value permute with and without the batch-invariant flag (the
# align_size default is -1 in one version, 0 in another), and the unpermute with pad_offsets (and the inverse map).
def _main_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
                  tokens_per_expert=None, align_size=-1, return_batch_invariant_inverse_map=False):  # fmt: skip
    raise AssertionError("not called")


def _main_permute_no_inverse(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
                             tokens_per_expert=None, align_size=0):  # fmt: skip
    raise AssertionError("not called")


def _main_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
                    drop_and_pad=False, pad_offsets=None, batch_invariant_inverse_map=None):  # fmt: skip
    raise AssertionError("not called")


def _main_unpermute_no_inverse(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None,
                               fused=False, drop_and_pad=False, pad_offsets=None):  # fmt: skip
    raise AssertionError("not called")


@pytest.mark.parametrize(
    "fns", [(_main_permute, _main_unpermute), (_main_permute_no_inverse, _main_unpermute_no_inverse)],
    ids=["with-inverse-map", "without"],
)  # fmt: skip
def test_main_signatures_get_moe_raw_megatron(restore, monkeypatch, fns):
    from moe_raw import megatron

    permute, unpermute = fns
    monkeypatch.setattr(MOE, "permute", permute)
    monkeypatch.setattr(MOE, "unpermute", unpermute)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left alone
        patched = integrations.apply_to_megatron()
    assert MOE.permute is megatron.permute and MOE.unpermute is megatron.unpermute
    assert {f"{MOE.__name__}:permute", f"{MOE.__name__}:unpermute"} <= set(patched)
    assert MOE.sort_chunks_by_idxs is moe_raw.sort_chunks_by_idxs  # the 0.16.1 names beside them as before
    x, rm = torch.randn(4, 8), make_routing(4, 3, 2)
    out, _, idx, fourth, fifth = MOE.permute(x, rm, None, 8)  # main's 5 values
    assert fourth is None and fifth is None and torch.equal(MOE.unpermute(out, idx, x.shape), 2 * x)
    assert integrations.apply_to_megatron() == []  # idempotent
    restored = integrations.undo_megatron()
    assert restored == patched
    assert MOE.permute is permute and MOE.unpermute is unpermute


def test_a_changed_main_default_is_left_alone(restore, monkeypatch):
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
                tokens_per_expert=None, align_size=16, return_batch_invariant_inverse_map=False):  # fmt: skip
        raise AssertionError("not called")

    monkeypatch.setattr(MOE, "permute", permute)
    with pytest.warns(RuntimeWarning, match=r"moe_utils\.permute has a signature"):
        integrations.apply_to_megatron()
    assert MOE.permute is permute


def test_apply_to_megatron_switches_the_router_where_megatron_imported_it():
    """Megatron's TopKRouter module imports the router functions by name: both it and moe_utils get moe_raw's."""
    router = pytest.importorskip("megatron.core.transformer.moe.router")
    names = ("topk_routing_with_score_function", "compute_routing_scores_for_aux_loss",
             "switch_load_balancing_loss_func", "z_loss_func")  # fmt: skip
    before = {n: getattr(router, n) for n in names if hasattr(router, n)}
    assert before, "megatron's router module imports none of the router functions"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            patched = integrations.apply_to_megatron()
            for n in before:
                assert getattr(router, n) is getattr(moe_raw, n) and f"{router.__name__}:{n}" in patched
        finally:
            integrations.undo_megatron()
    assert {n: getattr(router, n) for n in before} == before
