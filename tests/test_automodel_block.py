"""The real NeMo Automodel 0.7 MoE expert block, stock and after ``moe_raw.integrations.apply_to_automodel()``
(bench/automodel_block.py builds it: ``GroupedExpertsDeepEP`` behind the package's own ``MoEFlexTokenDispatcher`` /
``_DeepepManager``, whose ``permute`` / ``unpermute`` moe_raw replaces, at expert-parallel size 1 with DeepEP's
dispatch and combine as the identity, on one gloo rank).

Checked: the block built after the switch really runs moe_raw (its dispatcher module's permute / unpermute and its
activation are moe_raw's), and its output and the gradients of the tokens, the routing weights and both expert
weight tensors equal the stock block's (fp32 on the CPU in CI: within a few fp32 roundings; bf16 on CUDA on the GPU
machine: within bf16's relative error), for SwiGLU and Gemma4's GEGLU experts. ``python -m bench --ops automodel``
times both on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICES

import moe_raw
from bench import automodel_block as AB
from moe_raw import integrations

pytest.importorskip(
    "nemo_automodel.components.moe.experts",
    reason="NeMo Automodel is not installed: pip install --no-deps nemo_automodel==0.7.0",
)
X, T, _ = AB.modules()

E, K, H, F, TOKENS = 8, 2, 32, 16, 24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation, impl", [("swiglu", "weighted_bias_swiglu_impl"),
                                              ("geglu", "weighted_bias_geglu_impl")])  # fmt: skip
def test_patched_block_matches_the_stock_block(device, activation, impl):
    """fp32 on the CPU (within a few fp32 roundings); bf16 on CUDA, where the stock block's grouped GEMMs run
    (torch._grouped_mm takes bf16 there): the activations round differently, so the relative error of each tensor
    is held to bf16's (2^-8), far below what a misplaced row or a lost gradient gives."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    weights = tuple((torch.randn(shape) * 0.2).to(device, dtype) for shape in ((E, H, 2 * F), (E, F, H)))
    x, logits = torch.randn(TOKENS, H).to(device, dtype), torch.randn(TOKENS, E, device=device)
    with warnings.catch_warnings(), AB.process_group(device) as mesh, AB.identity_deepep():
        warnings.simplefilter("ignore")
        stock_block = AB.build(mesh, activation, weights, E, K, dtype)
        assert stock_block.expert_activation is getattr(X, impl) is not getattr(moe_raw, impl)
        stock = AB.step(stock_block, x, logits, K)
        try:
            integrations.apply_to_automodel()
            patched_block = AB.build(mesh, activation, weights, E, K, dtype)  # built after the switch (README)
            assert patched_block.expert_activation is getattr(moe_raw, impl)
            assert T.permute is moe_raw.permute and T.unpermute is moe_raw.unpermute
            patched = AB.step(patched_block, x, logits, K)
        finally:
            integrations.undo_automodel()
    names = ("y", "d tokens", "d routing weights", "d gate_and_up_projs", "d down_projs")
    for name, a, b in zip(names, patched, stock, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{activation}: {name}")
        else:
            rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert rel < 2**-8, f"{activation}: {name}: relative error {rel:.1e}"


def test_identity_deepep_restores_the_package():
    before = (T.fused_dispatch, T.fused_combine)
    with AB.identity_deepep():
        assert T.fused_dispatch is not before[0]
    assert (T.fused_dispatch, T.fused_combine) == before
