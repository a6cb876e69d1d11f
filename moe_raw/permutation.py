"""permute / unpermute: the seed's API on moe_raw's kernels (kernels/permute.cu), with autograd.

This file holds what a user reads: the public functions (signature, validation, dispatch) and their autograd
Functions. Below it, ``moe_raw._kernels.dispatch`` sizes, allocates and launches (or runs the torch twin on CPU)
and ``moe_raw._ops`` wraps the same helpers as torch.compile custom ops. CPU and CUDA tensors take the same
Functions, so they get the same autograd graph and the same gradients, empty inputs included.
"""

from __future__ import annotations

import weakref

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _ops
from moe_raw import _validate as V
from moe_raw._kernels import dispatch as D
from moe_raw._launch import CTYPES

# unpermute(fused=False, routing_map=...) reuses the row map permute built for its sorted_indices instead of
# rebuilding it (two or three launches), when it gets that sorted_indices tensor with the same routing_map object,
# unmodified (same _version), the same row count and mode. Keyed by the sorted_indices tensor's id, checked by
# identity through a weak reference whose callback drops the entry when the tensor dies: nothing is stored on the
# user's tensors and no row map outlives its sorted_indices.
_ROW_MAPS: dict = {}


def _remember_row_map(indices, routing_map, drop_and_pad, row_map) -> None:
    key = id(indices)
    ref = weakref.ref(indices, lambda _, key=key: _ROW_MAPS.pop(key, None))
    _ROW_MAPS[key] = (ref, routing_map, routing_map._version, indices.shape[0], drop_and_pad, row_map)


def _recall_row_map(indices, routing_map, drop_and_pad):
    entry = _ROW_MAPS.get(id(indices))
    if (
        entry is not None
        and entry[0]() is indices
        and entry[1] is routing_map
        and entry[2] == routing_map._version
        and entry[3] == indices.shape[0]
        and entry[4] == drop_and_pad
    ):
        return entry[5]
    return None


def _permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):
    out, pprobs, index, row_map = D._permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused)
    if not fused:
        _remember_row_map(index, routing_map, drop_and_pad, row_map)
    return out, pprobs, index, row_map


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):
        out, pprobs, index, row_map = _permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(row_map)
        ctx.tokens_dtype = tokens.dtype
        ctx.probs_dtype = probs.dtype if probs is not None else None
        return out, pprobs, index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_permuted, grad_pprobs, _grad_index):
        (row_map,) = ctx.saved_tensors
        num_tokens = row_map.shape[0] - 1
        need_tokens, need_probs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_tokens and ctx.tokens_dtype not in CTYPES:
            raise TypeError(f"moe_raw.permute: no gradient for {ctx.tokens_dtype} tokens (a pure byte move)")
        if num_tokens == 0:
            dtok = grad_permuted.new_zeros((0, grad_permuted.shape[1])) if need_tokens else None
            dprobs = (
                torch.zeros((0, row_map.shape[1]), dtype=ctx.probs_dtype, device=row_map.device) if need_probs else None
            )
            return dtok, dprobs, None, None, None, None
        rows = grad_permuted if need_tokens else None
        dtok, dprobs = D._gather(
            rows, row_map, num_tokens,
            g_pprobs=grad_pprobs.contiguous() if (need_probs and grad_pprobs is not None) else None,
            dprobs_dtype=ctx.probs_dtype,
        )  # fmt: skip
        # dprobs stays None when permuted_probs got no gradient: autograd reads None as zero, and a zero tensor
        # would cost a fill plus an add into probs.grad (the round trip's probs get their gradient from unpermute).
        if need_tokens and dtok is None:
            dtok = torch.zeros((num_tokens, grad_permuted.shape[1]), dtype=ctx.tokens_dtype, device=row_map.device)
        return dtok, dprobs, None, None, None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, probs, row_map, sorted_indices, num_tokens):
        ctx.num_tokens = num_tokens
        ctx.n_rows = permuted.shape[0]
        ctx.probs_needs_grad = probs is not None and ctx.needs_input_grad[1]
        out = D._unpermute_forward(permuted, probs, row_map, sorted_indices, num_tokens)
        ctx.save_for_backward(row_map, sorted_indices, probs, permuted if ctx.probs_needs_grad else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        row_map, sorted_indices, probs, permuted = ctx.saved_tensors
        d_rows, dprobs = D._unpermute_backward(
            grad_out, permuted, row_map, sorted_indices, probs, ctx.n_rows, ctx.probs_needs_grad
        )
        return (d_rows if ctx.needs_input_grad[0] else None), dprobs, None, None, None


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Group tokens by expert: rows in expert-major, token-ascending order (what grouped GEMM slices).

    Args:
        tokens: [T, H] float32 | float16 | bfloat16 | float64, or a 1-byte dtype (float8_*, uint8, int8: a pure
            byte move, not differentiable). Rows may be strided; the last dim is read contiguously (else copied).
        routing_map: [T, E] bool or integer multi-hot (nonzero = routed), any strides. With MOE_RAW_DEBUG=1 an
            integer map holding anything but 0 and 1 raises ValueError (a host sync; see "Bad input" below).
        probs: optional [T, E] float router probabilities (dense, zero off-route); read only where routed.
        num_out_tokens: output rows N. None: N = routing_map.sum(), which costs one device-to-host read (a host
            sync). Given: no host sync at all (CUDA-graph capturable); routed pairs past N (expert-major tail) are
            dropped, and rows past the routed count are zero with prob 0 and index 0.
        fused: False returns the seed's int64 ``sorted_indices``; True returns moe_raw's row map (int32 [T+1, E],
            format in ``moe_raw.reference``), which ``unpermute(fused=True)`` reads. Both run the same kernels.
        drop_and_pad: with num_out_tokens, capacity C = min(num_out_tokens // E, T) rows per expert, N = E * C:
            the first C routed tokens of each expert (ascending), then the lowest unrouted token ids as padding
            (copies of those tokens with prob 0), as the seed's stable argsort lays them out.

    Returns:
        permuted [N, H] (tokens.dtype), permuted_probs [N] (probs.dtype) or None, and sorted_indices [N] int64
        (the token id of each row, bit-identical to the seed) or, with fused=True, the row map [T+1, E] int32.
        Differentiable w.r.t. tokens and probs.

    Bad input: a wrong type, rank, shape, dtype, layout or device raises TypeError / ValueError naming the argument,
    before anything is launched, without a host sync. Values are checked only when the environment has
    MOE_RAW_DEBUG=1 at import (each check is a device-to-host read).
    """
    op = "moe_raw.permute"
    num_tokens, num_experts, n_out, fused, drop_and_pad = V.permute_args(
        op, tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad
    )
    if V.DEBUG:
        V.routing_values(op, routing_map)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        out, pprobs, row_map, indices = _ops.permute(tokens, routing_map, probs, n_out, fused, drop_and_pad)
        return out, (pprobs if probs is not None else None), (row_map if fused else indices)
    if num_tokens * num_experts > 2**31 - 1:
        raise ValueError(f"{op}: T * E = {num_tokens * num_experts} routing-map entries exceed 2^31 - 1")
    if n_out is not None and n_out > V.MAX_ROWS:
        raise ValueError(f"{op}: num_out_tokens = {n_out} exceeds the {V.MAX_ROWS} rows supported")
    if torch.is_grad_enabled() and (tokens.requires_grad or (probs is not None and probs.requires_grad)):
        return _PermuteFn.apply(tokens, probs, routing_map, n_out, drop_and_pad, fused)
    return _permute_forward(tokens, probs, routing_map, n_out, drop_and_pad, fused)[:3]


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape,
    probs: torch.Tensor | None = None,
    routing_map: torch.Tensor | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Sum every permuted row back into its token, each multiplied by its prob when ``probs`` is given.

    Args:
        permuted_tokens: [N, H] float32 | float16 | bfloat16 | float64 (permute's output, or the experts' output).
        sorted_indices: fused=False: [N] int64 / int32 token id of each row (permute's third output). Read only
            without routing_map; a row whose id is outside [0, T) is then summed into no token and gets a zero
            gradient (on every device). fused=True: permute(fused=True)'s row map, int32 [T+1, E] (any strides), or
            permute_and_pad's [T+3, E] (padding rows get no weight and a zero gradient); codes naming a row outside
            [0, N) are skipped. With MOE_RAW_DEBUG=1 either kind out of range raises ValueError
            (a host sync).
        restore_shape: (T, H) of the output.
        probs: optional [T, E] float; read only at routed pairs (a NaN off-route never reaches the output; its
            gradient there is exactly 0). With fused=False, routing_map is then required, as in the seed.
        routing_map: [T, E], the map given to permute (fused=False only; fused maps already know each row).
            Without it (and without probs) every row is summed into ``sorted_indices[row]`` as the seed's
            scatter_add does: spare rows (num_out_tokens above the routed count) have index 0 and are zero after
            permute; if your experts can make them nonzero (a bias), pass routing_map or use fused=True, which
            skip spare rows.
        drop_and_pad: as given to permute (capacity = N // E).

    Returns:
        [T, H] in permuted_tokens.dtype, accumulated in fp32 (fp64 for fp64) in ascending expert order:
        bitwise deterministic, no atomics, no fp32 copy of the rows. Differentiable w.r.t. permuted_tokens and probs.
        fused=False without routing_map groups rows by token with a stable device sort of sorted_indices.

    Bad input: as for ``permute``; with MOE_RAW_DEBUG=1 also the values of sorted_indices and routing_map. Without
    the flag, out-of-range indices are skipped on every device (CPU and CUDA alike).
    """
    op = "moe_raw.unpermute"
    num_tokens, n_rows, fused, drop_and_pad = V.unpermute_args(
        op, permuted_tokens, sorted_indices, restore_shape, probs, routing_map, fused, drop_and_pad
    )
    if V.DEBUG:
        if fused:
            V.row_map_values(op, sorted_indices[: num_tokens + 1], n_rows)
        else:
            V.index_values(op, sorted_indices, num_tokens)
        if routing_map is not None:
            V.routing_values(op, routing_map)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        return _ops.unpermute(permuted_tokens, sorted_indices, probs, routing_map, num_tokens, fused, drop_and_pad)[0]
    if fused:
        # the kernels index the row map as contiguous [T + 1, E]; a strided view (a transpose, an expand) is copied
        row_map, index = sorted_indices.contiguous(), None
    elif routing_map is not None:
        row_map = _recall_row_map(sorted_indices, routing_map, drop_and_pad)
        if row_map is None:
            row_map = D._row_map_from_routing(routing_map, n_rows, drop_and_pad)
        index = sorted_indices
    else:
        row_map, index = None, sorted_indices
    if torch.is_grad_enabled() and (permuted_tokens.requires_grad or (probs is not None and probs.requires_grad)):
        return _UnpermuteFn.apply(permuted_tokens, probs, row_map, index, num_tokens)
    return D._unpermute_forward(permuted_tokens, probs, row_map, index, num_tokens)  # no autograd node: less host time
