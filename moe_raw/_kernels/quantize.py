"""Launchers of kernels/quantize.cu: the FP8 codes and scales of permuted rows, from the tokens and a row map."""

from __future__ import annotations

import torch

from moe_raw import _env
from moe_raw._launch import _SHARED_NO_OPT_IN, SCALAR_CODE, launch, ptr

RECIPE_CODE = {"rowwise": 0, "blockwise": 1, "mxfp8": 2}  # kernels/quantize.cu Recipe
_THREADS = 256  # kernels/quantize.cu kQuantThreads
_SPARE_BLOCKS = 1024  # quantize_fill blocks striding over the spare rows (their count is known only on the device)
_PAD_BLOCKS = 4  # quantize_fill blocks an expert striding over its padding rows (align is not known here)
_CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# Rows of whole 16-byte packs are quantized by quantize_warp (a warp a token, no block barrier) when this is "warp"
# and the warps' row lists fit 48 KiB (E <= 2944), by quantize_rows (a block a token) when "block"; other rows
# always by quantize_rows. On the H200, quantize_warp is 1.3-1.8x faster at Qwen3-30B-A3B and for mxfp8, level
# elsewhere (bench/results/2026-12-05-h200-candidate). Tests set it to compare.
_QUANT_KERNEL = "block" if _env.BLOCK_KERNELS else "warp"
_WARP_THREADS = 128  # kernels/quantize.cu kWarpQuantThreads: 4 warps, 4 tokens a block


def _outputs(num_rows, hidden, recipe, groups, dev):
    """Uninitialized codes [N, H] uint8 and row-major scales: [N] / [N, G] fp32 or [N, H / 32] uint8."""
    codes = torch.empty((num_rows, hidden), dtype=torch.uint8, device=dev)
    if recipe == "mxfp8":
        return codes, torch.empty((num_rows, groups), dtype=torch.uint8, device=dev)
    shape = (num_rows, groups) if recipe == "blockwise" else (num_rows,)
    return codes, torch.empty(shape, dtype=torch.float32, device=dev)


def _fill(codes, scales, recipe, groups, row_map, num_tokens, aligned):
    """quantize_fill: the rows of no token (spare rows past row_map[T, 0], each expert's padding in the aligned
    layout, _PAD_BLOCKS blocks an expert) get zero codes and scale 1 (byte 127)."""
    num_rows, hidden = codes.shape
    num_experts = row_map.shape[1]
    pad_blocks = _PAD_BLOCKS if aligned else 0
    if num_rows:
        launch(
            "quantize", f"moe_raw::quantize_fill<{_THREADS}>", codes.device,
            min(num_rows, _SPARE_BLOCKS) + pad_blocks * num_experts, _THREADS,
            (ptr(codes), ptr(scales), hidden, groups, RECIPE_CODE[recipe], num_rows, ptr(row_map), num_tokens,
             num_experts, pad_blocks),
        )  # fmt: skip


def quantize_rows(tokens, row_map, num_rows, recipe, fp8_dtype, fp8_max, emax, groups, aligned):
    """(codes [N, H] uint8, scales [N] / [N, G] fp32 or [N, H / 32] uint8, row-major): each token's row quantized
    once and written to every row it occupies in row_map; the other rows zero with scale 1 (byte 127). tokens
    [T, H] on CUDA with unit stride along H; row_map int32 [T + 1, E] (or [T + 3, E] with aligned)."""
    num_tokens, hidden = tokens.shape
    num_experts = row_map.shape[1]
    row_map = row_map.contiguous()
    codes, scales = _outputs(num_rows, hidden, recipe, groups, tokens.device)
    esize = tokens.element_size()
    whole_packs = ((hidden * esize) | (tokens.stride(0) * esize) | tokens.data_ptr()) & 15 == 0
    warps = _WARP_THREADS // 32
    fits = 4 * warps * num_experts <= _SHARED_NO_OPT_IN  # each warp's row list, in the 48 KiB of any block
    if num_tokens and _QUANT_KERNEL == "warp" and whole_packs and fits:
        launch(
            "quantize", f"moe_raw::quantize_warp<{_CTYPE[tokens.dtype]}>", tokens.device,
            -(-num_tokens // warps), _WARP_THREADS,
            (ptr(tokens), tokens.stride(0), hidden, ptr(row_map), num_experts, RECIPE_CODE[recipe], float(fp8_max),
             emax, int(fp8_dtype == torch.float8_e5m2), ptr(codes), ptr(scales), num_tokens),
            4 * warps * num_experts,  # each warp's row list
        )  # fmt: skip
    elif num_tokens:
        # kernels/quantize.cu: codes, the row in its dtype (each rounded up to 16 bytes), divisors, destinations
        shared = -(-hidden // 16) * 16 + -(-hidden * tokens.element_size() // 16) * 16 + 4 * groups
        shared += 4 * num_experts + groups
        launch(
            "quantize", f"moe_raw::quantize_rows<{_CTYPE[tokens.dtype]}>", tokens.device, num_tokens, _THREADS,
            (ptr(tokens), tokens.stride(0), hidden, ptr(row_map), num_experts, RECIPE_CODE[recipe], float(fp8_max),
             emax, int(fp8_dtype == torch.float8_e5m2), ptr(codes), ptr(scales)),
            shared,
        )  # fmt: skip
    _fill(codes, scales, recipe, groups, row_map, num_tokens, aligned)
    return codes, scales


def quantize_grad_rows(grad, row_map, num_rows, probs, recipe, fp8_dtype, fp8_max, emax, groups, aligned):
    """unpermute's row gradient, quantized: (codes [N, H] uint8, scales as quantize_rows'): row r of token t holds
    grad[t] * w rounded to grad's dtype (w = probs[t, e], 1 without probs, 0 for a drop-and-pad copy with probs),
    quantized; rows of no token zero with scale 1. grad [T, H] on CUDA with unit stride along H; probs [T, E] any
    strides or None."""
    num_tokens, hidden = grad.shape
    num_experts = row_map.shape[1]
    row_map = row_map.contiguous()
    codes, scales = _outputs(num_rows, hidden, recipe, groups, grad.device)
    if num_tokens:
        # kernels/quantize.cu: the row in its dtype (rounded up to 16 bytes), divisors, destination weights and rows
        shared = -(-hidden * grad.element_size() // 16) * 16 + 4 * groups + 8 * num_experts + groups
        probs_args = (ptr(probs), SCALAR_CODE[probs.dtype], probs.stride(0), probs.stride(1)) if probs is not None \
            else (0, 0, 0, 0)  # fmt: skip
        launch(
            "quantize", f"moe_raw::quantize_grad_rows<{_CTYPE[grad.dtype]}>", grad.device, num_tokens, _THREADS,
            (ptr(grad), grad.stride(0), hidden, ptr(row_map), num_experts, num_rows, *probs_args,
             RECIPE_CODE[recipe], float(fp8_max), emax, int(fp8_dtype == torch.float8_e5m2), ptr(codes), ptr(scales)),
            shared,
        )  # fmt: skip
    _fill(codes, scales, recipe, groups, row_map, num_tokens, aligned)
    return codes, scales
