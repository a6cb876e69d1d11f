"""Launchers of kernels/router.cu: the router's forward and backward, one launch each (no host sync)."""

from __future__ import annotations

import torch

from moe_raw._launch import ROUTER_SHAPES, SCALAR_CODE, cdiv, launch, ptr

SCORE_CODE = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}  # kernels/router.cu ScoreFn
MAX_EXPERTS = max(v * lanes for v, lanes in ROUTER_SHAPES)  # 32 lanes of 32 experts
MAX_TOPK = 32  # lane k holds pick k
MAX_GROUPS = 64  # the kept groups are one 64-bit mask
_WARPS = 4  # kernels/router.cu kRouterWarps: warps per block


def covers(num_experts: int, topk: int, group_topk, num_groups) -> bool:
    """Whether the kernel takes this router (else moe_raw/router.py runs the same formulas as torch ops)."""
    return num_experts <= MAX_EXPERTS and topk <= MAX_TOPK and (not group_topk or num_groups <= MAX_GROUPS)


def _shape(num_experts: int) -> tuple[int, int]:
    """(V experts a lane, L lanes a token): the first of ROUTER_SHAPES that holds E experts."""
    return next((v, lanes) for v, lanes in ROUTER_SHAPES if v * lanes >= num_experts)


def _launch_shape(way: str, num_tokens: int, num_experts: int) -> tuple[str, int, int]:
    """(kernel name, grid, tokens a block): a block holds _WARPS * 32 / L tokens."""
    v, lanes = _shape(num_experts)
    tokens_per_block = _WARPS * 32 // lanes
    return f"moe_raw::router_{way}<{v}, {lanes}>", cdiv(num_tokens, tokens_per_block), tokens_per_block


def forward(logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux):
    """(probs, routing_map, idx [T, K] int64, scores): probs [T, E] (dense) or [T, K] in the logits' dtype, and the
    bool map [T, E] (dense); aux: no probs, the map and scores [T, E] fp32. logits: contiguous [T, E] on CUDA."""
    num_tokens, num_experts = logits.shape
    dev = logits.device
    idx = torch.empty((num_tokens, topk), dtype=torch.int64, device=dev)
    probs = routing_map = scores = None
    if aux or dense:
        routing_map = torch.empty((num_tokens, num_experts), dtype=torch.bool, device=dev)
    if aux:
        scores = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=dev)
    else:
        probs = torch.empty((num_tokens, num_experts if dense else topk), dtype=logits.dtype, device=dev)
    if num_tokens:
        bias = expert_bias if expert_bias is not None and score_function != "softmax" and not aux else None
        grouped = bool(group_topk) and not aux
        name, grid, tokens_per_block = _launch_shape("fwd", num_tokens, num_experts)
        shared = tokens_per_block * num_experts * 4 if grouped else 0  # some group layouts stage fp32 keys there
        launch(
            "router", name, dev, grid, 32 * _WARPS,
            (ptr(logits), SCALAR_CODE[logits.dtype], num_tokens, num_experts, ptr(bias),
             SCALAR_CODE[bias.dtype] if bias is not None else 0, topk, SCORE_CODE[score_function], int(pre_softmax),
             num_groups if grouped else 0, group_topk if grouped else 0, float(scaling or 0.0), int(aux), ptr(probs),
             int(dense), ptr(routing_map), ptr(idx), ptr(scores)),
            shared,
        )  # fmt: skip
    return probs, routing_map, idx, scores


def backward(logits, idx, grad, topk, score_function, pre_softmax, scaling, dense, aux):
    """d logits [T, E] (the logits' dtype) from d probs (dense [T, E] or [T, K]) or, aux, d scores [T, E]."""
    num_tokens, num_experts = logits.shape
    grad = grad.contiguous()
    grad_logits = torch.empty_like(logits)
    if num_tokens:
        name, grid, _ = _launch_shape("bwd", num_tokens, num_experts)
        launch(
            "router", name, logits.device, grid, 32 * _WARPS,
            (ptr(logits), SCALAR_CODE[logits.dtype], num_tokens, num_experts, topk, SCORE_CODE[score_function],
             int(pre_softmax), float(scaling or 0.0), int(aux), ptr(grad), SCALAR_CODE[grad.dtype], int(dense),
             ptr(idx), ptr(grad_logits)),
        )  # fmt: skip
    return grad_logits
