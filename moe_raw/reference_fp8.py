"""FP8 quantization of rows, transcribed in torch: the oracle of ``moe_raw.permute_quantized`` (issue 19).

Three recipes quantize rows ``x [N, H]`` (float32, float16 or bfloat16) to ``fp8_dtype`` (``torch.float8_e4m3fn``,
max 448, or ``torch.float8_e5m2``, max 57344). Every step is fp32 arithmetic on the fp32 value of x (exact for the
three input dtypes); the result is defined bit for bit, and moe_raw's kernels must reproduce it bit for bit.

``"rowwise"`` (one fp32 scale per row, scales ``[N]``; what ``torch._scaled_grouped_mm`` takes on Hopper) and
``"blockwise"`` (one fp32 scale per 1x128 block of a row, DeepSeek-V3's recipe, scales ``[N, ceil(H / 128)]``, the
last block of a row shorter when 128 does not divide H), for each group g of elements (a row, or a block):

1. ``amax = max |x|`` over g, in fp32 (exact). NaN if any element of g is NaN (torch.amax propagates NaN), inf if
   any is +-inf and none is NaN.
2. ``scale = amax / fp8_max``: one fp32 division, rounded to nearest even. ``amax == 0`` (all zeros, H = 0) gives
   ``scale = 1``. A nonzero amax whose quotient underflows to 0 (amax below about 2^-141.2 for E4M3, 2^-134.2 for
   E5M2: subnormal fp32 amax) gives ``scale = 2^-149``, the least positive fp32, so a nonzero group never gets a
   zero scale. A subnormal quotient is kept (no flush to zero).
3. ``q = clamp(x / scale, -fp8_max, fp8_max)``: one fp32 division per element, rounded to nearest even, then the
   clamp (saturation: with a subnormal scale the quotient can exceed fp8_max), then torch's cast to ``fp8_dtype``,
   round to nearest even (the value is in range, so the cast never overflows). The sign of zero is kept (-0.0 ->
   byte 0x80).
4. Special values. Every NaN element of q is the byte ``0x7F`` (positive NaN in both FP8 formats), whatever the sign
   and payload of the NaN that produced it. A group holding a NaN has ``scale = NaN`` (the one fp32 pattern
   0x7FC00000) and every q of the group is NaN (x / NaN). A group holding +-inf (and no NaN) has ``scale = inf``:
   its finite elements become +-0 (x / inf, sign kept) and its infinite ones NaN (inf / inf); dequantized, the
   whole group is NaN (0 * inf).

``"mxfp8"``: OCP Microscaling (MX) v1.0, section 6.3's conversion: one E8M0 scale per 32 consecutive elements of a
row (H % 32 == 0 required), scales ``[N, H / 32]`` uint8 holding the biased exponent (127 = 2^0; 255 = NaN):

1. ``amax = max |x|`` over the 32 elements, fp32, NaN-propagating as above.
2. The shared exponent ``X = floor(log2(amax)) - emax_elem``, ``emax_elem`` = 8 for E4M3 (2^8 = 256 is its largest
   power of two), 15 for E5M2; ``floor(log2(amax))`` is exact: ``torch.frexp``'s exponent minus 1 (subnormal fp32
   amax included), never ``torch.log2``. X is clamped to the E8M0 range [-127, 127]; the byte is ``X + 127``.
3. ``amax == 0`` gives X = 0 (byte 127, scale 1: the same byte as a padding row). torchao's "floor" mode gives
   byte 0 (2^-127) there; every element is +-0 either way, so a GEMM reads the same values.
4. ``amax`` NaN or +-inf: the E8M0 NaN byte 255 (E8M0 has no infinity), and all 32 elements are NaN (0x7F): the MX
   spec reads a NaN scale as "every element of the block is NaN". torchao maps NaN and inf blocks to 255 too.
5. ``q = clamp(x / 2^X, -fp8_max, fp8_max)`` cast to ``fp8_dtype``, round to nearest even: the division by a power
   of two is exact (a quotient too small for normal fp32 is below half the least FP8 subnormal and rounds to +-0
   either way), and values above fp8_max saturate to +-fp8_max, as torchao's "floor" mode does (E4M3:
   ``amax / 2^X`` lies in [256, 512), so a block's largest elements may saturate to 448).

``dequantize(q, scales, recipe)`` returns fp32 ``q * scale`` (one fp32 multiply per element, the scale expanded
over its group; E8M0 byte b is 2^(b - 127), 0 is the subnormal 2^-127, 255 NaN).

Quantization is per row, so quantizing then moving rows equals moving then quantizing, bit for bit; a zero row
(padding, spare rows) quantizes to zero bytes with scale 1 (rowwise / blockwise) or byte 127 (mxfp8). These
functions take no host sync and have no data-dependent shapes. This module imports only torch.

Scale layouts (``scale_layout``): the same scale values, stored the way a block-scaled GEMM reads them.

* ``"row-major"`` (every recipe, the default): the scales above, contiguous ``[N]`` / ``[N, G]``.
* ``"column-major"`` ("blockwise" only; DeepGEMM's LHS scales on Hopper, TMA-aligned): a buffer
  ``[G, N_pad]`` float32, ``N_pad = ceil(N / 4) * 4`` (each column of N scales padded to 16 bytes, the TMA global
  address alignment), holding the scale of row r, block g at ``g * N_pad + r``; the padding entries (rows N to
  N_pad - 1 of each column) are 1.0. Returned as the ``[N, G]`` view of it with strides ``(1, N_pad)``: indexing
  it gives the row-major values. DeepGEMM's ``get_col_major_tma_aligned_tensor`` makes the same strides.
  ``torch._scaled_mm``'s 1x128 check wants stride ``(1, N)`` exactly: the same tensor when N % 4 == 0.
* ``"swizzled"`` ("mxfp8" only; cuBLAS "1D block scaling factors layout", Blackwell block-scaled GEMMs): the
  ``[N, G]`` E8M0 bytes padded to ``R = ceil(N / 128) * 128`` rows and ``C = ceil(G / 4) * 4`` columns with byte 127
  (2^0), cut into 128x4 tiles stored one after another (512 bytes each) in row-major order of (row tile, column
  tile); inside a tile, row r and column c are at byte ``(r % 32) * 16 + (r // 32) * 4 + c``. Returned as a
  contiguous uint8 ``[R, C]`` tensor whose bytes, in memory order, are that layout (entry [i, j] is NOT the scale
  of row i, block j). ``torch._scaled_mm`` takes it (``.view(torch.float8_e8m0fnu)``: it checks the element count
  R * C and contiguity), and so does ``torch._scaled_grouped_mm``'s MXFP8 2d-3d path (a 2-D scale); that one
  swizzles each group separately with groups starting on 128-row boundaries, which is this layout when every
  group's rows are a multiple of 128 (``align_size`` 128).

``to_scale_layout`` / ``from_scale_layout`` convert; ``from_scale_layout(to_scale_layout(s))`` is s bit for bit.
"""

from __future__ import annotations

import math

import torch

RECIPES = ("rowwise", "blockwise", "mxfp8")
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# emax_elem of the OCP MX spec: the exponent of the element type's largest power of two (E4M3 256, E5M2 32768)
EMAX_ELEM = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}
BLOCK = 128  # "blockwise" group size (1x128, DeepSeek-V3)
MX_BLOCK = 32  # "mxfp8" group size (OCP MX)
E8M0_BIAS = 127
E8M0_NAN = 255
NAN_BYTE = 0x7F  # the one NaN byte written (positive NaN in E4M3FN and E5M2)
TINY = 2.0**-149  # least positive fp32: the scale of a nonzero group whose amax / fp8_max underflows
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_LAYOUTS = ("row-major", "column-major", "swizzled")
LAYOUT_RECIPE = {"column-major": "blockwise", "swizzled": "mxfp8"}  # the one recipe each non-default layout fits
TMA_ALIGN = 4  # fp32 scales per 16 bytes (the TMA global address alignment)
SWIZZLE_ROWS, SWIZZLE_COLS = 128, 4  # the cuBLAS / CUTLASS scale-factor tile (stored as 32 x 16 bytes)


def scale_shape(num_rows: int, hidden: int, recipe: str) -> tuple[int, ...]:
    """The shape of a recipe's scales for rows [N, H]: [N], [N, ceil(H / 128)] or [N, H / 32]."""
    if recipe == "rowwise":
        return (num_rows,)
    if recipe == "blockwise":
        return (num_rows, math.ceil(hidden / BLOCK))
    return (num_rows, hidden // MX_BLOCK)


def scale_dtype(recipe: str) -> torch.dtype:
    """float32 for "rowwise" / "blockwise", uint8 (E8M0 bytes) for "mxfp8"."""
    return torch.uint8 if recipe == "mxfp8" else torch.float32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def layout_error(scale_layout, recipe: str) -> str | None:
    """Why ``scale_layout`` does not fit ``recipe`` (None when it does)."""
    if scale_layout not in SCALE_LAYOUTS:
        return f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}"
    if scale_layout != "row-major" and LAYOUT_RECIPE[scale_layout] != recipe:
        return (
            f"scale_layout {scale_layout!r} is for recipe {LAYOUT_RECIPE[scale_layout]!r} only, got recipe "
            f"{recipe!r} (use scale_layout 'row-major')"
        )
    return None


def layout_shape(num_rows: int, hidden: int, recipe: str, scale_layout: str) -> tuple[int, ...]:
    """The shape of the scales in ``scale_layout``: ``scale_shape``, except "swizzled": [R, C] (module docstring)."""
    if scale_layout == "swizzled":
        return (_round_up(num_rows, SWIZZLE_ROWS), _round_up(hidden // MX_BLOCK, SWIZZLE_COLS))
    return scale_shape(num_rows, hidden, recipe)


def to_column_major(scales: torch.Tensor) -> torch.Tensor:
    """Row-major [N, G] float32 scales -> the "column-major" [N, G] view, strides (1, N_pad), of a [G, N_pad]
    buffer (N_pad = ceil(N / 4) * 4) whose padding entries are 1.0."""
    num_rows, blocks = scales.shape
    buffer = torch.ones(blocks, _round_up(num_rows, TMA_ALIGN), dtype=scales.dtype, device=scales.device)
    buffer[:, :num_rows] = scales.T
    return buffer.T[:num_rows]


def swizzle_mx(scales: torch.Tensor) -> torch.Tensor:
    """Row-major [N, G] E8M0 bytes -> the "swizzled" contiguous [R, C] uint8 (R, C: N, G rounded up to 128, 4;
    padding bytes 127), the 128x4 tiles of cuBLAS's block scaling factors layout."""
    num_rows, blocks = scales.shape
    rows, cols = _round_up(num_rows, SWIZZLE_ROWS), _round_up(blocks, SWIZZLE_COLS)
    padded = torch.full((rows, cols), E8M0_BIAS, dtype=scales.dtype, device=scales.device)  # 127: 2^0
    padded[:num_rows, :blocks] = scales
    # row = (row tile, r // 32, r % 32), col = (col tile, c): to (row tile, col tile, r % 32, r // 32, c)
    tiles = padded.view(rows // SWIZZLE_ROWS, 4, 32, cols // SWIZZLE_COLS, SWIZZLE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rows, cols)


def unswizzle_mx(blocked: torch.Tensor, num_rows: int, blocks: int) -> torch.Tensor:
    """The inverse of ``swizzle_mx``: "swizzled" bytes ([R, C] or flat [R * C]) -> row-major [N, G] (contiguous)."""
    rows, cols = _round_up(num_rows, SWIZZLE_ROWS), _round_up(blocks, SWIZZLE_COLS)
    tiles = blocked.reshape(rows // SWIZZLE_ROWS, cols // SWIZZLE_COLS, 32, 4, SWIZZLE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rows, cols)[:num_rows, :blocks].contiguous()


def to_scale_layout(scales: torch.Tensor, recipe: str, scale_layout: str = "row-major") -> torch.Tensor:
    """A recipe's row-major scales in ``scale_layout`` ("row-major": returned as they are)."""
    error = layout_error(scale_layout, recipe)
    if error:
        raise ValueError(f"quantize: {error}")
    if scale_layout == "column-major":
        return to_column_major(scales)
    if scale_layout == "swizzled":
        return swizzle_mx(scales)
    return scales


def from_scale_layout(scales: torch.Tensor, recipe: str, scale_layout: str, num_rows: int, hidden: int) -> torch.Tensor:
    """Scales in ``scale_layout`` for rows [N, H] -> the row-major scales (``scale_shape``): "row-major" returned as
    they are, a "column-major" view copied contiguous (differentiable), "swizzled" bytes unswizzled."""
    error = layout_error(scale_layout, recipe)
    if error:
        raise ValueError(f"dequantize: {error}")
    if scale_layout == "column-major":
        return scales.contiguous()
    if scale_layout == "swizzled":
        return unswizzle_mx(scales, num_rows, hidden // MX_BLOCK)
    return scales


def _check(x: torch.Tensor, recipe: str, fp8_dtype) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"quantize: recipe must be one of {RECIPES}, got {recipe!r}")
    if fp8_dtype not in FP8_MAX:
        raise TypeError(f"quantize: fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    if x.dim() != 2 or x.dtype not in INPUT_DTYPES:
        raise TypeError(f"quantize: x must be 2-D float32 / float16 / bfloat16 [N, H], got {x.dtype} {tuple(x.shape)}")
    if recipe == "mxfp8" and x.shape[1] % MX_BLOCK:
        raise ValueError(f"quantize: mxfp8 needs H % {MX_BLOCK} == 0, got H = {x.shape[1]}")


def _amax(groups: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim (NaN-propagating); 0 for an empty group."""
    if groups.shape[-1] == 0:
        return groups.new_zeros(groups.shape[:-1])
    return groups.abs().amax(dim=-1)


def _to_fp8(q32: torch.Tensor, fp8_dtype) -> torch.Tensor:
    """Saturated fp32 values (NaN allowed) -> fp8, round to nearest even; every NaN becomes the byte 0x7F."""
    q = q32.to(fp8_dtype).view(torch.uint8)
    q = torch.where(torch.isnan(q32), torch.full_like(q, NAN_BYTE), q)
    return q.view(fp8_dtype)


def _fp32_scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """Step 2 of "rowwise" / "blockwise": amax / fp8_max, 1 for amax 0, 2^-149 where a nonzero amax underflows."""
    # a tensor divisor: torch's CUDA div by a Python scalar multiplies by its reciprocal (off by an ulp for many amax)
    scale = amax / torch.full_like(amax, fp8_max)
    one, tiny, nan = torch.ones_like(scale), torch.full_like(scale, TINY), torch.full_like(scale, float("nan"))
    scale = torch.where(amax == 0, one, torch.where(scale == 0, tiny, scale))
    return torch.where(torch.isnan(scale), nan, scale)  # one NaN bit pattern (0x7FC00000), whatever x's NaN was


def _quantize_groups(groups: torch.Tensor, scale: torch.Tensor, fp8_max: float, fp8_dtype) -> torch.Tensor:
    """groups [N, G, B] fp32 divided by scale [N, G] (one division each), saturated, cast."""
    q32 = torch.clamp(groups / scale.unsqueeze(-1), -fp8_max, fp8_max)
    return _to_fp8(q32, fp8_dtype)


def quantize_rowwise(x: torch.Tensor, fp8_dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (q [N, H] fp8_dtype, scales [N] float32); x ~= q * scales[:, None]. Rules: module docstring."""
    _check(x, "rowwise", fp8_dtype)
    fp8_max = FP8_MAX[fp8_dtype]
    groups = x.float().unsqueeze(1)  # [N, 1, H]
    scale = _fp32_scale(_amax(groups), fp8_max)  # [N, 1]
    q = _quantize_groups(groups, scale, fp8_max, fp8_dtype)
    return q.squeeze(1), scale.squeeze(1)


def quantize_blockwise(x: torch.Tensor, fp8_dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (q [N, H] fp8_dtype, scales [N, ceil(H / 128)] float32): one scale per 1x128 block of a row (the
    last block holds H % 128 elements when 128 does not divide H). Rules: module docstring."""
    _check(x, "blockwise", fp8_dtype)
    fp8_max = FP8_MAX[fp8_dtype]
    num_rows, hidden = x.shape
    blocks = math.ceil(hidden / BLOCK)
    # zeros after the last element fill the last block: they change no amax (NaN still propagates)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * BLOCK - hidden)).view(num_rows, blocks, BLOCK)
    scale = _fp32_scale(_amax(padded), fp8_max)  # [N, G]
    q = _quantize_groups(padded, scale, fp8_max, fp8_dtype).view(num_rows, blocks * BLOCK)[:, :hidden]
    return q.contiguous(), scale


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e in fp32, exactly, for int32 e in [-127, 127] (from the bits: 2^-127 is the subnormal 0x00400000)."""
    bits = torch.where(exponent >= -126, (exponent + 127) << 23, torch.full_like(exponent, 1 << 22))
    return bits.view(torch.float32)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8) -> fp32: byte b is 2^(b - 127) (0 -> 2^-127, subnormal), 255 -> NaN."""
    b = scales.to(torch.int32)
    value = _pow2(b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN, torch.full_like(value, float("nan")), value)


def quantize_mxfp8(x: torch.Tensor, fp8_dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] (H % 32 == 0) -> (q [N, H] fp8_dtype, scales [N, H / 32] uint8 E8M0 bytes): OCP MX v1.0, one
    power-of-two scale per 32 elements. Rules: module docstring."""
    _check(x, "mxfp8", fp8_dtype)
    fp8_max = FP8_MAX[fp8_dtype]
    num_rows, hidden = x.shape
    groups = x.float().view(num_rows, hidden // MX_BLOCK, MX_BLOCK)
    amax = _amax(groups)  # [N, G]
    _, exp = torch.frexp(amax)  # amax = m 2^exp, m in [0.5, 1): floor(log2(amax)) = exp - 1, exactly
    shared = torch.clamp(exp - 1 - EMAX_ELEM[fp8_dtype], -E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax == 0, torch.zeros_like(shared), shared)
    finite = torch.isfinite(amax)
    scales = torch.where(finite, shared + E8M0_BIAS, torch.full_like(shared, E8M0_NAN)).to(torch.uint8)
    q32 = torch.clamp(groups / _pow2(shared).unsqueeze(-1), -fp8_max, fp8_max)
    q32 = torch.where(finite.unsqueeze(-1), q32, torch.full_like(q32, float("nan")))
    return _to_fp8(q32, fp8_dtype).view(num_rows, hidden), scales


def quantize(x: torch.Tensor, recipe: str = "rowwise", fp8_dtype=torch.float8_e4m3fn, scale_layout="row-major"):
    """x [N, H] float32 / float16 / bfloat16 -> (q [N, H] fp8_dtype, scales): "rowwise" scales [N] float32,
    "blockwise" [N, ceil(H / 128)] float32, "mxfp8" [N, H / 32] uint8 (E8M0), stored in ``scale_layout``
    ("column-major" for "blockwise", "swizzled" for "mxfp8"). Rules and layouts: module docstring."""
    _check(x, recipe, fp8_dtype)
    error = layout_error(scale_layout, recipe)
    if error:
        raise ValueError(f"quantize: {error}")
    fn = {"rowwise": quantize_rowwise, "blockwise": quantize_blockwise, "mxfp8": quantize_mxfp8}[recipe]
    q, scales = fn(x, fp8_dtype)
    return q, to_scale_layout(scales, recipe, scale_layout)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, recipe: str = "rowwise", scale_layout="row-major"
) -> torch.Tensor:
    """q [N, H] (float8_e4m3fn / float8_e5m2) and its scales -> fp32 [N, H], ``q * scale`` (one fp32 multiply per
    element): "rowwise" scales [N] float32, "blockwise" [N, ceil(H / 128)] float32, "mxfp8" [N, H / 32] uint8 E8M0
    (255 -> NaN), in ``scale_layout`` (read back to row-major first: ``from_scale_layout``). A NaN or inf scale
    gives NaN (0 * inf, NaN * anything) or +-inf."""
    if recipe not in RECIPES:
        raise ValueError(f"dequantize: recipe must be one of {RECIPES}, got {recipe!r}")
    hidden = q.shape[1]
    scales = from_scale_layout(scales, recipe, scale_layout, q.shape[0], hidden)
    if recipe == "rowwise":
        factor = scales.unsqueeze(1)
    elif recipe == "blockwise":
        factor = scales.repeat_interleave(BLOCK, dim=1)[:, :hidden]
    else:
        factor = e8m0_to_float(scales).repeat_interleave(MX_BLOCK, dim=1)
    return q.float() * factor
