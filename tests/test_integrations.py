"""``moe_raw.integrations.apply_to_automodel()`` on the installed NeMo Automodel 0.7 (CPU): it patches the module and
every module that imported the functions by name, reports it, is idempotent, and ``undo_automodel()`` restores the
package exactly. A patched Automodel call then runs moe_raw (same results as the package's own code)."""

from __future__ import annotations

import importlib

import pytest
import torch

import moe_raw
from moe_raw import integrations

M = pytest.importorskip(
    "nemo_automodel.components.moe.megatron.moe_utils",
    reason="NeMo Automodel is not installed: pip install --no-deps nemo_automodel==0.7.0",
)
experts = importlib.import_module("nemo_automodel.components.moe.experts")
dispatcher = importlib.import_module("nemo_automodel.components.moe.megatron.token_dispatcher")


@pytest.fixture
def restore():
    yield
    integrations.undo_automodel()


def test_the_swapped_names():
    # permute / unpermute, the SwiGLU, GEGLU and Quick-GEGLU families (not MoEAuxLossAutoScaler: NOT_SWAPPED)
    assert len(integrations.automodel_names(M)) == 23
    assert {"permute", "geglu", "weighted_bias_geglu_impl"} <= set(integrations.automodel_names(M))


def test_apply_patches_the_module_and_its_importers(restore):
    originals = {n: getattr(M, n) for n in integrations.automodel_names(M)}
    patched = integrations.apply_to_automodel()
    for name in integrations.automodel_names(M):
        assert getattr(M, name) is getattr(moe_raw, name), name
        assert f"{M.__name__}:{name}" in patched
    assert experts.weighted_bias_swiglu_impl is moe_raw.weighted_bias_swiglu_impl
    assert dispatcher.permute is moe_raw.permute and dispatcher.unpermute is moe_raw.unpermute
    assert f"{experts.__name__}:weighted_bias_swiglu_impl" in patched
    assert f"{dispatcher.__name__}:permute" in patched
    assert experts.weighted_bias_geglu_impl is moe_raw.weighted_bias_geglu_impl  # Gemma4's experts
    assert M.MoEAuxLossAutoScaler is not moe_raw.MoEAuxLossAutoScaler
    assert integrations.apply_to_automodel() == []  # idempotent
    restored = integrations.undo_automodel()
    assert sorted(restored) == sorted(patched)
    for name, fn in originals.items():
        assert getattr(M, name) is fn, name
    assert experts.weighted_bias_swiglu_impl is originals["weighted_bias_swiglu_impl"]
    assert experts.weighted_bias_geglu_impl is originals["weighted_bias_geglu_impl"]
    assert dispatcher.permute is originals["permute"]
    assert integrations.undo_automodel() == []


def test_module_imported_after_apply_gets_moe_raw(restore):
    integrations.apply_to_automodel()
    reloaded = importlib.reload(dispatcher)  # runs `from .moe_utils import permute, unpermute` again
    assert reloaded.permute is moe_raw.permute
    integrations.undo_automodel()
    importlib.reload(dispatcher)
    assert dispatcher.permute is not moe_raw.permute


def test_patched_call_matches_the_package(restore):
    torch.manual_seed(0)
    y = torch.randn(6, 16)
    w = torch.rand(6, 1)
    weighted_swiglu = getattr(M.weighted_swiglu, "_torchdynamo_orig_callable", M.weighted_swiglu)  # eager
    expected = weighted_swiglu(y, w)
    integrations.apply_to_automodel()
    yl = y.clone().requires_grad_()
    got = experts.weighted_bias_swiglu_impl(yl, w)  # Automodel's expert code path, now moe_raw's
    assert got.grad_fn is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
