"""The real NeMo Automodel 0.7 MoE expert block, stock and after ``moe_raw.integrations.apply_to_automodel()``:
``GroupedExpertsDeepEP`` (grouped GEMMs, the expert activation ``weighted_bias_swiglu_impl`` / Gemma4's
``weighted_bias_geglu_impl``) behind the package's own ``MoEFlexTokenDispatcher`` / ``_DeepepManager``, whose
``permute`` / ``unpermute`` moe_raw replaces. It runs at expert-parallel size 1 with DeepEP's dispatch and combine
as the identity (DeepEP is not installed; at EP 1 its all-to-all moves nothing), on one gloo rank.

Checked: the patched block's output and the gradients of the tokens, the routing weights and both expert weight
tensors equal the stock block's within a few fp32 roundings; and the patched block really ran moe_raw (its
dispatcher module and its activation are moe_raw's functions). CPU in CI (fp32; torch._grouped_mm); the CUDA run and
the step-time rows belong to the GPU machine.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import moe_raw
from moe_raw import integrations

pytest.importorskip(
    "nemo_automodel.components.moe.experts",
    reason="NeMo Automodel is not installed: pip install --no-deps nemo_automodel==0.7.0",
)
X = importlib.import_module("nemo_automodel.components.moe.experts")
T = importlib.import_module("nemo_automodel.components.moe.megatron.token_dispatcher")
MoEConfig = importlib.import_module("nemo_automodel.components.moe.config").MoEConfig

E, K, H, F, TOKENS = 8, 2, 32, 16, 24


@pytest.fixture(scope="module")
def mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


@pytest.fixture
def identity_deepep(monkeypatch):
    """DeepEP's dispatch / combine at EP size 1: tokens stay, per-expert counts from the indices."""

    def dispatch(hidden, indices, probs, num_experts, group, **_):
        return hidden, indices, probs, torch.bincount(indices[indices >= 0], minlength=num_experts), None

    monkeypatch.setattr(T, "fused_dispatch", dispatch)
    monkeypatch.setattr(T, "fused_combine", lambda hidden, group, handle, **_: (hidden, None))
    monkeypatch.setattr(T.MoEFlexTokenDispatcher, "shared_deepep_manager", None, raising=False)


class _Size2:
    """The Flex dispatcher asserts TP x EP > 1; this group answers 2 to that check, then the block runs EP 1."""

    def size(self):
        return 2

    def rank(self):
        return 0


def _block(mesh, activation, weights):
    from torch.distributed.tensor import Replicate, distribute_tensor

    cfg = MoEConfig(
        n_routed_experts=E, n_shared_experts=0, n_activated_experts=K, n_expert_groups=1, n_limited_groups=1,
        train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
        dim=H, inter_dim=F, moe_inter_dim=F, norm_topk_prob=False, expert_activation=activation, dtype=torch.float32,
    )  # fmt: skip
    block = X.GroupedExpertsDeepEP(cfg)
    up, down = weights
    block.gate_and_up_projs = torch.nn.Parameter(distribute_tensor(up.clone(), mesh, [Replicate()]))
    block.down_projs = torch.nn.Parameter(distribute_tensor(down.clone(), mesh, [Replicate()]))
    block.ep_size, block.ep_rank, block.n_routed_experts = 1, 0, E
    config = T.TokenDispatcherConfig(moe_router_topk=K, num_moe_experts=E, moe_permute_fusion=False,
                                     moe_enable_deepep=True)  # fmt: skip
    block.token_dispatcher = T.MoEFlexTokenDispatcher(
        num_local_experts=E, local_expert_indices=list(range(E)), config=config, ep_group=_Size2()
    )
    block.token_dispatcher.ep_size = 1
    return block


def _step(block, x, logits):
    """Forward + backward of sum(y * probe): (y, dx, dweights, d gate_and_up_projs, d down_projs)."""
    x = x.clone().requires_grad_()
    probs, indices = torch.softmax(logits, -1).topk(K, -1)
    probs = probs.detach().requires_grad_()
    y = block(x, torch.ones(x.shape[0], dtype=torch.bool), probs, indices)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * probe).sum().backward()
    return y.detach(), x.grad, probs.grad, block.gate_and_up_projs.grad.to_local(), block.down_projs.grad.to_local()


@pytest.mark.parametrize("activation, impl", [("swiglu", "weighted_bias_swiglu_impl"),
                                              ("geglu", "weighted_bias_geglu_impl")])  # fmt: skip
def test_patched_block_matches_the_stock_block(mesh, identity_deepep, activation, impl):
    torch.manual_seed(0)
    weights = (torch.randn(E, H, 2 * F) * 0.2, torch.randn(E, F, H) * 0.2)
    x, logits = torch.randn(TOKENS, H), torch.randn(TOKENS, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock_block = _block(mesh, activation, weights)
        assert stock_block.expert_activation is getattr(X, impl) is not getattr(moe_raw, impl)
        stock = _step(stock_block, x, logits)
        try:
            integrations.apply_to_automodel()
            patched_block = _block(mesh, activation, weights)  # built after the switch, as the README says
            assert patched_block.expert_activation is getattr(moe_raw, impl)
            assert T.permute is moe_raw.permute and T.unpermute is moe_raw.unpermute
            patched = _step(patched_block, x, logits)
        finally:
            integrations.undo_automodel()
    names = ("y", "d tokens", "d routing weights", "d gate_and_up_projs", "d down_projs")
    for name, a, b in zip(names, patched, stock, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{activation}: {name}")
