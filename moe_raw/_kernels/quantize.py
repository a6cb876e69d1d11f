"""Launchers of kernels/quantize.cu: the FP8 codes and scales of permuted rows, from the tokens and a row map."""

from __future__ import annotations

import torch

from moe_raw._launch import launch, ptr

RECIPE_CODE = {"rowwise": 0, "blockwise": 1, "mxfp8": 2}  # kernels/quantize.cu Recipe
_THREADS = 256  # kernels/quantize.cu kQuantThreads
_SPARE_BLOCKS = 1024  # quantize_fill blocks striding over the spare rows (their count is known only on the device)
_CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def quantize_rows(tokens, row_map, num_rows, recipe, fp8_dtype, fp8_max, emax, groups, aligned):
    """(codes [N, H] uint8, scales [N] / [N, G] fp32 or [N, H / 32] uint8, row-major): each token's row quantized
    once and written to every row it occupies in row_map; the other rows zero with scale 1 (byte 127). tokens
    [T, H] on CUDA with unit stride along H; row_map int32 [T + 1, E] (or [T + 3, E] with aligned)."""
    num_tokens, hidden = tokens.shape
    num_experts = row_map.shape[1]
    dev = tokens.device
    row_map = row_map.contiguous()
    codes = torch.empty((num_rows, hidden), dtype=torch.uint8, device=dev)
    if recipe == "mxfp8":
        scales = torch.empty((num_rows, groups), dtype=torch.uint8, device=dev)
    else:
        scales = torch.empty((num_rows, groups) if recipe == "blockwise" else (num_rows,), dtype=torch.float32,
                             device=dev)  # fmt: skip
    code = RECIPE_CODE[recipe]
    e5m2 = int(fp8_dtype == torch.float8_e5m2)
    if num_tokens:
        # kernels/quantize.cu: codes, the row in its dtype (each rounded up to 16 bytes), divisors, destinations
        shared = -(-hidden // 16) * 16 + -(-hidden * tokens.element_size() // 16) * 16 + 4 * groups
        shared += 4 * num_experts + groups
        launch(
            "quantize", f"moe_raw::quantize_rows<{_CTYPE[tokens.dtype]}>", dev, num_tokens, _THREADS,
            (ptr(tokens), tokens.stride(0), hidden, ptr(row_map), num_experts, code, float(fp8_max), emax, e5m2,
             ptr(codes), ptr(scales)),
            shared,
        )  # fmt: skip
    if num_rows:
        launch(
            "quantize", f"moe_raw::quantize_fill<{_THREADS}>", dev,
            min(num_rows, _SPARE_BLOCKS) + (num_experts if aligned else 0), _THREADS,
            (ptr(codes), ptr(scales), hidden, groups, code, num_rows, ptr(row_map), num_tokens, num_experts,
             int(aligned)),
        )  # fmt: skip
    return codes, scales
