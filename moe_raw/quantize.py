"""permute_quantized: permute that quantizes to FP8 on the way (issue 19), and dequantize.

The rows, the row map and the ``num_out_tokens`` / ``align_size`` semantics are those of ``permute(fused=True)``
and ``permute_and_pad``; the FP8 rows and their scales are, bit for bit, ``moe_raw.reference_fp8.quantize`` of the
permuted rows (the recipes, their rounding and their NaN / inf / zero rules are stated there).

On CUDA the quantization is kernels/quantize.cu: permute runs on a zero-width view of the tokens (the row map and
the permuted probs, no rows moved), then each token's row is read once, quantized once and written to every row it
occupies; rows holding no token are zero with scale 1. Elsewhere: permute, then the transcription's quantization of
the permuted rows (quantization is per row, so both are quantize-then-move, bit for bit).
"""

from __future__ import annotations

import torch

from moe_raw import _launch
from moe_raw import _validate as V
from moe_raw import reference_fp8 as RF
from moe_raw._kernels import dispatch as D
from moe_raw._kernels import quantize as QK
from moe_raw.padding import permute_and_pad
from moe_raw.permutation import permute

__all__ = ["permute_quantized", "unpermute_grad_quantized", "dequantize"]


def permute_quantized(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    recipe: str = "rowwise",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    align_size: int | None = None,
    scale_layout: str = "row-major",
):
    """Permute tokens into expert-major order and quantize each permuted row to FP8, with its scales.

    Args:
        tokens: [T, H] float32 | float16 | bfloat16 (rows may be strided). Not differentiated through: the FP8 rows
            and scales carry no gradient.
        routing_map: [T, E] bool or integer multi-hot, as for ``permute``.
        probs: optional [T, E] float router probabilities, read only where routed; ``permuted_probs`` is
            differentiable w.r.t. probs, as ``permute``'s is.
        num_out_tokens: as for ``permute`` (no align_size) or ``permute_and_pad`` (with align_size). None: N is
            read on the host (one device-to-host read, a host sync). Given: no host sync at all.
        recipe: "rowwise" (one fp32 scale per row, scales [N]), "blockwise" (one fp32 scale per 1x128 block of a
            row, DeepSeek-V3, scales [N, ceil(H / 128)]) or "mxfp8" (OCP MX: one E8M0 byte per 32 elements, H % 32
            == 0, scales [N, H / 32] uint8). Exact rules in ``moe_raw.reference_fp8``.
        fp8_dtype: torch.float8_e4m3fn (max 448) or torch.float8_e5m2 (max 57344).
        align_size: None: the rows of ``permute(fused=True)``. An int in [1, 1024]: the rows of
            ``permute_and_pad`` (each expert's rows padded with zero rows to a multiple of align_size, as FP8
            grouped GEMMs need).
        scale_layout: how the scales are stored (the values are the same; ``moe_raw.reference_fp8`` states the
            layouts). "row-major" (every recipe): as above, contiguous. "column-major" (blockwise only): the
            [N, ceil(H / 128)] view with strides (1, N_pad), N_pad = ceil(N / 4) * 4, of a [ceil(H / 128), N_pad]
            float32 buffer whose padding entries are 1.0: DeepGEMM's TMA-aligned LHS scales (Hopper; with
            align_size 128 for its contiguous grouped GEMM). "swizzled" (mxfp8 only): a contiguous uint8
            [ceil(N / 128) * 128, ceil(H / 128) * 4] tensor holding, in memory order, cuBLAS's 128x4-tile block
            scaling factors layout (Blackwell; padding bytes 127), for ``torch._scaled_mm`` /
            ``torch._scaled_grouped_mm`` after ``.view(torch.float8_e8m0fnu)`` (grouped: align_size 128).
            A layout another recipe needs raises ValueError.

    Returns:
        (permuted_fp8 [N, H] fp8_dtype, scales (in scale_layout), permuted_probs [N] (probs.dtype) or None,
        row_map): row_map is ``permute(fused=True)``'s int32 [T + 1, E] or, with align_size, ``permute_and_pad``'s
        [T + 3, E], whose line T + 2 holds each expert's cumulative end row (int32 [E]: the ``offs`` of a grouped
        GEMM). Spare rows (N above the routed count) and padding rows are zero bytes with scale 1.0 (rowwise /
        blockwise) or E8M0 byte 127 (mxfp8), prob 0. ``unpermute(..., row_map, fused=True)`` combines the
        experts' output rows; ``permute_with_row_map`` moves more per-token data the same way; ``dequantize`` gives
        fp32 rows back.

    CUDA: one pass over the tokens (kernels/quantize.cu); other devices: permute, then the torch transcription's
    quantization of the permuted rows. Both equal quantizing the tokens and moving the FP8 rows, bit for bit.
    """
    op = "moe_raw.permute_quantized"
    V.tensor(tokens, "tokens", op, 2, V.QUANT_DTYPES)
    num_tokens, num_experts = V.permute_inputs(op, tokens, routing_map, probs)
    V.fp8_recipe(recipe, fp8_dtype, tokens.shape[1], op)
    V.fp8_layout(scale_layout, recipe, op)
    n_out = V.size_arg(num_out_tokens, "num_out_tokens", op)
    align = V.size_arg(align_size, "align_size", op)
    if align is not None and not 1 <= align <= 1024:
        raise ValueError(f"{op}: align_size must be None or in [1, 1024], got {align}")
    V.same_device(op, tokens=tokens, routing_map=routing_map, probs=probs)
    rows = tokens.detach()  # the FP8 outputs carry no gradient; permuted_probs keeps probs' graph
    # On CUDA the rows are quantized by kernels/quantize.cu from the tokens and the row map: permute runs on a
    # zero-width view, which gives the row map and the permuted probs without moving any row.
    fused = _launch.runs_kernels(rows)
    moved = rows[:, :0] if fused else rows
    if align is None:
        permuted, permuted_probs, row_map = permute(moved, routing_map, probs, n_out, fused=True)
    else:
        permuted, permuted_probs, row_map, _, _ = permute_and_pad(moved, routing_map, probs, align, n_out)
    if fused:
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        hidden = rows.shape[1]
        groups = RF.scale_shape(1, hidden, recipe)[1:] or (1,)
        codes, scales = QK.quantize_rows(
            rows, row_map, permuted.shape[0], recipe, fp8_dtype, RF.FP8_MAX[fp8_dtype], RF.EMAX_ELEM[fp8_dtype],
            groups[0], align is not None,
        )  # fmt: skip
        return codes.view(fp8_dtype), RF.to_scale_layout(scales, recipe, scale_layout), permuted_probs, row_map
    # permute's autograd Function marks its rows differentiable when probs requires grad: cut them off here
    q, scales = RF.quantize(permuted.detach(), recipe, fp8_dtype, scale_layout)
    return q, scales, permuted_probs, row_map


def unpermute_grad_quantized(
    grad_output: torch.Tensor,
    row_map: torch.Tensor,
    num_rows: int,
    probs: torch.Tensor | None = None,
    recipe: str = "rowwise",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_layout: str = "row-major",
):
    """The gradient ``unpermute``'s backward sends to the permuted rows, quantized to FP8 with its scales: the dgrad
    grouped GEMM's FP8 input in an FP8 MoE layer's backward (the backward twin of ``permute_quantized``).

    Args:
        grad_output: [T, H] float32 | float16 | bfloat16, the gradient of ``unpermute``'s output (rows may be
            strided; not differentiated through).
        row_map: the fused row map the forward used: ``permute(fused=True)``'s / ``permute_quantized``'s int32
            [T + 1, E], or with align_size ``permute_and_pad``'s [T + 3, E].
        num_rows: N, the number of permuted rows (the forward's).
        probs: optional [T, E] float, the probs ``unpermute`` weighted the rows with (None: unweighted).
        recipe, fp8_dtype, scale_layout: as for ``permute_quantized``.

    Returns:
        (grad_rows_fp8 [N, H] fp8_dtype, scales in scale_layout): bit for bit ``reference_fp8.quantize`` of d_rows,
        the [N, H] gradient (grad_output's dtype) ``unpermute(rows, row_map, (T, H), probs, fused=True)``'s backward
        gives its rows: d_rows[r] = grad_output[t] * probs[t, e] (fp32 product, rounded once) for token t's row r,
        zero for rows of no token. The probs gradient is not computed (it needs the forward rows: ``unpermute``'s
        autograd gives it).

    CUDA: one pass (kernels/quantize.cu quantize_grad_rows reads each gradient row once and writes the codes of
    every row the token occupies); other devices: unpermute's backward, then the transcription's quantization. No
    host sync.
    """
    op = "moe_raw.unpermute_grad_quantized"
    V.tensor(grad_output, "grad_output", op, 2, V.QUANT_DTYPES)
    num_tokens, hidden = grad_output.shape
    num_experts = V.fused_row_map(op, row_map, num_tokens, "row_map", "grad_output.shape[0]")
    n_rows = V.size_arg(num_rows, "num_rows", op, allow_none=False)
    if probs is not None:
        V.probs(op, probs, num_tokens, num_experts)
    V.fp8_recipe(recipe, fp8_dtype, hidden, op)
    V.fp8_layout(scale_layout, recipe, op)
    V.same_device(op, grad_output=grad_output, row_map=row_map, probs=probs)
    if V.DEBUG:
        V.row_map_values(op, row_map[: num_tokens + 1], n_rows)
    probs = probs.detach() if probs is not None else None
    grad = grad_output.detach()
    if _launch.runs_kernels(grad):  # one pass: kernels/quantize.cu quantize_grad_rows reads each gradient row once
        if grad.stride(1) != 1:
            grad = grad.contiguous()
        groups = RF.scale_shape(1, hidden, recipe)[1:] or (1,)
        codes, scales = QK.quantize_grad_rows(
            grad, row_map, n_rows, probs, recipe, fp8_dtype, RF.FP8_MAX[fp8_dtype], RF.EMAX_ELEM[fp8_dtype],
            groups[0], row_map.shape[0] == num_tokens + 3,
        )  # fmt: skip
        return codes.view(fp8_dtype), RF.to_scale_layout(scales, recipe, scale_layout)
    d_rows, _ = D._unpermute_backward(grad, None, row_map.contiguous(), None, probs, n_rows, False)
    return RF.quantize(d_rows, recipe, fp8_dtype, scale_layout)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, recipe: str = "rowwise", scale_layout: str = "row-major"
) -> torch.Tensor:
    """FP8 rows and their scales back to float32: ``q * scale`` (one fp32 multiply per element), for tests and
    debugging.

    Args:
        q: [N, H] float8_e4m3fn | float8_e5m2 (``permute_quantized``'s first output).
        scales: "rowwise" [N] float32, "blockwise" [N, ceil(H / 128)] float32, "mxfp8" [N, H / 32] uint8 (E8M0
            bytes: b is 2^(b - 127), 255 is NaN).
        recipe: the recipe that made them.
        scale_layout: the layout ``permute_quantized`` stored them in: "row-major", "column-major" (blockwise: a
            [N, ceil(H / 128)] view with strides (1, >= N)) or "swizzled" (mxfp8: [ceil(N / 128) * 128,
            ceil(H / 128) * 4] uint8, or those bytes flat), read back to row-major first.

    Returns:
        [N, H] float32. Differentiable w.r.t. float32 scales (the gradient is q). NaN where q is NaN or the scale
        is NaN; a group quantized with an inf scale comes back NaN (0 * inf).
    """
    op = "moe_raw.dequantize"
    V.fp8_scales(q, scales, recipe, op, scale_layout)
    return RF.dequantize(q, scales, recipe, scale_layout)
