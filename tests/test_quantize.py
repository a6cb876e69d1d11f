"""FP8 quantize-on-permute (issue 19): ``moe_raw.reference_fp8`` (the torch transcription of the three recipes)
against independent checks, and ``moe_raw.permute_quantized`` against moving then quantizing and quantizing then
moving, bit for bit, on the CPU (CI) and on CUDA (the same tests, marked ``gpu``).

The independent oracle below is plain Python: FP8 values decoded from their bit fields, round to nearest even by
search over the 256 codes, fp32 rounding through ``struct``, scales from fp64 arithmetic rounded once to fp32 and
exponents from ``math.frexp``. None of it calls the transcription's torch ops.
"""

from __future__ import annotations

import bisect
import math
import struct

import pytest
import torch
from conftest import DEVICES, assert_exact, make_probs, make_routing, needs_cuda

import moe_raw
from moe_raw import reference_fp8 as RF

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------------------------------------------
# The independent oracle (plain Python)


def _f32(v: float) -> float:
    """v rounded to fp32 (round to nearest even, subnormals kept) by the C cast inside struct."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


def _decode(byte: int, fp8) -> float:
    """An FP8 code's value from its bit fields (E4M3FN: bias 7, S.1111.111 NaN, no inf; E5M2: bias 15, IEEE-like)."""
    sign = -1.0 if byte & 0x80 else 1.0
    if fp8 == E4M3:
        e, m = (byte >> 3) & 0xF, byte & 0x7
        if e == 0xF and m == 0x7:
            return NAN
        return sign * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    e, m = (byte >> 2) & 0x1F, byte & 0x3
    if e == 0x1F:
        return sign * INF if m == 0 else NAN
    return sign * (m / 4 * 2.0**-14 if e == 0 else (1 + m / 4) * 2.0 ** (e - 15))


_TABLES = {}


def _table(fp8):
    """(ascending finite non-negative values, their codes)."""
    if fp8 not in _TABLES:
        codes = [b for b in range(0x80) if math.isfinite(_decode(b, fp8))]
        _TABLES[fp8] = ([_decode(b, fp8) for b in codes], codes)
    return _TABLES[fp8]


def _fp8_byte(v: float, fp8) -> int:
    """v (an fp32 value within +-fp8_max, or NaN) -> its FP8 code, round to nearest, ties to the even code."""
    if math.isnan(v):
        return RF.NAN_BYTE
    values, codes = _table(fp8)
    a = abs(v)
    i = bisect.bisect_left(values, a)
    if i == len(values) or (i > 0 and (a - values[i - 1] < values[i] - a or
                                       (a - values[i - 1] == values[i] - a and codes[i - 1] % 2 == 0))):  # fmt: skip
        i -= 1
    return codes[i] | (0x80 if math.copysign(1.0, v) < 0 else 0)


def _py_amax(group) -> float:
    if any(math.isnan(v) for v in group):
        return NAN
    return max((abs(v) for v in group), default=0.0)


def _py_scale(amax: float, fp8) -> float:
    """amax / fp8_max in fp64, rounded once to fp32 (equal to the fp32 division: innocuous double rounding)."""
    if amax == 0:
        return 1.0
    s = _f32(amax / RF.FP8_MAX[fp8])
    return 2.0**-149 if s == 0 else s


def _py_elem(v: float, divisor: float, fp8) -> int:
    m = RF.FP8_MAX[fp8]
    q = _f32(v / divisor) if not (math.isinf(v) and math.isinf(divisor)) else NAN
    return _fp8_byte(q if math.isnan(q) else min(max(q, -m), m), fp8)


def _py_mx(group, fp8):
    amax = _py_amax(group)
    if not math.isfinite(amax):
        return RF.E8M0_NAN, [RF.NAN_BYTE] * len(group)
    shared = 0 if amax == 0 else min(max(math.frexp(amax)[1] - 1 - RF.EMAX_ELEM[fp8], -127), 127)
    return shared + 127, [_py_elem(v, 2.0**shared, fp8) for v in group]


def oracle(x: torch.Tensor, recipe: str, fp8):
    """(q bytes [N, H] as lists, scales: fp32 bit patterns or E8M0 bytes) of x [N, H] by the recipe's rules."""
    hidden = x.shape[1]
    size = {"rowwise": max(hidden, 1), "blockwise": RF.BLOCK, "mxfp8": RF.MX_BLOCK}[recipe]
    q_rows, s_rows = [], []
    for row in x.float().tolist():
        q, s = [], []
        for start in range(0, max(hidden, 1), size):
            group = row[start : start + size]
            if recipe == "mxfp8":
                if not group:
                    continue
                byte, codes = _py_mx(group, fp8)
                s.append(byte)
                q += codes
            else:
                scale = _py_scale(_py_amax(group), fp8)
                s.append(_f32_bits(scale))
                q += [_py_elem(v, scale, fp8) for v in group]
        q_rows.append(q)
        s_rows.append(s[0] if recipe == "rowwise" else s)
    return q_rows, s_rows


def _bits(scales: torch.Tensor, recipe: str) -> list:
    return (scales if recipe == "mxfp8" else scales.view(torch.int32)).tolist()


def _awkward(n: int, h: int, dtype, specials: bool = True) -> torch.Tensor:
    """Rows of random values at very different magnitudes (down to fp32 subnormals where the dtype has them), with a
    zero row, a -0 row, a NaN, an inf and a row of ties between FP8 codes."""
    exps = [0, -3, 7, -20, 20, -60, 90, -140, -149] if dtype != torch.float16 else [0, -3, 7, -12, 10, -20]
    magnitudes = torch.tensor([2.0 ** exps[i % len(exps)] for i in range(n)], dtype=torch.float64)
    x = (torch.randn(n, h, dtype=torch.float64) * magnitudes[:, None]).to(dtype)
    if specials and n >= 6 and h >= 8:
        x[1] = 0.0
        x[2] = -0.0
        x[3, h // 2] = NAN
        x[4, 3] = -INF
        x[5] = (torch.arange(h) % 16 + 16.5).to(dtype)  # halves: ties of E4M3 codes at scale 1 when 448 is in the row
        x[5, 0] = 448.0
    return x


# ---------------------------------------------------------------------------------------------------------------
# The oracle itself


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_decode_matches_torch(fp8):
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(fp8).float().tolist()
    for b, v in enumerate(values):
        d = _decode(b, fp8)
        assert (math.isnan(v) and math.isnan(d)) or v == d, (b, v, d)


# ---------------------------------------------------------------------------------------------------------------
# The transcription against the oracle


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recipe, hidden", [("rowwise", 40), ("blockwise", 300), ("mxfp8", 96)])
@pytest.mark.parametrize("device", DEVICES)
def test_transcription_matches_oracle(recipe, hidden, dtype, fp8, device):
    x = _awkward(12, hidden, dtype).to(device)
    q, s = RF.quantize(x, recipe, fp8)
    assert q.dtype == fp8 and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == RF.scale_dtype(recipe) and tuple(s.shape) == RF.scale_shape(12, hidden, recipe)
    q_exp, s_exp = oracle(x.cpu(), recipe, fp8)
    assert q.view(torch.uint8).tolist() == q_exp
    assert _bits(s.cpu(), recipe) == s_exp


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_rounding_boundaries_of_the_cast(fp8):
    # scale 1 (fp8_max in the row): q is the cast of x itself; every midpoint between codes and its fp32 neighbours
    values, _ = _table(fp8)
    mids = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    m32 = torch.tensor(mids, dtype=torch.float32)
    assert m32.tolist() == mids  # midpoints of FP8 codes are fp32 values
    below, above = torch.nextafter(m32, torch.zeros_like(m32)), torch.nextafter(m32, torch.full_like(m32, INF))
    row = torch.stack([m32, below, above, -m32], 1).reshape(-1)
    x = torch.cat([torch.tensor([RF.FP8_MAX[fp8]]), row]).unsqueeze(0)
    q, s = RF.quantize_rowwise(x, fp8)
    assert s.item() == 1.0
    assert q.view(torch.uint8).tolist() == oracle(x, "rowwise", fp8)[0]


def test_rowwise_by_hand():
    x = torch.tensor([[896.0, 1.0, -3.0, 0.0, 1.0625, -1.1875]])
    q, s = RF.quantize_rowwise(x)
    assert s.tolist() == [2.0]  # 896 / 448
    # 448 -> 0x7E, 0.5 -> 0x30, -1.5 -> 0xBC, 0, 0.53125 -> 0.5 (tie, even), -0.59375 -> -0.625 (tie, even 0x32)
    assert q.view(torch.uint8).tolist() == [[0x7E, 0x30, 0xBC, 0x00, 0x30, 0xB2]]
    q, s = RF.quantize_rowwise(torch.tensor([[0.0, 0.0], [-0.0, -0.0], [2.0**-149, -(2.0**-149)]]))
    assert s.tolist() == [1.0, 1.0, 2.0**-149]  # zero rows: scale 1; 2^-149 / 448 underflows: scale 2^-149
    assert q.view(torch.uint8).tolist() == [[0, 0], [0x80, 0x80], [0x38, 0xB8]]  # -0 kept; +-1.0
    # subnormal scale: 2^-140 / 448 rounds to 2^-149 (1.14 ulps -> 1), so 2^-140 / scale = 512 saturates to 448
    q, s = RF.quantize_rowwise(torch.tensor([[2.0**-140, -(2.0**-141)]]))
    assert s.tolist() == [2.0**-149] and q.view(torch.uint8).tolist() == [[0x7E, 0xF8]]  # 448, -256
    q, s = RF.quantize_rowwise(torch.tensor([[57344.0 * 4, -1.0]]), E5M2)
    assert s.tolist() == [4.0] and q.view(torch.uint8).tolist() == [[0x7B, 0xB4]]  # 57344, -0.25
    # E5M2, subnormal scale: 2^-133 / 57344 rounds to 2^-149, 2^-133 / 2^-149 = 65536 saturates to 57344 (the cast
    # alone would give inf)
    q, s = RF.quantize_rowwise(torch.tensor([[2.0**-133, 2.0**-134]]), E5M2)
    assert s.tolist() == [2.0**-149] and q.view(torch.uint8).tolist() == [[0x7B, 0x78]]  # 57344, 32768


def test_special_values_by_hand():
    x = torch.tensor([[1.0, NAN, -2.0], [1.0, -INF, -2.0], [-NAN, 0.0, 1.0]])
    q, s = RF.quantize_rowwise(x)
    bits = s.view(torch.int32).tolist()
    assert bits[0] == bits[2] == 0x7FC00000 and s[1].item() == INF  # NaN row: the one NaN pattern; inf row: inf
    assert q.view(torch.uint8).tolist() == [[0x7F] * 3, [0x00, 0x7F, 0x80], [0x7F] * 3]
    d = RF.dequantize(q, s)
    assert d.isnan().all()  # NaN rows; the inf row: 0 * inf and NaN * inf


@pytest.mark.parametrize("fp8, emax, one, big", [(E4M3, 8, 0x78, 0x7E), (E5M2, 15, 0x78, 0x7B)], ids=["e4m3", "e5m2"])
def test_mxfp8_by_hand(fp8, emax, one, big):
    x = torch.zeros(6, 32)
    x[0, 0], x[0, 1] = 1.0, -0.5  # amax 1: X = -emax, 1.0 -> 2^emax
    x[1, 0] = 1.9  # X = -emax; 1.9 2^emax is above the max: saturates
    x[3, 5] = 2.0**-140  # subnormal amax: X clamped to -127 (byte 0); 2^-13 is 0 in E4M3, a normal E5M2
    x[4, 0], x[4, 1] = 1.5 * 2.0**127, NAN
    x[5, 0] = 1.5 * 2.0**127  # the largest exponents: X = 127 - emax
    q, s = RF.quantize_mxfp8(x, fp8)
    b = q.view(torch.uint8)
    assert s.squeeze(1).tolist() == [127 - emax, 127 - emax, 127, 0, 255, 254 - emax]
    assert b[0, :3].tolist() == [one, one - 8 + 0x80 if fp8 == E4M3 else one - 4 + 0x80, 0]
    assert b[1, 0].item() == big
    assert not b[2].any()  # zero block: bytes 0, scale 127 (a padding row)
    assert b[3, 5].item() == (0 if fp8 == E4M3 else 0x08)
    assert b[4].tolist() == [0x7F] * 32  # NaN block: E8M0 NaN and NaN elements
    assert b[5, 0].item() == (0x7C if fp8 == E4M3 else 0x7A)  # 1.5 * 2^emax: 384 (E4M3) / 49152 (E5M2)
    x[0, 7] = -INF
    q, s = RF.quantize_mxfp8(x, fp8)
    assert s[0].item() == 255 and q.view(torch.uint8)[0].tolist() == [0x7F] * 32


def test_rowwise_scales_are_amax_over_448_in_fp64():
    exps = torch.randint(-149, 120, (4000, 1)).double()
    x = (torch.rand(4000, 16, dtype=torch.float64) * 2.0**exps).float()
    x[::97] = 0.0
    q, s = RF.quantize_rowwise(x)
    amax = x.abs().amax(1).double()
    exp = (amax / 448.0).float()
    exp = torch.where(exp == 0, torch.full_like(exp, 2.0**-149), exp)
    exp = torch.where(amax == 0, torch.ones_like(exp), exp)
    assert torch.equal(s.view(torch.int32), exp.view(torch.int32))


def test_mxfp8_exponents_are_frexp():
    exps = torch.randint(-149, 128, (3000, 1)).double()
    x = (torch.rand(3000, 32, dtype=torch.float64) * 2.0**exps).float()
    x[::91] = 0.0
    # amax one fp32 ulp below a power of two: torch.log2 rounds it up to the integer (floor off by one), frexp not
    powers = 2.0 ** torch.arange(-126, 128, dtype=torch.float64).float()
    x[1 : 1 + powers.numel(), 0] = torch.nextafter(powers, torch.zeros_like(powers))
    x[1 : 1 + powers.numel(), 1:] = 0.0
    _, s = RF.quantize_mxfp8(x)
    for amax, byte in zip(x.abs().amax(1).tolist(), s.squeeze(1).tolist(), strict=True):
        expected = 127 if amax == 0 else min(max(math.frexp(amax)[1] - 1 - 8, -127), 127) + 127
        assert byte == expected, (amax, byte, expected)


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("recipe", RF.RECIPES)
def test_dequantize_error_is_within_the_fp8_step(recipe, fp8):
    x = _awkward(24, 256, torch.float32, specials=False)
    q, s = RF.quantize(x, recipe, fp8)
    d = RF.dequantize(q, s, recipe)
    assert d.dtype == torch.float32 and d.shape == x.shape
    rel, sub = (2.0**-4, 2.0**-10) if fp8 == E4M3 else (2.0**-3, 2.0**-17)  # half a step: normal, subnormal codes
    group = {"rowwise": 256, "blockwise": RF.BLOCK, "mxfp8": RF.MX_BLOCK}[recipe]
    if recipe == "mxfp8":
        scale = RF.e8m0_to_float(s).double()
    else:
        scale = (s.unsqueeze(1) if recipe == "rowwise" else s).double()
    scale = scale.repeat_interleave(group, 1)[:, :256]
    xd = x.double()
    over = (xd.abs() - RF.FP8_MAX[fp8] * scale).clamp(min=0)  # mxfp8 saturation ("floor" mode)
    bound = torch.maximum(rel * xd.abs(), sub * scale) * (1 + 2.0**-16) + over + 2.0**-149
    assert ((d.double() - xd).abs() <= bound).all()


@pytest.mark.parametrize("recipe", RF.RECIPES)
def test_empty_inputs(recipe):
    for n, h in [(0, 64), (3, 0), (0, 0)]:
        q, s = RF.quantize(torch.zeros(n, h), recipe)
        assert q.shape == (n, h) and tuple(s.shape) == RF.scale_shape(n, h, recipe)
        assert RF.dequantize(q, s, recipe).shape == (n, h)
    assert RF.quantize(torch.zeros(2, 0), "rowwise")[1].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# permute_quantized: move then quantize == quantize then move == the op


PAD = {"rowwise": 1.0, "blockwise": 1.0, "mxfp8": 127}


def _tokens(t, h, dtype, device):
    x = torch.randn(t, h) * 2.0 ** torch.randint(-8, 9, (t, 1)).float()
    return x.to(dtype).to(device)


def _rows_out(rm, rule):
    routed = int(rm.sum())
    return {"none": None, "more": routed + 5, "fewer": max(routed - 5, 0)}[rule]


def _moved_then_quantized(x, rm, p, n, recipe, fp8, align):
    if align is None:
        perm, pp, row_map = moe_raw.permute(x, rm, p, n, fused=True)
    else:
        perm, pp, row_map, _, _ = moe_raw.permute_and_pad(x, rm, p, align, n)
    return (*RF.quantize(perm, recipe, fp8), pp, row_map)


def _quantized_then_moved(x, row_map, n_rows, recipe, fp8):
    q, s = RF.quantize(x, recipe, fp8)
    q_rows = moe_raw.permute_with_row_map(q, row_map, n_rows)
    s_rows = moe_raw.permute_with_row_map(s, row_map, n_rows)
    ones = torch.ones(x.shape[0], dtype=torch.uint8, device=x.device)
    real = moe_raw.permute_with_row_map(ones, row_map, n_rows).bool()
    real = real.unsqueeze(1) if s_rows.dim() == 2 else real
    return q_rows, torch.where(real, s_rows, torch.full_like(s_rows, PAD[recipe]))


def _check_op(x, rm, p, n, recipe, fp8, align):
    got = moe_raw.permute_quantized(x, rm, p, n, recipe, fp8, align)
    expected = _moved_then_quantized(x, rm, p, n, recipe, fp8, align)
    for name, a, b in zip(("q", "scales", "probs", "row_map"), got, expected, strict=True):
        if b is None:
            assert a is None, name
        else:
            assert_exact(a, b, name)
    q_rows, s_rows = _quantized_then_moved(x, got[3], got[0].shape[0], recipe, fp8)
    assert_exact(got[0], q_rows, "q vs quantize-then-move")
    assert_exact(got[1], s_rows, "scales vs quantize-then-move")
    return got


@pytest.mark.parametrize("align", [None, 16])
@pytest.mark.parametrize("rule", ["none", "more", "fewer"])
@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_permute_quantized_equals_both_orders(device, recipe, dtype, fp8, rule, align):
    rm = make_routing(37, 6, 2, device, kind="empty_expert")
    x = _tokens(37, 160, dtype, device)  # 160: a partial 1x128 block, five MX blocks
    x[5] = 0.0
    p = make_probs(rm, torch.float32, off_route=NAN)
    q, s, pp, row_map = _check_op(x, rm, p, _rows_out(rm, rule), recipe, fp8, align)
    kept = int(row_map[37, 0])
    spare = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    if align is None:
        spare[:kept] = False
    else:
        lines = row_map[37:].cpu()
        start = 0
        for e in range(6):  # the real rows of expert e: [start, first padding row)
            spare[start : int(lines[1, e])] = False
            start = int(lines[2, e])
    assert not q[spare].view(torch.uint8).any() and not pp[spare].any()
    assert (s[spare] == PAD[recipe]).all()


@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_without_probs_and_empty(device, recipe):
    rm = make_routing(9, 4, 2, device)
    x = _tokens(9, 64, torch.bfloat16, device)
    assert _check_op(x, rm, None, None, recipe, E4M3, None)[2] is None
    assert _check_op(x, rm, None, 30, recipe, E5M2, 8)[2] is None
    rm0, x0 = make_routing(0, 4, 2, device), _tokens(0, 64, torch.float32, device)
    p0 = make_probs(rm0)
    for n, align, rows in [(None, None, 0), (5, None, 5), (None, 4, 0), (3, 4, 3 + 4 * 3)]:
        q, s, pp, row_map = _check_op(x0, rm0, p0, n, recipe, E4M3, align)
        assert q.shape == (rows, 64) and pp.shape == (rows,) and row_map.shape[0] == (1 if align is None else 3)


@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_tokens(device, recipe):
    rm = make_routing(21, 5, 2, device, kind="sparse")
    p = make_probs(rm)
    x = _tokens(21, 96, torch.bfloat16, device)
    wide = torch.zeros(21, 130, dtype=torch.bfloat16, device=device)
    wide[:, :96] = x
    transposed = x.T.contiguous().T
    expected = moe_raw.permute_quantized(x, rm, p, 50, recipe, E4M3, 4)
    for view in (wide[:, :96], transposed):
        got = _check_op(view, rm, p, 50, recipe, E4M3, 4)
        for a, b in zip(got, expected, strict=True):
            assert_exact(a, b, "strided tokens")


@pytest.mark.parametrize("align", [None, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_probs_gradient_and_no_fp8_gradient(device, align):
    rm = make_routing(15, 4, 2, device)
    x = _tokens(15, 64, torch.float32, device).requires_grad_(True)
    p = make_probs(rm).requires_grad_(True)
    q, s, pp, _ = moe_raw.permute_quantized(x, rm, p, 40, "blockwise", E4M3, align)
    assert not q.requires_grad and not s.requires_grad and pp.requires_grad
    w = torch.randn(pp.shape, device=device)
    (pp * w).sum().backward()
    assert x.grad is None
    p2 = p.detach().clone().requires_grad_(True)
    rows = _moved_then_quantized(x.detach(), rm, p2, 40, "blockwise", E4M3, align)[2]
    (rows * w).sum().backward()
    assert_exact(p.grad, p2.grad, "probs gradient")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RF.RECIPES)
def test_no_host_sync_with_num_out_tokens(recipe):
    rm = make_routing(64, 8, 2, "cuda")
    x, p = _tokens(64, 256, torch.bfloat16, "cuda"), make_probs(rm)
    moe_raw.permute_quantized(x, rm, p, 128, recipe)  # first use: kernels compiled outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_raw.permute_quantized(x, rm, p, 128, recipe)
        moe_raw.permute_quantized(x, rm, p, 128, recipe, align_size=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("hidden", [96, 160, 2048, 7168])
def test_quantize_kernels_agree(hidden, recipe, dtype, fp8, monkeypatch):
    """quantize_warp (a warp a token, rows of whole 16-byte packs) and quantize_rows (a block a token) give the same
    bits, on rows of awkward values (zeros, -0, NaN, inf, subnormal scales, ties), with spare and padding rows."""
    from moe_raw._kernels import quantize as QK

    if recipe == "mxfp8" and hidden % 32:
        pytest.skip("mxfp8 needs H % 32 == 0")
    T, E = 50, 16
    rm = make_routing(T, E, 4, "cuda", kind="sparse")
    x = _awkward(T, hidden, dtype).to("cuda")
    p = make_probs(rm)
    runs = {}
    for kernel in ("warp", "block"):
        monkeypatch.setattr(QK, "_QUANT_KERNEL", kernel)
        runs[kernel] = [
            moe_raw.permute_quantized(x, rm, p, T * 4 + 7, recipe, fp8),
            moe_raw.permute_quantized(x, rm, p, None, recipe, fp8, align_size=32),
        ]
    for i, (warp, block) in enumerate(zip(runs["warp"], runs["block"], strict=True)):
        for name, a, b in zip(("q", "scales", "probs", "row_map"), warp, block, strict=True):
            assert_exact(a, b, f"call {i} {name}: quantize_warp vs quantize_rows")


# ---------------------------------------------------------------------------------------------------------------
# dequantize (public) and bad input


@pytest.mark.parametrize("recipe", RF.RECIPES)
@pytest.mark.parametrize("device", DEVICES)
def test_public_dequantize(device, recipe):
    rm = make_routing(11, 4, 2, device)
    x = _tokens(11, 160, torch.float32, device)
    q, s, _, _ = moe_raw.permute_quantized(x, rm, None, None, recipe)
    assert_exact(moe_raw.dequantize(q, s, recipe), RF.dequantize(q, s, recipe), "dequantize")


def _bad_calls():
    rm = make_routing(4, 3, 1)
    x = torch.randn(4, 64)
    ok = dict(tokens=x, routing_map=rm)
    return [
        (dict(ok, recipe="tensorwise"), ValueError, "recipe must be one of"),
        (dict(ok, recipe=1), TypeError, "recipe must be a str"),
        (dict(ok, fp8_dtype=torch.float16), TypeError, "fp8_dtype must be"),
        (dict(ok, fp8_dtype=torch.float8_e4m3fnuz), TypeError, "fp8_dtype must be"),
        (dict(ok, fp8_dtype="e4m3"), TypeError, "fp8_dtype must be"),
        (dict(ok, tokens=torch.randn(4, 48), recipe="mxfp8"), ValueError, "multiple of 32"),
        (dict(ok, align_size=0), ValueError, "align_size must be None or in"),
        (dict(ok, align_size=2048), ValueError, "align_size must be None or in"),
        (dict(ok, align_size=True), TypeError, "align_size must be an int"),
        (dict(ok, num_out_tokens=-1), ValueError, "num_out_tokens must be >= 0"),
        (dict(ok, tokens=x.double()), TypeError, "tokens must have dtype in"),
        (dict(ok, tokens=x.to(E4M3)), TypeError, "tokens must have dtype in"),
        (dict(ok, tokens=x.int()), TypeError, "tokens must have dtype in"),
        (dict(ok, tokens=x[0]), ValueError, "tokens must be 2-D"),
        (dict(ok, routing_map=rm[:3]), ValueError, "routing_map has 3 rows"),
        (dict(ok, probs=torch.rand(4, 2)), ValueError, "probs must be"),
    ]


@pytest.mark.parametrize("kwargs, exc, match", _bad_calls())
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        moe_raw.permute_quantized(**kwargs)
    assert "moe_raw.permute_quantized" in str(info.value)


def test_dequantize_bad_input():
    q, s = RF.quantize(torch.randn(4, 64), "blockwise")
    cases = [
        ((q.float(), s, "blockwise"), TypeError, "q must have dtype"),
        ((q, s, "mx"), ValueError, "recipe must be one of"),
        ((q, s, "rowwise"), ValueError, r"rowwise scales must be \[N\]"),
        ((q, s.double(), "blockwise"), TypeError, "scales must have dtype"),
        ((q, s, "mxfp8"), TypeError, "scales must have dtype"),
        ((q[:, :48], s.to(torch.uint8)[:, :1], "mxfp8"), ValueError, "% 32 == 0"),
        ((q, torch.cat([s, s], 1), "blockwise"), ValueError, "blockwise scales must be"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe_raw.dequantize(*args)


# ---------------------------------------------------------------------------------------------------------------
# Scale layouts: "column-major" (blockwise, DeepGEMM's TMA-aligned LHS scales) and "swizzled" (mxfp8, cuBLAS's
# 128x4 block scaling factors layout), each against byte offsets computed by plain Python loops from the documented
# formulas (not the implementation's view / permute), their padding, their inverse, and permute_quantized.

LAYOUT = {"blockwise": "column-major", "mxfp8": "swizzled"}
# rows N (0, below / at / above multiples of 4 and 128) x hidden H (G = ceil(H / 128) blocks, or H / 32 MX blocks)
LAYOUT_ROWS = [0, 1, 3, 4, 5, 127, 128, 129, 300]
LAYOUT_HIDDEN = {"blockwise": [0, 100, 128, 300, 640], "mxfp8": [0, 32, 96, 160, 288]}


def _column_major_buffer(rows: list, n: int, g: int) -> list:
    """The [G, N_pad] buffer as a flat list: scale (r, b) at b * N_pad + r, N_pad the least multiple of 4 >= N, the
    rest 1.0."""
    n_pad = n + (4 - n % 4) % 4
    flat = [1.0] * (g * n_pad)
    for r in range(n):
        for b in range(g):
            flat[b * n_pad + r] = rows[r][b]
    return flat


def _swizzled_bytes(rows: list, n: int, g: int) -> list:
    """cuBLAS's 1D block scaling factors layout, flat: 128x4 tiles of 512 bytes in (row tile, column tile) order;
    inside a tile row r, column c at (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4. Padding bytes 127."""
    row_tiles, col_tiles = (n + 127) // 128, (g + 3) // 4
    flat = [127] * (row_tiles * 128 * col_tiles * 4)
    for r in range(n):
        for c in range(g):
            tile = (r // 128) * col_tiles + c // 4
            flat[tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4] = rows[r][c]
    return flat


def _assert_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_exact, with float32 compared as bit patterns (NaN scales and NaN dequantized values included)."""
    if got.dtype == torch.float32 and expected.dtype == torch.float32:
        got, expected = got.view(torch.int32), expected.view(torch.int32)
    assert_exact(got, expected, what)


def _buffer_of(view: torch.Tensor, numel: int) -> torch.Tensor:
    """The whole allocation behind a view (storage offset 0), flat."""
    assert view.storage_offset() == 0
    assert view.untyped_storage().nbytes() == numel * view.element_size()
    return torch.as_strided(view, (numel,), (1,))


def _row_major_scales(n: int, hidden: int, recipe: str, device) -> torch.Tensor:
    """Distinct scales (with a NaN and an inf for blockwise; every byte value for mxfp8)."""
    g = RF.scale_shape(n, hidden, recipe)[1]
    if recipe == "mxfp8":
        return (torch.arange(n * g) % 256).to(torch.uint8).view(n, g).to(device)
    s = torch.arange(1, n * g + 1, dtype=torch.float32).view(n, g) * 0.5
    if n * g > 2:
        s.view(-1)[1], s.view(-1)[2] = NAN, INF
    return s.to(device)


@pytest.mark.parametrize("hidden_i", range(5))
@pytest.mark.parametrize("n", LAYOUT_ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_column_major_layout(device, n, hidden_i):
    hidden = LAYOUT_HIDDEN["blockwise"][hidden_i]
    s = _row_major_scales(n, hidden, "blockwise", device)
    g = s.shape[1]
    cm = RF.to_scale_layout(s, "blockwise", "column-major")
    n_pad = -(-n // 4) * 4
    assert cm.shape == s.shape and cm.dtype == torch.float32 and cm.device == s.device
    if n > 0:
        assert cm.stride() == (1, n_pad)  # DeepGEMM: get_tma_aligned_size(N, 4) = ceil(N / 4) * 4
    assert n_pad % 4 == 0 and n <= n_pad < n + 4
    expected = _column_major_buffer(s.cpu().tolist(), n, g)
    got = _buffer_of(cm, g * n_pad).cpu()
    assert got.view(torch.int32).tolist() == torch.tensor(expected).view(torch.int32).tolist()  # NaN bits too
    _assert_bits(cm, s, "column-major view reads the row-major values")
    back = RF.from_scale_layout(cm, "blockwise", "column-major", n, hidden)
    assert back.is_contiguous() and torch.equal(back.view(torch.int32), s.view(torch.int32))


@pytest.mark.parametrize("hidden", LAYOUT_HIDDEN["mxfp8"])
@pytest.mark.parametrize("n", LAYOUT_ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_swizzled_layout(device, n, hidden):
    s = _row_major_scales(n, hidden, "mxfp8", device)
    g = s.shape[1]
    sw = RF.to_scale_layout(s, "mxfp8", "swizzled")
    rows, cols = -(-n // 128) * 128, -(-g // 4) * 4
    assert sw.shape == (rows, cols) == RF.layout_shape(n, hidden, "mxfp8", "swizzled")
    assert sw.dtype == torch.uint8 and sw.is_contiguous() and sw.device == s.device
    # torch._scaled_mm's MX check: round_up(M, 128) * round_up(ceil(K / 32), 4) elements
    assert sw.numel() == -(-n // 128) * 128 * (-(-(hidden // 32) // 4) * 4)
    assert sw.view(-1).tolist() == _swizzled_bytes(s.cpu().tolist(), n, g)
    for blocked in (sw, sw.view(-1)):  # the inverse, from the 2-D tensor or its flat bytes
        _assert_bits(RF.from_scale_layout(blocked, "mxfp8", "swizzled", n, hidden), s, "unswizzled")


def test_swizzled_tile_by_hand():
    # one 128x4 tile: row r, column c at (r % 32) * 16 + (r // 32) * 4 + c
    s = torch.zeros(128, 4, dtype=torch.uint8)
    s[0, 0], s[1, 0], s[32, 0], s[0, 1], s[127, 3], s[33, 2] = 1, 2, 3, 4, 5, 6
    flat = RF.swizzle_mx(s).view(-1)
    for offset, value in [(0, 1), (16, 2), (4, 3), (1, 4), (31 * 16 + 3 * 4 + 3, 5), (16 + 4 + 2, 6)]:
        assert flat[offset].item() == value, offset
    # two column tiles and two row tiles: tile (1, 0) follows both tiles of row tile 0
    s = torch.zeros(129, 5, dtype=torch.uint8)
    s[128, 0], s[0, 4] = 7, 8
    flat = RF.swizzle_mx(s).view(-1)
    assert flat.numel() == 256 * 8 and flat[2 * 512].item() == 7 and flat[512].item() == 8
    assert flat[512 + 1].item() == 127  # padding column 5 of row 0


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("recipe, hidden", [("blockwise", 300), ("mxfp8", 160)])
@pytest.mark.parametrize("n", [0, 5, 130])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_and_dequantize_in_each_layout(device, n, recipe, hidden, fp8):
    x = _awkward(n, hidden, torch.float32).to(device)
    layout = LAYOUT[recipe]
    q, s = RF.quantize(x, recipe, fp8)
    q2, s2 = RF.quantize(x, recipe, fp8, layout)
    _assert_bits(q2, q, "q does not depend on the layout")
    _assert_bits(s2, RF.to_scale_layout(s, recipe, layout), "scales")
    _assert_bits(RF.dequantize(q, s2, recipe, layout), RF.dequantize(q, s, recipe), "dequantize")
    _assert_bits(moe_raw.dequantize(q, s2, recipe, layout), RF.dequantize(q, s, recipe), "public dequantize")
    if layout == "swizzled":
        _assert_bits(moe_raw.dequantize(q, s2.view(-1), recipe, layout), RF.dequantize(q, s, recipe), "flat")


def test_column_major_dequantize_is_differentiable_to_the_buffer():
    x = torch.randn(6, 256)
    q, s = RF.quantize(x, "blockwise")
    buffer = RF.to_scale_layout(s, "blockwise", "column-major").T.detach().clone().requires_grad_(True)  # [G, 8]
    d = moe_raw.dequantize(q, buffer.T[:6], "blockwise", "column-major")
    d.sum().backward()
    expected = q.float().view(6, 2, 128).sum(-1).T  # d / d scale = the sum of the block's q
    _assert_bits(buffer.grad[:, :6], expected, "gradient")
    assert not buffer.grad[:, 6:].any()


@pytest.mark.parametrize("align", [None, 4, 128])
@pytest.mark.parametrize("rule", ["none", "more", "fewer"])
@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8"])
@pytest.mark.parametrize("device", DEVICES)
def test_permute_quantized_layouts_rearrange_the_row_major_result(device, recipe, rule, align):
    rm = make_routing(37, 6, 2, device, kind="empty_expert")
    x = _tokens(37, 160, torch.bfloat16, device)
    p = make_probs(rm, torch.float32, off_route=NAN)
    n = _rows_out(rm, rule)
    layout = LAYOUT[recipe]
    q, s, pp, row_map = moe_raw.permute_quantized(x, rm, p, n, recipe, E4M3, align)
    got = moe_raw.permute_quantized(x, rm, p, n, recipe, E4M3, align, scale_layout=layout)
    for name, a, b in zip(("q", "probs", "row_map"), (got[0], got[2], got[3]), (q, pp, row_map), strict=True):
        _assert_bits(a, b, name)
    _assert_bits(got[1], RF.to_scale_layout(s, recipe, layout), f"{layout} scales")
    _assert_bits(RF.from_scale_layout(got[1], recipe, layout, q.shape[0], 160), s, "back to row-major")
    if layout == "column-major":
        rows = q.shape[0]
        assert got[1].stride() == (1, -(-rows // 4) * 4) or rows == 0
    elif align == 128 and rule == "none":  # exact padded total: every expert's rows start on a 128-row boundary
        # torch._scaled_grouped_mm (MXFP8 2d-3d) reads each group swizzled on its own, groups concatenated
        ends = [0] + row_map[37 + 2].tolist()
        per_group = [RF.swizzle_mx(s[a:b]).view(-1) for a, b in zip(ends, ends[1:], strict=False)]
        _assert_bits(got[1].view(-1), torch.cat(per_group), "per-group swizzle")


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8"])
@pytest.mark.parametrize("device", DEVICES)
def test_layouts_with_no_tokens(device, recipe):
    rm0, x0 = make_routing(0, 4, 2, device), _tokens(0, 64 if recipe == "mxfp8" else 300, torch.float32, device)
    layout = LAYOUT[recipe]
    for n, align in [(None, None), (5, None), (None, 4), (3, 4)]:
        q, s, _, _ = moe_raw.permute_quantized(x0, rm0, None, n, recipe, E4M3, align, layout)
        _, s_row, _, _ = moe_raw.permute_quantized(x0, rm0, None, n, recipe, E4M3, align)
        assert tuple(s.shape) == RF.layout_shape(q.shape[0], q.shape[1], recipe, layout)
        _assert_bits(RF.from_scale_layout(s, recipe, layout, q.shape[0], q.shape[1]), s_row, "empty")
        assert (s_row == PAD[recipe]).all()  # spare / padding rows
        assert moe_raw.dequantize(q, s, recipe, layout).shape == q.shape


def _layout_bad_calls():
    rm = make_routing(4, 3, 1)
    ok = dict(tokens=torch.randn(4, 64), routing_map=rm)
    return [
        (dict(ok, recipe="rowwise", scale_layout="column-major"), ValueError, "'column-major' is for recipe"),
        (dict(ok, recipe="mxfp8", scale_layout="column-major"), ValueError, "'column-major' is for recipe"),
        (dict(ok, recipe="rowwise", scale_layout="swizzled"), ValueError, "'swizzled' is for recipe 'mxfp8'"),
        (dict(ok, recipe="blockwise", scale_layout="swizzled"), ValueError, "'swizzled' is for recipe 'mxfp8'"),
        (
            dict(ok, recipe="blockwise", scale_layout="col-major"),
            ValueError,
            "scale_layout must be one of.*'col-major'",
        ),
        (dict(ok, recipe="mxfp8", scale_layout="blocked"), ValueError, "scale_layout must be one of.*'blocked'"),
        (dict(ok, recipe="blockwise", scale_layout=None), TypeError, "scale_layout must be a str"),
    ]


@pytest.mark.parametrize("kwargs, exc, match", _layout_bad_calls())
def test_layout_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        moe_raw.permute_quantized(**kwargs)
    assert "moe_raw.permute_quantized" in str(info.value)


def test_layout_errors_of_the_transcription_and_dequantize():
    x = torch.randn(5, 256)
    with pytest.raises(ValueError, match="'swizzled' is for recipe 'mxfp8'"):
        RF.quantize(x, "rowwise", scale_layout="swizzled")
    with pytest.raises(ValueError, match="'column-major' is for recipe 'blockwise'"):
        RF.dequantize(*RF.quantize(x, "mxfp8"), "mxfp8", "column-major")
    qb, sb = RF.quantize(x, "blockwise", scale_layout="column-major")
    qm, sm = RF.quantize(x, "mxfp8", scale_layout="swizzled")
    cases = [
        ((qb, sb, "blockwise", "swizzled"), ValueError, "'swizzled' is for recipe 'mxfp8'"),
        ((qb, sb, "blockwise", "tiled"), ValueError, "scale_layout must be one of"),
        ((qb, sb, "blockwise", 0), TypeError, "scale_layout must be a str"),
        ((qb, sb.contiguous(), "blockwise", "column-major"), ValueError, r"strides \(1, >= N\)"),
        ((qb, sb[:4], "blockwise", "column-major"), ValueError, "blockwise scales must be"),
        ((qm, sm, "mxfp8", "row-major"), ValueError, r"mxfp8 scales must be \[N, H / 32\]"),
        ((qm, sm[:, :4].contiguous(), "mxfp8", "swizzled"), ValueError, "swizzled mxfp8 scales must be"),
        ((qm, sm.view(-1)[:-1], "mxfp8", "swizzled"), ValueError, "swizzled mxfp8 scales must be"),
        ((qm, sm.float(), "mxfp8", "swizzled"), TypeError, "scales must have dtype"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe_raw.dequantize(*args)
