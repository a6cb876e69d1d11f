"""NeMo Automodel 0.7's real MoE expert block, stock and switched to moe_raw (``apply_to_automodel``): the harness
tests/test_automodel_block.py checks and ``python -m bench --ops automodel`` times.

``GroupedExpertsDeepEP`` (grouped GEMMs and the expert activation: ``weighted_bias_swiglu_impl``, or Gemma4's
``weighted_bias_geglu_impl``) behind the package's own ``MoEFlexTokenDispatcher`` / ``_DeepepManager``, whose
``permute`` / ``unpermute`` moe_raw replaces, at expert-parallel size 1: DeepEP's dispatch and combine are the
identity there (``identity_deepep``; DeepEP itself is not needed), on one gloo rank (``process_group``). A block takes
the activation function when it is built, so build it after ``apply_to_automodel()``.
"""

from __future__ import annotations

import contextlib
import importlib

import torch


def modules():
    """(experts, token_dispatcher, MoEConfig) of the installed NeMo Automodel (ImportError if it is missing)."""
    experts = importlib.import_module("nemo_automodel.components.moe.experts")
    dispatcher = importlib.import_module("nemo_automodel.components.moe.megatron.token_dispatcher")
    return experts, dispatcher, importlib.import_module("nemo_automodel.components.moe.config").MoEConfig


@contextlib.contextmanager
def process_group(device: str = "cpu"):
    """A one-rank process group (gloo for CPU tensors, and NCCL for CUDA ones when ``device`` is "cuda"; created here
    unless one exists) and its 1-D mesh on ``device``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh(device, (1,))
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def identity_deepep():
    """DeepEP's dispatch / combine at EP size 1: the tokens stay, the per-expert counts come from the indices."""
    _, T, _ = modules()

    def dispatch(hidden, indices, probs, num_experts, group, **_):
        return hidden, indices, probs, torch.bincount(indices[indices >= 0], minlength=num_experts), None

    saved = (T.fused_dispatch, T.fused_combine, getattr(T.MoEFlexTokenDispatcher, "shared_deepep_manager", None))
    T.fused_dispatch = dispatch
    T.fused_combine = lambda hidden, group, handle, **_: (hidden, None)
    T.MoEFlexTokenDispatcher.shared_deepep_manager = None  # a fresh manager with the identity functions
    try:
        yield
    finally:
        T.fused_dispatch, T.fused_combine, T.MoEFlexTokenDispatcher.shared_deepep_manager = saved


class _Size2:
    """The Flex dispatcher asserts TP x EP > 1; this group answers 2 to that check, then the block runs at EP 1."""

    def size(self):
        return 2

    def rank(self):
        return 0


def build(mesh, activation: str, weights, num_experts: int, topk: int, dtype=torch.float32):
    """A GroupedExpertsDeepEP for ``activation`` ("swiglu" | "geglu") with expert weights ``(gate_and_up [E, H, 2F],
    down [E, F, H])`` (copied, as replicated DTensors on ``mesh``) and its own Flex dispatcher (permute fusion off)."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    X, T, MoEConfig = modules()
    up, down = weights
    hidden, inter = up.shape[1], down.shape[1]
    cfg = MoEConfig(
        n_routed_experts=num_experts, n_shared_experts=0, n_activated_experts=topk, n_expert_groups=1,
        n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0, score_func="softmax",
        route_scale=1.0, dim=hidden, inter_dim=inter, moe_inter_dim=inter, norm_topk_prob=False,
        expert_activation=activation, dtype=dtype,
    )  # fmt: skip
    block = X.GroupedExpertsDeepEP(cfg)
    block.gate_and_up_projs = torch.nn.Parameter(distribute_tensor(up.clone(), mesh, [Replicate()]))
    block.down_projs = torch.nn.Parameter(distribute_tensor(down.clone(), mesh, [Replicate()]))
    block.ep_size, block.ep_rank, block.n_routed_experts = 1, 0, num_experts
    config = T.TokenDispatcherConfig(moe_router_topk=topk, num_moe_experts=num_experts, moe_permute_fusion=False,
                                     moe_enable_deepep=True)  # fmt: skip
    block.token_dispatcher = T.MoEFlexTokenDispatcher(
        num_local_experts=num_experts, local_expert_indices=list(range(num_experts)), config=config, ep_group=_Size2()
    )
    block.token_dispatcher.ep_size = 1
    return block


def step(block, x, logits, topk: int):
    """Forward + backward of sum(y * probe): (y, d tokens, d routing weights, d gate_and_up_projs, d down_projs)."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    probs, indices = torch.softmax(logits.float(), -1).topk(topk, -1)
    probs = probs.detach().requires_grad_()
    y = block(x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), probs, indices)
    probe = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)
    (y * probe).sum().backward()
    grads = (block.gate_and_up_projs.grad.to_local(), block.down_projs.grad.to_local())
    return (y.detach(), x.grad, probs.grad, *grads)


NOTE = "NeMo Automodel 0.7 GroupedExpertsDeepEP at EP 1"
SHAPES = {  # name: (activation, T, E, H, K, F) bf16 on CUDA
    "Qwen3-30B-A3B experts (SwiGLU)": ("swiglu", 16384, 128, 2048, 8, 768),
    "Gemma4-like experts (GEGLU)": ("geglu", 16384, 128, 2048, 8, 768),
}


def bench_shape(name: str, activation: str, T: int, E: int, H: int, K: int, F: int, dtype=torch.bfloat16):
    """Layer rows (CUDA): the stock block ("seed") and the block built after apply_to_automodel() ("moe_raw"),
    forward + backward, same weights and tokens; the max relative difference of output and gradients between them."""
    from moe_raw import integrations

    from . import common

    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = (torch.randn(E, H, 2 * F, device="cuda", generator=gen).to(dtype) * 0.02,
               torch.randn(E, F, H, device="cuda", generator=gen).to(dtype) * 0.02)  # fmt: skip
    x = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=gen)
    rows, results = [], {}
    with process_group("cuda") as mesh, identity_deepep():
        for provider in ("seed", "moe_raw"):
            if provider == "moe_raw":
                integrations.apply_to_automodel()
            try:
                block = build(mesh, activation, weights, E, K, dtype)
                results[provider] = step(block, x, logits, K)
                peak = common.peak_gb(lambda b=block: step(b, x, logits, K))
                ms = common.do_bench(lambda b=block: step(b, x, logits, K))
            finally:
                integrations.undo_automodel()
            rows.append({"kind": "layer", "shape": f"{name} T={T} E={E} H={H} K={K} F={F}", "provider": provider,
                         "op": "automodel experts fwd+bwd", "ms": ms, "tokens_per_s": T / (ms * 1e-3),
                         "peak_mem_GB": peak, "note": NOTE})  # fmt: skip
    err = max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
              for a, b in zip(results["moe_raw"], results["seed"], strict=True))  # fmt: skip
    seed, ours = rows
    ours["speedup_vs_seed"] = seed["ms"] / ours["ms"]
    ours["max_rel_err"] = seed["max_rel_err"] = err
    ours["note"] += f" after apply_to_automodel(); {ours['speedup_vs_seed']:.2f}x the stock block; rel diff {err:.1e}"
    return rows
