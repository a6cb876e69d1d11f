"""MoEAlltoAllDispatcher: expert-parallel token dispatch / combine over an all-to-all, on moe_raw's ops (issue #8).

The semantics are those of Megatron-LM's ``MoEAlltoAllTokenDispatcher``
(``megatron/core/transformer/moe/token_dispatcher.py``, tensor parallelism of the experts = 1):

dispatch: ``permute`` (tokens grouped by global expert, so each destination rank's experts are one contiguous
block) -> ``all_to_all_single`` over the EP group -> ``sort_chunks_by_idxs`` (the received rank-major chunks
``[rank 0: local expert 0, 1, ..., rank 1: local expert 0, ...]`` regrouped expert-major), only when the rank holds
more than one expert and the group more than one rank.

combine: the reverse: ``sort_chunks_by_idxs`` back to rank-major -> ``all_to_all_single`` with the splits swapped ->
``unpermute`` into the original token order on the original rank.

Every step is differentiable (the all-to-all's backward is the all-to-all with the splits swapped), so gradients
reach the tokens, the router probabilities and the experts' weights on every rank. Backward runs collectives: every
rank of the group must run it, in the same order as the forward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_raw.chunks import sort_chunks_by_idxs
from moe_raw.permutation import permute, unpermute

__all__ = ["MoEAlltoAllDispatcher", "all_to_all"]


def _exchange(x: torch.Tensor, group, output_splits, input_splits) -> torch.Tensor:
    """dist.all_to_all_single of the rows of x (splits None: equal splits)."""
    x = x.contiguous()
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the gradient goes back through the same exchange, splits swapped."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _exchange(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(x: torch.Tensor, group=None, output_splits=None, input_splits=None) -> torch.Tensor:
    """Differentiable ``torch.distributed.all_to_all_single`` of the rows of ``x``.

    ``output_splits`` / ``input_splits`` are host lists of row counts (None: equal splits). Works with gloo (CPU
    tensors) and NCCL (CUDA tensors). The returned tensor is new; the backward is the reverse exchange.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, group, output_splits, input_splits)
    return _exchange(x, group, output_splits, input_splits)


class MoEAlltoAllDispatcher:
    """All-to-all token dispatcher for expert parallelism (Megatron's ``MoEAlltoAllTokenDispatcher``).

    Experts are numbered globally 0..E-1; rank r of ``ep_group`` holds experts ``r * L .. (r + 1) * L - 1``
    (L = ``num_local_experts``, E = L * ep_size), as in Megatron.

    Args:
        num_experts: E, the number of experts over the whole EP group (the routing map's columns).
        num_local_experts: L, the experts this rank holds; E must equal L * ep_size.
        ep_group: the expert-parallel process group. None: the default group if ``torch.distributed`` is
            initialized, else no group (ep_size 1: no collectives at all).
        drop_and_pad: False: dropless, exact counts (one host sync per dispatch, see ``dispatch``). True: every
            expert gets exactly C rows from every rank (its first C routed tokens, padded), static shapes, no host
            sync, capturable in a CUDA graph. Needs ``capacity_factor`` and ``router_topk``, and every rank of the
            group must pass the same number of tokens T (the capacity, hence every split, derives from T).
        capacity_factor: drop_and_pad's capacity factor. C = ceil(T * router_topk / E * capacity_factor), Megatron's
            ``get_capacity``; moe_raw also caps C at T (an expert cannot hold more than T distinct tokens).
        router_topk: K, the experts per token (drop_and_pad only: the capacity formula needs it).
        combine_with_probs: True (default): ``combine`` multiplies each expert output row by its router
            probability (``unpermute(probs=...)``), so the experts must not. False: ``combine`` sums the rows
            unweighted, as Megatron's current dispatcher does: there the experts apply ``expert_probs`` themselves
            (a weighted SwiGLU, or ``moe_apply_probs_on_input``).

    One dispatch -> combine at a time: ``dispatch`` stores the routing state that ``combine`` uses.
    """

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        ep_group=None,
        drop_and_pad: bool = False,
        capacity_factor: float | None = None,
        router_topk: int | None = None,
        combine_with_probs: bool = True,
    ):
        if ep_group is None and dist.is_available() and dist.is_initialized():
            ep_group = dist.group.WORLD
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if num_local_experts < 1 or num_experts != num_local_experts * self.ep_size:
            raise ValueError(
                f"MoEAlltoAllDispatcher: num_experts ({num_experts}) must equal num_local_experts "
                f"({num_local_experts}) * the EP group size ({self.ep_size}), with num_local_experts >= 1"
            )
        if drop_and_pad and (capacity_factor is None or capacity_factor <= 0 or not router_topk or router_topk < 1):
            raise ValueError(
                "MoEAlltoAllDispatcher: drop_and_pad=True needs capacity_factor > 0 and router_topk >= 1 "
                f"(got capacity_factor={capacity_factor}, router_topk={router_topk})"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(
            range(self.ep_rank * num_local_experts, (self.ep_rank + 1) * num_local_experts)
        )
        self.drop_and_pad = bool(drop_and_pad)
        self.capacity_factor = capacity_factor
        self.router_topk = router_topk
        self.combine_with_probs = bool(combine_with_probs)
        self.capacity = None
        self.tokens_per_expert_host = None
        self._index_cache = {}
        self._state = None

    # -------------------------------------------------------------------------------------------------- helpers

    def get_capacity(self, num_tokens: int) -> int:
        """Rows per expert per rank with drop_and_pad: ceil(T * K / E * capacity_factor), at most T."""
        c = math.ceil(num_tokens * self.router_topk / self.num_experts * self.capacity_factor)
        return min(c, num_tokens)

    def _chunk_order(self, device, key: str, rows: int, cols: int) -> torch.Tensor:
        """arange(rows * cols).reshape(rows, cols).T.ravel() on the device, cached (built once, no host copy)."""
        k = (key, device, rows, cols)
        t = self._index_cache.get(k)
        if t is None:
            t = torch.arange(rows * cols, device=device).reshape(rows, cols).T.contiguous().view(-1)
            self._index_cache[k] = t
        return t

    def _a2a(self, x, output_splits, input_splits):
        return x if self.ep_size == 1 else all_to_all(x, self.ep_group, output_splits, input_splits)

    # ------------------------------------------------------------------------------------------------- dispatch

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        """Send every (token, expert) pair to the rank holding the expert, grouped by local expert.

        Args:
            hidden: [T, H] tokens (or [..., H]: leading dims are flattened and restored by ``combine``).
            probs: [T, E] router probabilities, dense (read only where routed).
            routing_map: [T, E] bool multi-hot.

        Returns:
            expert_input [M, H]: rows of local expert 0 (from rank 0's tokens in token order, then rank 1's, ...),
            then local expert 1, ...; expert_probs [M]: each row's router probability (0 on padding rows);
            tokens_per_expert [L] int64 on hidden's device: the rows of each local expert (M = their sum).

        Dropless: the per-expert counts are exchanged with one all-to-all of an int64 [E] tensor, then read on the
        host with one ``.tolist()``: the one host sync of the dispatch. It is needed because
        ``all_to_all_single`` takes its split sizes as host ints and its output (M rows) must be allocated with a
        host-known size. The host values are kept in ``self.tokens_per_expert_host`` (a list of L ints).
        combine and both backward passes reuse them: no further sync.

        drop_and_pad: C = ``get_capacity(T)`` rows per (rank, expert); M = ep_size * L * C; every split is L * C
        rows; tokens_per_expert is ep_size * C for every local expert. No host sync, static shapes.
        """
        hidden_shape = hidden.shape
        hidden2d = hidden.reshape(-1, hidden_shape[-1])
        num_tokens = hidden2d.shape[0]
        if routing_map.dim() != 2 or routing_map.shape != (num_tokens, self.num_experts):
            raise ValueError(
                f"MoEAlltoAllDispatcher.dispatch: routing_map must be [T, E] = [{num_tokens}, {self.num_experts}], "
                f"got {tuple(routing_map.shape)}"
            )
        if probs.shape != routing_map.shape:
            raise ValueError(
                f"MoEAlltoAllDispatcher.dispatch: probs must be [T, E] = [{num_tokens}, {self.num_experts}], "
                f"got {tuple(probs.shape)}"
            )
        ep, L, E = self.ep_size, self.num_local_experts, self.num_experts
        dev = hidden2d.device
        if self.drop_and_pad:
            cap = self.get_capacity(num_tokens)
            self.capacity = cap
            num_out = E * cap
            input_splits = output_splits = None  # equal splits of L * C rows
            split_sizes = None  # every received chunk has C rows
            tokens_per_expert = torch.full((L,), ep * cap, dtype=torch.int64, device=dev)
            self.tokens_per_expert_host = None
        else:
            counts = routing_map.sum(dim=0, dtype=torch.int64)  # [E], this rank's pairs per global expert
            if ep > 1:
                # recv[j * L + l]: pairs rank j sends to my local expert l (Megatron's
                # num_global_tokens_per_local_expert, gathered there with an all-gather; one all-to-all here).
                recv = _exchange(counts, self.ep_group, None, None)
            else:
                recv = counts
            host = torch.cat([counts, recv]).tolist()  # THE host sync (dropless only)
            counts_h, recv_h = host[:E], host[E:]
            num_out = sum(counts_h)
            input_splits = [sum(counts_h[j * L : (j + 1) * L]) for j in range(ep)]
            output_splits = [sum(recv_h[j * L : (j + 1) * L]) for j in range(ep)]
            self.tokens_per_expert_host = [sum(recv_h[j * L + i] for j in range(ep)) for i in range(L)]
            split_sizes = recv  # [ep * L] rank-major chunk sizes, on the device
            tokens_per_expert = recv.view(ep, L).sum(dim=0)
        # Permutation 1: expert-major rows; rank j's experts are rows of one contiguous block.
        rows, rows_probs, row_map = permute(
            hidden2d, routing_map, probs=probs, num_out_tokens=num_out, fused=True, drop_and_pad=self.drop_and_pad
        )
        rows = self._a2a(rows, output_splits, input_splits)
        rows_probs = self._a2a(rows_probs, output_splits, input_splits)
        regroup = ep > 1 and L > 1
        sort_sizes = restore_sizes = None
        if regroup:
            # Permutation 2: rank-major chunks [ep, L] -> expert-major [L, ep] (Megatron's sort_chunks_by_idxs
            # with sort_input_by_local_experts); sizes and order stay on the device.
            if split_sizes is None:
                sort_sizes = restore_sizes = torch.full((ep * L,), cap, dtype=torch.int64, device=dev)
            else:
                sort_sizes = split_sizes
                restore_sizes = split_sizes.view(ep, L).T.contiguous().view(-1)
            rows, rows_probs = sort_chunks_by_idxs(
                rows, sort_sizes, self._chunk_order(dev, "sort", ep, L), probs=rows_probs
            )
        self._state = (hidden_shape, num_tokens, probs, row_map, input_splits, output_splits, regroup, restore_sizes)
        return rows, rows_probs, tokens_per_expert

    # -------------------------------------------------------------------------------------------------- combine

    def combine(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Return the experts' output rows to their tokens: [M, H'] -> [T, H'] (hidden's leading shape restored).

        Each token's rows are summed, each multiplied by its router probability when ``combine_with_probs``
        (accumulated in fp32, ascending expert order: ``moe_raw.unpermute``). No host sync.
        """
        if self._state is None:
            raise RuntimeError("MoEAlltoAllDispatcher.combine: call dispatch first")
        hidden_shape, num_tokens, probs, row_map, input_splits, output_splits, regroup, restore_sizes = self._state
        self._state = None
        ep, L = self.ep_size, self.num_local_experts
        x = expert_output
        if regroup:
            # Unpermutation 2: expert-major [L, ep] -> rank-major [ep, L] (restore_output_by_local_experts).
            x, _ = sort_chunks_by_idxs(x, restore_sizes, self._chunk_order(x.device, "restore", L, ep))
        x = self._a2a(x, input_splits, output_splits)
        out = unpermute(
            x, row_map, (num_tokens, x.shape[-1]), probs=probs if self.combine_with_probs else None, fused=True
        )
        return out.view(*hidden_shape[:-1], x.shape[-1])
