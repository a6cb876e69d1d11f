"""Megatron-LM main's ``permute`` / ``unpermute`` (``megatron/core/transformer/moe/moe_utils.py``) on moe_raw's kernels.

Megatron-LM main moved these two functions on from the 3-value API that ``moe_raw.permute`` / ``moe_raw.unpermute``
keep (megatron-core 0.16.1 and NeMo Automodel still have it): ``permute`` gained ``tokens_per_expert``,
``align_size`` and ``return_batch_invariant_inverse_map`` and returns five values, ``unpermute`` gained
``pad_offsets`` and ``batch_invariant_inverse_map``. This module has main's signatures and return values, computed
by moe_raw's public ops (``moe_raw.permutation``, ``moe_raw.padding``); ``moe_raw.integrations.apply_to_megatron()``
swaps it in where the installed Megatron has these signatures.

What main returns (unfused path: a stable descending ``argsort`` of the transposed routing map):

* rows ``flat_sorted[:num_out_tokens]`` of the [E * T] list "every routed (token, expert) pair in expert-major,
  token-ascending order, then every unrouted pair in the same order". So when ``num_out_tokens`` exceeds the routed
  count R, rows R.. hold copies of *unrouted* pairs (expert 0's unrouted tokens first), with their token ids in
  ``sorted_indices`` and ``probs[t, e]`` in ``permuted_probs`` (0 when probs is zero off the map), and ``unpermute``
  sums them back like any row. moe_raw reproduces this layout by permuting over a ``[T, 2E]`` map (the routing map,
  then its complement), which gives exactly that order; ``num_out_tokens`` above ``T * E`` gives ``T * E`` rows.
* the unfused path needs ``num_out_tokens`` (main asserts it). ``drop_and_pad`` gives each expert C =
  ``min(num_out_tokens // E, T)`` rows: its first C routed tokens, then, if it has fewer, its lowest unrouted tokens
  (padding copies, with ``probs[t, e]``); here a [T, 2E] map with those two groups per expert gives that order.
* with more than ``MAX_EXPERTS / 2`` experts (or ``T * 2E >= 2^31``) the [T, 2E] map does not fit the kernels: rows
  past the routed count are then zero rows with token id 0 and prob 0, and padding copies get prob 0 (moe_raw's
  own layout); everything else is unchanged.
* with ``fused=True`` main calls Transformer Engine; here the third value is moe_raw's row map (int32), which only
  this module's (or moe_raw's) ``unpermute(fused=True)`` reads. With probs, ``tokens_per_expert`` and
  ``align_size > 0``, TE's ``moe_permute_and_pad_with_probs`` pads each expert's rows to a multiple of
  ``align_size``: rows ``sum(target)`` with ``target = ceil(tokens_per_expert / align_size) * align_size``, expert e's
  tokens first, ``pad_offsets`` the exclusive prefix sum of ``target - tokens_per_expert`` (None when nothing needs
  padding) and ``target`` as the fifth value.
* ``return_batch_invariant_inverse_map=True`` (unfused, no ``drop_and_pad``, ``num_out_tokens`` a multiple of T)
  returns ``[2, T, K]`` int64 with K = num_out_tokens // T as the fourth value: ``[0, t, k]`` the row of token t's
  k-th routed expert in ascending expert order, ``[1, t, k]`` that expert, -1 in both where there is none.

Sources read (NVIDIA/Megatron-LM): moe_utils.py at 00611e6 (``align_size=0``) and a stored copy with
``align_size=-1``, an optional ``num_out_tokens`` and the argsort probs in ``unpermute`` (commit not shown), the
dropless and batch-invariant lines of 60e039626 as quoted by a third-party write-up, batch_invariant.py at 4664f94,
272c860 and a third copy (``ep_rank_tree``), and a unit test calling ``permute(...,
return_batch_invariant_inverse_map=True)`` and ``unpermute(..., batch_invariant_inverse_map=...)``;
NVIDIA/TransformerEngine pytorch/permutation.py (``moe_permute_and_pad_with_probs``). No stored ``moe_utils.py``
has the batch-invariant arguments: their behaviour comes from those lines, batch_invariant.py and that test.
"""

from __future__ import annotations

import weakref

import torch

from moe_raw import _validate as V
from moe_raw import padding
from moe_raw import permutation as P

__all__ = ["permute", "unpermute"]

_OP_P = "moe_raw.megatron.permute"
_OP_U = "moe_raw.megatron.unpermute"

# id(sorted_indices) -> (weak reference, routing_map, its _version, capacity or None, the [T, 2E] map permute used):
# unpermute passes moe_raw.unpermute the same map object, which then finds the row map permute built (kept by
# moe_raw.permutation for that sorted_indices tensor). The weak reference's callback drops the entry with the tensor.
_MAPS: dict = {}


def _fits(routing_map: torch.Tensor) -> bool:
    """Whether the kernels take a [T, 2E] map (at most MAX_EXPERTS columns, T * 2E entries below 2^31)."""
    num_tokens, num_experts = routing_map.shape
    return 2 * num_experts <= V.MAX_EXPERTS and num_tokens * 2 * num_experts <= 2**31 - 1


def _pair_map(routing_map: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """The [T, 2E] bool map whose expert-major order is main's row order, so that moe_raw's permute over it returns
    main's rows, probs and token ids, and its unpermute sums (and weights) the rows main does.

    capacity None (dropless): column e is routing_map's, column E + e its complement: main's argsort order, every
    routed pair then every unrouted one. capacity C (drop_and_pad): columns 2e and 2e + 1 hold expert e's first C
    routed tokens and then, if it has fewer, its lowest unrouted tokens up to C: main's per-expert argsort."""
    num_tokens, num_experts = routing_map.shape
    routed = routing_map.bool()
    if capacity is None:
        return torch.cat((routed, ~routed), dim=1)
    kept = routed & (torch.cumsum(routed, 0, dtype=torch.int32) <= capacity)
    fill = capacity - routed.sum(0, dtype=torch.int32)  # padding rows per expert (<= 0: none)
    pad = ~routed & (torch.cumsum(~routed, 0, dtype=torch.int32) <= fill)
    return torch.stack((kept, pad), dim=2).view(num_tokens, 2 * num_experts)


def _pair_probs(probs: torch.Tensor | None, capacity: int | None) -> torch.Tensor | None:
    """probs for ``_pair_map``'s columns: each pair, routed or not, reads probs[t, e], as main's gathers do."""
    if probs is None:
        return None
    if capacity is None:
        return torch.cat((probs, probs), dim=1)
    return torch.repeat_interleave(probs, 2, dim=1)


def _remember(sorted_indices, routing_map, capacity, pairs) -> None:
    if torch.compiler.is_compiling():
        return
    key = id(sorted_indices)
    ref = weakref.ref(sorted_indices, lambda _, key=key: _MAPS.pop(key, None))
    _MAPS[key] = (ref, routing_map, routing_map._version, capacity, pairs)


def _recall(sorted_indices, routing_map, capacity) -> torch.Tensor | None:
    entry = _MAPS.get(id(sorted_indices))
    if entry is not None and entry[0]() is sorted_indices and entry[1] is routing_map:
        if entry[2] == routing_map._version and entry[3] == capacity:
            return entry[4]
    return None


def _int_arg(x, arg: str, op: str) -> int:
    if isinstance(x, (bool, torch.Tensor)) or not hasattr(x, "__index__"):
        raise TypeError(f"{op}: {arg} must be an int, got {type(x).__name__}")
    return int(x)


def _rows_arg(x, op: str) -> tuple[int | None, bool]:
    """num_out_tokens as an int, and whether it came as a tensor. Megatron passes ``routing_map.sum()`` (a 0-d
    tensor) when the row count is dynamic (capacity factor, router padding); that costs one device-to-host read,
    as it does in Megatron."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        return V.size_arg(int(x.item()), "num_out_tokens", op), True
    return V.size_arg(x, "num_out_tokens", op), False


def _optional_tensor(x, arg: str, op: str, ndim: int | None = None, dtypes=None):
    if x is not None:
        V.tensor(x, arg, op, ndim, dtypes)
    return x


def _inverse_map(row_map: torch.Tensor, routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """[2, T, K] int64 from a row map whose first E columns are routing_map's (routed rows, -1 where dropped):
    [0, t, k] the row of token t's k-th routed expert (ascending), [1, t, k] that expert, -1 in both where token t
    has no k-th routed expert or its pair was dropped (past num_out_tokens). A token with more than K routed experts
    keeps its first K (main's scatter is undefined there). On the device, no host sync."""
    num_tokens, num_experts = routing_map.shape
    inverse = torch.full((2, num_tokens, topk), -1, dtype=torch.int64, device=routing_map.device)
    k = min(topk, num_experts)
    if num_tokens == 0 or k == 0:
        return inverse
    routed = routing_map.bool()
    # a stable sort of "not routed" puts each token's routed experts first, in ascending order
    experts = torch.sort((~routed).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    rows = row_map[:num_tokens].gather(1, experts).long()
    kept = routed.gather(1, experts) & (rows >= 0)
    inverse[0, :, :k] = torch.where(kept, rows, -1)
    inverse[1, :, :k] = torch.where(kept, experts, -1)
    return inverse


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
    tokens_per_expert: torch.Tensor | None = None,
    align_size: int = -1,
    return_batch_invariant_inverse_map: bool = False,
):
    """Megatron-LM main's ``moe_utils.permute``: rows in expert-major, token-ascending order, and five values.

    Args:
        tokens: [T, H] float32 | float16 | bfloat16 | float64, or a 1-byte dtype (moved as bytes, no gradient).
        routing_map: [T, E] bool or integer multi-hot (nonzero = routed).
        probs: optional [T, E] float router probabilities (zero off the map, as Megatron's routers make them).
        num_out_tokens: rows N. Required by the unfused path (main asserts it), e.g. T * K for dropless routing; no
            host sync then. Rows past the routed count hold unrouted pairs, as main's (module docstring). A 0-d
            integer tensor (Megatron's ``routing_map.sum()`` for dynamic sizes) is read once on the host.
            ``drop_and_pad``: capacity ``min(num_out_tokens // E, T)`` per expert. ``fused=True``: None keeps every
            routed pair (one device-to-host read), fewer drops the expert-major tail.
        fused: True returns moe_raw's row map instead of token ids (main: Transformer Engine's ``row_id_map``);
            read it back with this module's ``unpermute(fused=True)``.
        drop_and_pad: per-expert capacity (unfused path; the fused path ignores it, as main does).
        tokens_per_expert: optional [E] counts; returned as the fifth value except on the padded path.
        align_size: with ``fused=True``, probs, ``tokens_per_expert`` and ``align_size > 0`` (at most 1024), each
            expert's rows are padded with zero rows (prob 0) to a multiple of align_size. The counts are taken from
            routing_map (TE takes tokens_per_expert, which Megatron computes as ``routing_map.sum(0)``).
        return_batch_invariant_inverse_map: also return the [2, T, K] inverse map (unfused, no drop_and_pad,
            num_out_tokens a multiple of T; as main, which asserts the same).

    Returns:
        ``(permuted [N, H] tokens.dtype, permuted_probs [N] probs.dtype or None, sorted_indices, fourth, fifth)``:
        * unfused: sorted_indices = [N] int64 token ids (main's, bit for bit); fourth = None, or the inverse map
          [2, T, K] int64 (module docstring; main's whenever every token has exactly K routed experts); fifth =
          ``tokens_per_expert`` as given.
        * fused: sorted_indices = moe_raw's row map, int32 [T + 1, E]; fourth None; fifth ``tokens_per_expert``.
        * padded (fused, probs, tokens_per_expert, align_size > 0): N = the padded total; sorted_indices = moe_raw's
          aligned row map [T + 3, E] int32; fourth = pad_offsets [E] int64 (None when every count is already a
          multiple of align_size); fifth = the padded counts [E] int64. Two device-to-host reads (the total and
          the None test), as TE's.
        Differentiable w.r.t. tokens and probs (permuted_probs too), as main's. Rows that hold an unrouted pair
        (past the routed count, or drop_and_pad's padding copies) carry ``probs[t, e]``, which main gathers there
        too: zero for a router's probs, and a NaN there reaches those rows as in main.

    Raises:
        TypeError / ValueError naming the argument: bad tensors (as ``moe_raw.permute``), ``num_out_tokens`` missing
        on the unfused path, an inverse map asked with ``fused`` or ``drop_and_pad`` or without a static multiple
        of T, ``align_size`` not an int or above 1024 on the padded path, ``tokens_per_expert`` not a tensor.
    """
    op = _OP_P
    num_tokens, num_experts = V.permute_inputs(op, tokens, routing_map, probs)
    n_out, n_out_tensor = _rows_arg(num_out_tokens, op)
    fused, drop_and_pad = V.flag(fused, "fused", op), V.flag(drop_and_pad, "drop_and_pad", op)
    want_inverse = V.flag(return_batch_invariant_inverse_map, "return_batch_invariant_inverse_map", op)
    align = _int_arg(align_size, "align_size", op)
    _optional_tensor(tokens_per_expert, "tokens_per_expert", op)
    V.same_device(op, tokens=tokens, routing_map=routing_map, probs=probs)
    if want_inverse:
        if fused or drop_and_pad:
            raise ValueError(
                f"{op}: return_batch_invariant_inverse_map=True takes the unfused, dropless path only (Megatron "
                f"refuses it too), got fused={fused}, drop_and_pad={drop_and_pad}"
            )
        if n_out is None or n_out_tensor or (num_tokens and n_out % num_tokens):
            raise ValueError(
                f"{op}: return_batch_invariant_inverse_map=True needs num_out_tokens = T * K as an int, a multiple "
                f"of T = {num_tokens} (a fixed top-k per token), got {num_out_tokens!r}"
            )
    if fused:
        if probs is not None and tokens_per_expert is not None and align > 0:
            if tuple(tokens_per_expert.shape) != (num_experts,):
                raise ValueError(
                    f"{op}: tokens_per_expert must be [E] = [{num_experts}], got {tuple(tokens_per_expert.shape)}"
                )
            if align > 1024:
                raise ValueError(f"{op}: align_size must be at most 1024, got {align}")
            out, pprobs, row_map, counts, padded = padding.permute_and_pad(tokens, routing_map, probs, align)
            pads = padded - counts
            pad_offsets = None if torch.equal(counts, padded) else torch.cumsum(pads, 0) - pads
            return out, pprobs, row_map, pad_offsets, padded
        out, pprobs, row_map = P.permute(tokens, routing_map, probs, n_out, fused=True)
        return out, pprobs, row_map, None, tokens_per_expert
    if n_out is None:
        raise ValueError(
            f"{op}: num_out_tokens is required on the unfused path (Megatron main asserts it), e.g. T * K; "
            f"moe_raw.permute takes None as the routed count"
        )
    fits = _fits(routing_map)
    capacity = min(n_out // num_experts, num_tokens) if drop_and_pad else None
    if fits:  # main's rows: E * capacity, or the first num_out_tokens of its T * E pairs
        n_rows = num_experts * capacity if drop_and_pad else min(n_out, num_tokens * num_experts)
        rmap, rprobs = _pair_map(routing_map, capacity), _pair_probs(probs, capacity)
    else:  # too many experts for the [T, 2E] map: moe_raw's own layout (module docstring)
        n_rows = n_out if drop_and_pad else min(n_out, num_tokens * num_experts)
        rmap, rprobs = routing_map, probs
    inverse = None
    if want_inverse:
        out, pprobs, row_map = P.permute(tokens, rmap, rprobs, n_rows, fused=True)
        ids = torch.arange(num_tokens, dtype=torch.int64, device=tokens.device)
        # token ids moved as 8-byte rows (bit-exact), zero on spare rows: the int64 sorted_indices
        indices = padding.permute_with_row_map(ids.view(torch.float64), row_map, n_rows).view(torch.int64)
        inverse = _inverse_map(row_map, routing_map, n_out // num_tokens if num_tokens else 0)
    else:
        out, pprobs, indices = P.permute(tokens, rmap, rprobs, n_rows, drop_and_pad=drop_and_pad and not fits)
    if fits:
        _remember(indices, routing_map, capacity, rmap)
    return out, pprobs, indices, inverse, tokens_per_expert


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape,
    probs: torch.Tensor | None = None,
    routing_map: torch.Tensor | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
    pad_offsets: torch.Tensor | None = None,
    batch_invariant_inverse_map: torch.Tensor | None = None,
):
    """Megatron-LM main's ``moe_utils.unpermute``: sum every permuted row back into its token, times its prob.

    Args:
        permuted_tokens: [N, H] float32 | float16 | bfloat16 | float64 (the experts' output).
        sorted_indices: this module's ``permute`` third value: [N] int64 / int32 token ids (unfused), or the int32
            row map [T + 1, E] / [T + 3, E] (``fused=True``, the padded layout included).
        restore_shape: (T, H).
        probs: optional [T, E] float; the unfused path then needs routing_map (as main). Rows that hold an
            unrouted pair (past the routed count, drop_and_pad's padding copies) are weighted by probs[t, e], as
            main's.
        routing_map: [T, E], the map given to permute. Without it (and without probs) every row is summed into
            ``sorted_indices[row]``, as main's scatter_add.
        fused / drop_and_pad: as given to permute.
        pad_offsets: permute's fourth value on the padded path, [E] int64 / int32, or None. moe_raw's aligned row
            map already places the padding rows, so its values are not read; given with a row map that is not the
            aligned [T + 3, E] one, it is refused.
        batch_invariant_inverse_map: permute's [2, T, K] int64 / int32 inverse map, or None (unfused, dropless,
            with routing_map). Checked for shape, dtype and device; its values are not read: the routing map names
            the same rows. Given, only those rows (the routed pairs kept) are summed, as main's batch-invariant
            unpermute does; rows past the routed count are left out.

    Returns:
        [T, H] in permuted_tokens.dtype, differentiable w.r.t. permuted_tokens and probs.

    Batch invariance: with or without the inverse map, token t's output depends on its own rows and probs only:
    they are summed in fp32 (fp64 for fp64) from 0 in ascending expert order and rounded once, with no atomics and
    nothing that depends on T or on the other tokens or their order. On CPU each step is ``acc + fp32(p * x)``; on
    CUDA it is one fused multiply-add ``fma(p, x, acc)`` (the same as an add without probs). Main's batch-invariant
    unpermute adds a token's rows EP rank by rank, slot by slot within a rank (slot k = its k-th routed expert,
    ascending). At EP size 1 that is moe_raw's order: bit-identical on CPU, and on CUDA without probs, where main
    sums in fp32 (batch_invariant.py 4664f94; 272c860 sums a probs-free partial in fp64 before rounding to fp32);
    with probs on CUDA the FMA can differ in the last bit. At EP size > 1 main sums per-rank partials, a tree
    moe_raw does not build. Megatron's unfused path sums rows with ``scatter_add_`` / ``index_add_`` in the
    promoted dtype: results agree to rounding.

    Raises:
        TypeError / ValueError naming the argument: bad tensors (as ``moe_raw.unpermute``), probs without
        routing_map on the unfused path, an inverse map with ``fused`` or ``drop_and_pad`` or without routing_map
        or not [2, T, K] integer, pad_offsets not [E] integer or with a row map that has no padding layout.
    """
    op = _OP_U
    V.tensor(permuted_tokens, "permuted_tokens", op, 2, V.FLOAT_DTYPES)
    num_tokens, _ = V.restore_shape(op, restore_shape, permuted_tokens.shape[1])
    fused, drop_and_pad = V.flag(fused, "fused", op), V.flag(drop_and_pad, "drop_and_pad", op)
    ints = (torch.int64, torch.int32)
    _optional_tensor(pad_offsets, "pad_offsets", op, 1, ints)
    inverse = _optional_tensor(batch_invariant_inverse_map, "batch_invariant_inverse_map", op, 3, ints)
    if inverse is not None:
        if fused or drop_and_pad or routing_map is None:
            raise ValueError(
                f"{op}: batch_invariant_inverse_map takes the unfused, dropless path with routing_map (as permute's "
                f"return_batch_invariant_inverse_map), got fused={fused}, drop_and_pad={drop_and_pad}, "
                f"routing_map={'None' if routing_map is None else 'given'}"
            )
        if inverse.shape[:2] != (2, num_tokens):
            raise ValueError(
                f"{op}: batch_invariant_inverse_map must be [2, T, K] with T = restore_shape[0] = {num_tokens}, got "
                f"shape {tuple(inverse.shape)}"
            )
        V.same_device(op, permuted_tokens=permuted_tokens, batch_invariant_inverse_map=inverse)
    if fused:
        if pad_offsets is not None:
            aligned = isinstance(sorted_indices, torch.Tensor) and sorted_indices.dim() == 2
            if not aligned or sorted_indices.shape[0] != num_tokens + 3:
                raise ValueError(
                    f"{op}: pad_offsets is given but sorted_indices is not permute's padded row map [T + 3, E] "
                    f"(T = {num_tokens}), got shape {tuple(getattr(sorted_indices, 'shape', ()))}"
                )
            if tuple(pad_offsets.shape) != (sorted_indices.shape[1],):
                raise ValueError(
                    f"{op}: pad_offsets must be [E] = [{sorted_indices.shape[1]}], got {tuple(pad_offsets.shape)}"
                )
            V.same_device(op, sorted_indices=sorted_indices, pad_offsets=pad_offsets)
        return P.unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, fused=True)
    V.tensor(sorted_indices, "sorted_indices", op, 1, ints)
    if routing_map is None:
        if probs is not None:
            raise ValueError(f"{op}: routing_map is required when probs is given with fused=False (as Megatron's)")
        return P.unpermute(permuted_tokens, sorted_indices, restore_shape, drop_and_pad=drop_and_pad)
    V.routing(op, routing_map, num_tokens)
    if probs is not None:
        V.probs(op, probs, num_tokens, routing_map.shape[1])
    if inverse is not None:  # the routing map itself: its routed rows only
        return P.unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map)
    if not _fits(routing_map):
        return P.unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, False, drop_and_pad)
    capacity = min(permuted_tokens.shape[0] // routing_map.shape[1], num_tokens) if drop_and_pad else None
    pairs = _recall(sorted_indices, routing_map, capacity)
    if pairs is None:
        pairs = _pair_map(routing_map, capacity)
    return P.unpermute(permuted_tokens, sorted_indices, restore_shape, _pair_probs(probs, capacity), pairs)
