"""Top-k index routing: permute / unpermute from a router's ``topk_indices [T, K]`` and ``topk_probs [T, K]``.

Routers produce top-k indices; the seed's API takes a dense multi-hot map. ``topk_to_routing`` turns one into the
other on the device (one launch of kernels/topk.cu on CUDA, torch ops on CPU and under torch.compile; no host sync,
differentiable in the probs), and ``permute_topk`` / ``unpermute_topk`` are ``permute`` / ``unpermute`` on that
map, so the row order and every result are the mask form's, bit for bit.

Index values: ``-1`` means "not routed" (capacity-dropped slots); a duplicate expert in a row, or a value outside
[-1, E), is a routing error. Detecting one needs the values on the host, so it is checked where a host read happens
anyway (``permute_topk`` with ``num_out_tokens=None`` reads the routed count and checks in the same read) or with
``MOE_RAW_DEBUG=1``. Unchecked, an out-of-range index is ignored like -1 and a repeated expert routes once, with
the probability (and gradient) of its first occurrence in the row: never an out-of-bounds access, and the same
result on every run and device.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _launch
from moe_raw import _validate as V
from moe_raw._kernels import dispatch as D
from moe_raw.permutation import permute, unpermute

__all__ = ["topk_to_routing", "permute_topk", "unpermute_topk"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_topk(op, topk_indices, num_experts, topk_probs) -> int:
    V.tensor(topk_indices, "topk_indices", op, 2, _INDEX_DTYPES)
    num_experts = V.size_arg(num_experts, "num_experts", op, allow_none=False)
    if not 1 <= num_experts <= V.MAX_EXPERTS:
        raise ValueError(f"{op}: num_experts must be in [1, {V.MAX_EXPERTS}], got {num_experts}")
    if topk_probs is not None:
        V.tensor(topk_probs, "topk_probs", op, 2, V.FLOAT_DTYPES)
        if topk_probs.shape != topk_indices.shape:
            raise ValueError(
                f"{op}: topk_probs must have topk_indices' shape [T, K] = {tuple(topk_indices.shape)}, "
                f"got {tuple(topk_probs.shape)}"
            )
        V.same_device(op, topk_indices=topk_indices, topk_probs=topk_probs)
    return num_experts


def _routing(topk_indices, num_experts, topk_probs):
    """(routing_map [T, E] bool, probs [T, E] | None): one kernel on CUDA (kernels/topk.cu), torch ops on CPU and
    under torch.compile. The map is a view whose row stride is a multiple of 16 bytes, so the map build reads it 16
    bytes at a time. Both paths skip entries outside [0, E) and give an expert named twice its first probability."""
    if _launch.runs_kernels(topk_indices) and not torch.compiler.is_compiling():
        if topk_probs is not None and torch.is_grad_enabled() and topk_probs.requires_grad:
            return _TopkDense.apply(topk_probs, topk_indices, num_experts)
        # nothing to differentiate: the launch alone (the Function's bookkeeping was 40% of _routing's host time)
        return D._dense_cuda(topk_indices, num_experts, topk_probs)
    num_tokens = topk_indices.shape[0]
    valid = (topk_indices >= 0) & (topk_indices < num_experts)
    slots = torch.where(valid & D._first_of_each_expert(topk_indices), topk_indices, num_experts).long()
    width = -(-(num_experts + 1) // 16) * 16  # column E collects the skipped entries
    dev = topk_indices.device
    routing_map = torch.zeros((num_tokens, width), dtype=torch.bool, device=dev).scatter_(1, slots, True)
    probs = None
    if topk_probs is not None:
        dense = torch.zeros((num_tokens, num_experts + 1), dtype=topk_probs.dtype, device=dev)
        probs = dense.scatter(1, slots, topk_probs)[:, :num_experts]  # differentiable in topk_probs
    return routing_map[:, :num_experts], probs


class _TopkDense(torch.autograd.Function):
    """The dense routing from top-k (CUDA); d probs[t, e] / d topk_probs[t, k] = 1 where e is idx[t, k]'s first
    occurrence in the row (the value the kernel copied), so the gradient is a gather of those entries."""

    @staticmethod
    def forward(ctx, topk_probs, topk_indices, num_experts):
        routing_map, probs = D._dense_cuda(topk_indices, num_experts, topk_probs)
        ctx.save_for_backward(topk_indices)
        ctx.mark_non_differentiable(routing_map)
        return routing_map, probs

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_map, grad_probs):
        (idx,) = ctx.saved_tensors
        num_experts = grad_probs.shape[1]
        used = (idx >= 0) & (idx < num_experts) & D._first_of_each_expert(idx)
        grad = grad_probs.gather(1, torch.where(used, idx, 0).long())
        return torch.where(used, grad, 0), None, None


def _check_values(topk_indices, routing_map, num_experts) -> int:
    """One host read of (routed pairs, valid entries, non -1 entries); raises on duplicates or out-of-range values.
    Returns the routed count."""
    valid = (topk_indices >= 0) & (topk_indices < num_experts)
    counts = torch.stack([routing_map.sum(), valid.sum(), (topk_indices != -1).sum()]).tolist()
    _routing_errors(*counts)
    return counts[0]


def _routing_errors(routed: int, valid: int, named: int) -> None:
    if named != valid:
        raise ValueError(
            f"moe_raw: topk_indices holds {named - valid} value(s) outside [-1, num_experts) (-1 means not routed)"
        )
    if routed != valid:
        raise ValueError(
            f"moe_raw: topk_indices names the same expert twice in a row ({valid - routed} duplicate(s)); "
            "each token's K experts must be distinct"
        )


def topk_to_routing(topk_indices: torch.Tensor, num_experts: int, topk_probs: torch.Tensor | None = None):
    """The dense routing of top-k indices: ``(routing_map [T, E] bool, probs [T, E] or None)``.

    Args:
        topk_indices: [T, K] int32 / int64 expert ids; -1 = not routed.
        num_experts: E.
        topk_probs: optional [T, K] float probabilities of those experts.

    Returns:
        routing_map [T, E] bool (a view with row stride padded to 16 bytes) and probs [T, E] in topk_probs' dtype,
        zero off-route, differentiable w.r.t. topk_probs. No host sync (values are checked only with
        MOE_RAW_DEBUG=1, see the module docstring).
    """
    op = "moe_raw.topk_to_routing"
    num_experts = _check_topk(op, topk_indices, num_experts, topk_probs)
    routing_map, probs = _routing(topk_indices, num_experts, topk_probs)
    if V.DEBUG:
        _check_values(topk_indices, routing_map, num_experts)
    return routing_map, probs


def permute_topk(
    tokens: torch.Tensor,
    topk_indices: torch.Tensor,
    num_experts: int,
    topk_probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """``permute`` from top-k indices: ``permute(tokens, *topk_to_routing(topk_indices, num_experts, topk_probs),
    num_out_tokens, fused, drop_and_pad)``, same rows, same results.

    Args:
        tokens: [T, H] as for ``permute``.
        topk_indices: [T, K] int32 / int64 expert ids in [0, E), -1 = not routed; distinct within a row.
        num_experts: E.
        topk_probs: optional [T, K] float probabilities; the returned permuted_probs are theirs.
        num_out_tokens, fused, drop_and_pad: as for ``permute``. With num_out_tokens=None the routed count is read
            on the host (as ``permute`` does) and, in the same read, duplicates and out-of-range indices raise
            ValueError. Given, there is no host sync and the indices are checked only with MOE_RAW_DEBUG=1.

    Returns:
        (permuted [N, H], permuted_probs [N] or None, sorted_indices [N] int64 or, fused, the row map [T+1, E]),
        differentiable w.r.t. tokens and topk_probs.
    """
    op = "moe_raw.permute_topk"
    V.tensor(tokens, "tokens", op, 2)
    num_experts = _check_topk(op, topk_indices, num_experts, topk_probs)
    if topk_indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"{op}: topk_indices has {topk_indices.shape[0]} rows but tokens has {tokens.shape[0]}")
    V.same_device(op, tokens=tokens, topk_indices=topk_indices)
    routing_map, probs = _routing(topk_indices, num_experts, topk_probs)
    if num_out_tokens is None or V.DEBUG:
        routed = _check_values(topk_indices, routing_map, num_experts)
        if num_out_tokens is None and not drop_and_pad:
            num_out_tokens = routed  # permute need not read it again
    return permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)


def unpermute_topk(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape,
    topk_probs: torch.Tensor | None = None,
    topk_indices: torch.Tensor | None = None,
    num_experts: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """``unpermute`` with top-k probs: ``unpermute(permuted_tokens, sorted_indices, restore_shape, probs,
    routing_map, fused, drop_and_pad)`` with ``(routing_map, probs) = topk_to_routing(topk_indices, num_experts,
    topk_probs)``.

    Args:
        permuted_tokens: [N, H], sorted_indices: [N] int64 or (fused) the row map [T+1, E], restore_shape: (T, H),
            as for ``unpermute``.
        topk_probs: optional [T, K] float probabilities (weights of the combine); needs topk_indices [T, K].
        topk_indices: [T, K] expert ids, as for ``permute_topk``; needed with topk_probs, or (unfused) with
            drop_and_pad.
        num_experts: E; with fused=True it defaults to the row map's width.

    Returns:
        [T, H] in permuted_tokens' dtype, differentiable w.r.t. permuted_tokens and topk_probs. No host sync.
    """
    op = "moe_raw.unpermute_topk"
    routing_map = probs = None
    if topk_probs is not None and topk_indices is None:
        raise ValueError(f"{op}: topk_probs needs topk_indices (which experts the probabilities belong to)")
    if topk_indices is not None:
        if num_experts is None:
            if not fused:
                raise ValueError(f"{op}: num_experts is needed with topk_indices (fused=False)")
            V.tensor(sorted_indices, "sorted_indices", op, 2)
            num_experts = sorted_indices.shape[1]
        num_experts = _check_topk(op, topk_indices, num_experts, topk_probs)
        routing_map, probs = _routing(topk_indices, num_experts, topk_probs)
    return unpermute(
        permuted_tokens, sorted_indices, restore_shape, probs, None if fused else routing_map, fused, drop_and_pad
    )
