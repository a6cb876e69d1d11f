"""permute_and_pad: permute with each expert's rows padded to a multiple of ``align_size`` (FP8 / FP4 grouped GEMMs
need aligned group sizes), computed on the device; ``unpermute(fused=True)`` takes the result back.

The padding rows are zero rows that belong to no token (Megatron's ``pad_routing_map`` instead routes extra real
tokens to fill them, which changes the model's routing). The layout is moe_raw's row map with two more lines
(``moe_raw.reference`` documents it): one more launch than ``permute`` (pad_offsets, after the routing tables), and
the permute kernel's extra blocks zero each expert's padding rows.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _ops
from moe_raw import _validate as V
from moe_raw._kernels import dispatch as D

__all__ = ["permute_and_pad", "permute_with_row_map"]


class _PermutePadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, probs, routing_map, align, num_out_tokens):
        out, pprobs, row_map, tpe, padded = D._permute_and_pad_rows(tokens, routing_map, probs, align, num_out_tokens)
        ctx.save_for_backward(row_map)
        ctx.num_tokens, ctx.probs_dtype = tokens.shape[0], None if probs is None else probs.dtype
        ctx.mark_non_differentiable(row_map, tpe, padded)
        return out, pprobs, row_map, tpe, padded

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_pprobs, *_):
        (row_map,) = ctx.saved_tensors
        need_rows = ctx.needs_input_grad[0]
        g_pp = grad_pprobs if (ctx.probs_dtype is not None and ctx.needs_input_grad[1]) else None
        d_tokens, dprobs = D._gather(
            grad_out if need_rows else None, row_map, ctx.num_tokens, g_pprobs=g_pp, dprobs_dtype=ctx.probs_dtype
        )
        return d_tokens, dprobs, None, None, None


def permute_and_pad(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    align_size: int = 16,
    num_out_tokens: int | None = None,
):
    """Permute with each expert's rows padded with zero rows to a multiple of ``align_size``.

    Args:
        tokens: [T, H] as for ``permute`` (float dtypes, or 1-byte dtypes moved as bytes).
        routing_map: [T, E] bool / integer multi-hot, as for ``permute``.
        probs: optional [T, E] float router probabilities (padding rows get prob 0).
        align_size: rows per expert are rounded up to a multiple of this (1 to 1024; 16 / 32 / 128 for FP8 and
            FP4 grouped GEMMs).
        num_out_tokens: None: N is the exact padded total, read on the host (one sync). Given (the routed count,
            e.g. T * K, or a cap): no host sync; the first num_out_tokens routed pairs (expert-major) are kept and
            N = num_out_tokens + E * (align_size - 1), the worst case, with zero rows after the padded total.

    Returns:
        (permuted [N, H], permuted_probs [N] or None, row_map [T + 3, E] int32 (aligned layout, see
        ``moe_raw.reference``), tokens_per_expert [E] int64, padded_tokens_per_expert [E] int64), all on the
        device. Expert e's rows start at the sum of the padded counts before it. Differentiable w.r.t. tokens and
        probs; ``unpermute(permuted, row_map, (T, H), probs, fused=True)`` combines and unpads (padding rows get
        no weight and a zero gradient).
    """
    op = "moe_raw.permute_and_pad"
    num_tokens, num_experts = V.permute_inputs(op, tokens, routing_map, probs)
    align = V.size_arg(align_size, "align_size", op, allow_none=False)
    if not 1 <= align <= 1024:
        raise ValueError(f"{op}: align_size must be in [1, 1024], got {align}")
    n_out = V.size_arg(num_out_tokens, "num_out_tokens", op)
    worst = (num_tokens * num_experts if n_out is None else n_out) + num_experts * (align - 1)
    if worst > V.MAX_ROWS:
        raise ValueError(f"{op}: up to {worst} padded rows would exceed the {V.MAX_ROWS} rows supported")
    V.same_device(op, tokens=tokens, routing_map=routing_map, probs=probs)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        out, pprobs, row_map, tpe, padded = _ops.permute_and_pad(tokens, routing_map, probs, align, n_out)
        return out, (pprobs if probs is not None else None), row_map, tpe, padded
    differentiable = tokens.dtype in V.FLOAT_DTYPES
    if torch.is_grad_enabled() and (
        (differentiable and tokens.requires_grad) or (probs is not None and probs.requires_grad)
    ):
        return _PermutePadFn.apply(tokens, probs, routing_map, align, n_out)
    return D._permute_and_pad_rows(tokens, routing_map, probs, align, n_out)


class _ScatterRowsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_map, num_rows):
        ctx.save_for_backward(row_map)
        ctx.num_tokens = x.shape[0]
        return D._scatter_rows(x, row_map, num_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (row_map,) = ctx.saved_tensors
        num_tokens, row_shape = ctx.num_tokens, grad_out.shape[1:]
        if num_tokens == 0 or grad_out.numel() == 0:
            return grad_out.new_zeros((num_tokens, *row_shape)), None, None
        g = grad_out.reshape(grad_out.shape[0], -1)
        d_x = D._gather(g, row_map[: num_tokens + 1], num_tokens)[0]
        return d_x.view(num_tokens, *row_shape), None, None


def permute_with_row_map(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Apply a permutation already computed to more per-token data: FP8 scales, or anything else with one row per
    token. ``out[r] = x[t]`` for every row r that the row map gives token t, zero rows elsewhere.

    Args:
        x: [T, ...] any dtype, e.g. per-token scales [T] / [T, 1] or per-1x128-block scales [T, H / 128] (float32),
            or FP8 tokens. Rows are moved as bytes (bit-exact); the last dim is read contiguously (else copied).
        row_map: the fused index of ``permute(..., fused=True)`` ([T + 1, E] int32) or of ``permute_and_pad``
            ([T + 3, E]); spare and padding rows of the result are zero.
        num_rows: N, the permuted tokens' row count (``permuted.shape[0]``).

    Returns:
        [N, ...] in x's dtype. Differentiable for float x (the gradient sums each token's rows, as permute's does).
        One launch, no host sync.
    """
    op = "moe_raw.permute_with_row_map"
    V.tensor(x, "x", op, None, V.FLOAT_DTYPES + V.BYTE_DTYPES)
    V.no_byte_grad(x, "x", op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a token dimension, got a 0-d tensor")
    num_tokens = x.shape[0]
    V.tensor(row_map, "row_map", op, 2, (torch.int32,))
    if row_map.shape[0] not in (num_tokens + 1, num_tokens + 3) or not 1 <= row_map.shape[1] <= V.MAX_EXPERTS:
        raise ValueError(
            f"{op}: row_map must be permute(fused=True)'s [T + 1, E] or permute_and_pad's [T + 3, E] row map for "
            f"T = x.shape[0] = {num_tokens}, got shape {tuple(row_map.shape)}"
        )
    num_rows = V.size_arg(num_rows, "num_rows", op, allow_none=False)
    V.same_device(op, x=x, row_map=row_map)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        return _ops.permute_with_row_map(x, row_map, num_rows)
    row_map = row_map.contiguous()
    if V.DEBUG:
        V.row_map_values(op, row_map[: num_tokens + 1], num_rows)
    if torch.is_grad_enabled() and x.requires_grad and x.dtype in V.FLOAT_DTYPES:
        return _ScatterRowsFn.apply(x, row_map, num_rows)
    return D._scatter_rows(x, row_map, num_rows)
