"""Code generation of the gated-activation kernels (Numba CUDA): device functions, the activation's math, the kernel
template, the kernel's parameter list, compile (Numba / NVVM) and PTX.

Kernels (one file, built lazily so ``import moe_raw`` needs no Numba). Launch: block = 256 threads = 8 warps, **one
warp per row** (backward) or **per row segment of at most 32 units, one a lane** (forward), grid.x = cdiv(warps, 8)
(``warp_items``). Segments keep a long row's work spread over many short-lived warps: on an H200 the forward at F =
2048 went from 88% to 93-94% of copy (64 units; 32: 92-94%, 128: 91%, 16: 50-54%, all with two units a lane at 40
registers; bench/results/2026-12-04-h200-issue16). One unit a lane: 32 registers (8 blocks a SM). Lanes stride over
the row's F columns (the segment's) in *units*: a 16-byte vector (``ld.global.v4.u32`` / ``st.global.v4.u32``, 8
bf16/fp16 or 4 fp32 values) when every row start, the gate/up split and every stride are 16-byte aligned and y, g and
the output share one dtype; else one element (any F, any dtype mix). A lane's units are c, c + 32, ...; the backward
loads 16-byte units two at a time before either is stored in the PTX, but ptxas (sm_90) issues the second unit's
loads after the first unit's math (SASS: docs/performance.md, ninth session). All math in fp32. The weighted backward
writes ``dy`` and reduces the per-row dot ``sum(swiglu(y) * g)`` for ``dweights`` in the same pass: each lane sums
its columns in order, then a fixed pairwise tree over the 32 lanes in shared memory: no atomics.
bf16 and fp16 are handled as uint16 bit patterns (Numba has no reliable bf16 type): bf16 widens by a 16-bit
shift; both narrow with round to nearest even, on the GPU by the hardware cvt (two values to a word in one, NaN ->
0x7FC0 for bf16, as torch's scalar conversion, set on a rare branch: once a 16-byte unit in the forward, once a word
in the backward), under the simulator by exact integer code (both checked against torch on every bit pattern).
silu uses torch's accurate expf / division for fp32 data and ``ex2.approx.ftz`` / ``__fdividef`` for bf16 / fp16
data (their few-ulp fp32 error is far below a 16-bit rounding, and the cheaper math keeps the kernels under the issue
rate at full bandwidth: sm_90 SASS of the bf16 forward 384 -> 304 instructions, backward 864 -> 744).
Bytes (bench/bench_swiglu.py): forward reads 2F and writes F elements per row (+ one weight); the weighted
backward reads g (F) and y (2F) and writes dy (2F) per row, plus a weight read and a dweight write.
Measured: the README's performance table (records in bench/results/).

numpy >= 2.5 with numba-cuda 0.30: see ``_numba_numpy_compat`` (numba-cuda registers ``np.row_stack``, which
numpy 2.5 removed, at its first compile). Launching (argument packing, caches, launch cost, the simulator) is
``glu_launch``; the GPU's LLVM / PTX intrinsics ``glu_intrinsics``; the public functions ``moe_raw.activations``.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

_BLOCK = 256  # threads per block: 8 warps, one row (forward: one row segment) each
_WARPS_PER_BLOCK = _BLOCK // 32
# The forward's warp takes at most this many units of a row, one a lane (a backward warp takes its whole row: the
# weight gradient is one row's reduction), so a long row spreads over several warps.
_FWD_SEGMENT_UNITS = 32


def warp_items(kind: str, n_rows: int, n_cols: int) -> int:
    """Warps a kernel's grid needs: one per row, the forward's one per row segment."""
    return n_rows * (-(-n_cols // _FWD_SEGMENT_UNITS) if kind == "fwd" else 1)


# The CUDA simulator runs every thread as a Python thread: 2 warps a block there (still several rows per block,
# through the same shared-memory reduction) keeps CI's small cases fast.
_SIM_BLOCK = 64
_VEC_BYTES = 16
# Numba array type of a tensor's storage in the element-wise kernels (bf16/fp16 as their bit patterns).
_ELEM_TYPE = {"f32": "float32", "f16": "uint16", "bf16": "uint16"}
_ELEM_NP = {"f32": np.float32, "f16": np.uint16, "bf16": np.uint16}

# Numba's kernel ABI for an array argument: its data model (numba/cuda/datamodel/cuda_models.py::ArrayModel:
# meminfo, parent, nitems, itemsize, data, shape[ndim], strides[ndim]) flattened into separate parameters, and
# _Kernel._prepare_args (numba/cuda/dispatcher.py) passes them as meminfo=0, parent=0, devary.size,
# dtype.itemsize, devary.ptr, *shape, *strides_in_bytes, each a Python int that cuda.core's ParamHolder
# (cuda/core/_kernel_arg_handler.pyx) stores as an intptr_t. All our arrays are 1-D: 7 words. Our int64 scalars
# are ctypes.c_int64 there: one 8-byte word. tests/test_glu_kernels.py checks both against Numba itself.
_ARRAY_ABI = "PPqqPqq"


# ----------------------------------------------------------------------------------------------------------------
# numpy 2.5 compatibility (module docstring)

_compat_lock = threading.Lock()


def _numba_numpy_compat() -> None:
    """Import numba-cuda's array-function registry with a temporary ``np.row_stack`` where numpy lacks it.

    numba-cuda 0.30 registers ``overload(np.row_stack)`` at import of ``numba.cuda.np.arrayobj``, which its target
    imports on the first compile; numpy 2.5 removed ``row_stack``. The stand-in is a distinct function (so no
    second ``np.vstack`` overload is registered) and is deleted again once the module is imported: numpy stays as
    it was. No-op when numpy has ``row_stack`` or the module is already imported.
    """
    import sys

    if hasattr(np, "row_stack") or "numba.cuda.np.arrayobj" in sys.modules:
        return
    with _compat_lock:
        if "numba.cuda.np.arrayobj" in sys.modules:
            return

        def row_stack(tup):  # pragma: no cover - never called: only its identity is registered
            return np.vstack(tup)

        np.row_stack = row_stack
        try:
            import numba.cuda.np.arrayobj  # noqa: F401
        finally:
            del np.row_stack


# ----------------------------------------------------------------------------------------------------------------
# Kernels (built on first use)

cuda = None  # numba.cuda, bound by _defs(); a module global, as the CUDA simulator swaps it by identity
_defs_lock = threading.RLock()
_DEFS: dict = {}


def _simulator() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def _defs() -> dict:
    """Device functions shared by every kernel: bit casts, conversions, sigmoid, vector loads / stores."""
    if _DEFS:
        return _DEFS
    with _defs_lock:
        if _DEFS:
            return _DEFS
        global cuda
        from numba import cuda as numba_cuda
        from numba import float32, int32, uint16, uint32

        cuda = numba_cuda
        sim = _simulator()
        # Under the simulator device functions are plain Python (its FakeCUDAKernel wrapper costs ~10x per call).
        dev = (lambda fn: fn) if sim else cuda.jit(device=True, forceinline=True)
        if sim:
            # The simulator runs kernels as Python on numpy scalars: no libdevice, no LLVM intrinsics.
            def bits_f32(u):
                return np.uint32(u).view(np.float32)

            def f32_bits(f):
                return np.float32(f).view(np.uint32)

            def expf(x):
                with np.errstate(over="ignore"):
                    return np.float32(np.exp(np.float32(x)))

            fast_expf = expf

            def fast_rcp(x):
                with np.errstate(divide="ignore"):
                    return np.float32(np.float32(1.0) / np.float32(x))

            def add32(a, b):
                return np.uint32((int(a) + int(b)) & 0xFFFFFFFF)

            def ld4(a, i):
                return a[i], a[i + 1], a[i + 2], a[i + 3]

            def st4(a, i, w0, w1, w2, w3):
                a[i] = w0
                a[i + 1] = w1
                a[i + 2] = w2
                a[i + 3] = w3

        else:
            from numba.cuda import libdevice

            from moe_raw._kernels.glu_intrinsics import vector_intrinsics

            @dev
            def bits_f32(u):
                return libdevice.int_as_float(int32(u))

            @dev
            def f32_bits(f):
                return uint32(libdevice.float_as_int(f))

            expf = math.exp  # float32 in -> __nv_expf (accurate, as torch's fp32 silu / sigmoid)
            ld4, st4, add32, hw_dec_f16, hw_enc_f16, ex2_ftz, cvt_bf16, cvt_bf16x2, cvt_f16x2 = vector_intrinsics()

            @dev
            def fast_expf(x):
                # __expf's ex2.approx(x log2 e) with flush to zero: non-ftz ex2 costs three more instructions a
                # value to scale denormal results, which only ever meet 1 + e^-x (= 1 either way)
                return ex2_ftz(x * float32(1.4426950408889634))

            @dev
            def fast_rcp(x):
                return libdevice.fast_fdividef(float32(1.0), x)  # MUFU.RCP; 1/inf = 0, NaN stays NaN

        @dev
        def dec_bf16(h):
            return bits_f32(uint32(h) << uint32(16))

        @dev
        def enc_bf16(f):
            # Round to nearest even on the upper half; NaN -> 0x7FC0 as torch (c10::BFloat16).
            if f != f:
                return uint16(0x7FC0)
            b = f32_bits(f)
            return uint16(add32(add32(b, uint32(0x7FFF)), (b >> uint32(16)) & uint32(1)) >> uint32(16))

        if not sim:
            # On the GPU bf16 narrows in hardware (cvt.rn: round to nearest even, as the integer code), with the
            # NaN pattern set to 0x7FC0 after it (cvt gives 0x7FFF): one conversion and two fix-ups a value
            # against ~7 integer instructions, which left the forward issue-bound on an H200.
            @dev
            def enc_bf16(f):
                return uint16(0x7FC0) if f != f else cvt_bf16(f)

        @dev
        def dec_f16(h):
            h = uint32(h)
            sign = (h & uint32(0x8000)) << uint32(16)
            em = h & uint32(0x7FFF)
            if em >= uint32(0x7C00):  # inf / NaN (payload kept)
                return bits_f32(sign | uint32(0x7F800000) | ((em & uint32(0x3FF)) << uint32(13)))
            # exponent and mantissa moved into place read as a float are the value times 2^-112 (exact, also
            # for subnormal halves, which land on fp32 denormals: Numba compiles without flush-to-zero)
            f = bits_f32(em << uint32(13)) * float32(5.192296858534828e33)
            return bits_f32(f32_bits(f) | sign)

        @dev
        def enc_f16(f):
            # Round to nearest even (F. Giesen's float_to_half_fast3_rtne), NaN -> sign | 0x7E00 as torch.
            b = f32_bits(f)
            sign = (b >> uint32(16)) & uint32(0x8000)
            a = b & uint32(0x7FFFFFFF)
            if a >= uint32(0x47800000):  # |f| >= 65536: inf, or NaN
                o = uint32(0x7E00) if a > uint32(0x7F800000) else uint32(0x7C00)
            elif a < uint32(0x38800000):  # |f| < 2^-14: a subnormal half or zero; the fp32 add rounds (RNE)
                o = add32(f32_bits(bits_f32(a) + float32(0.5)), uint32(0xC1000000))  # - 0x3F000000
            else:
                o = add32(add32(a, uint32(0xC8000FFF)), (a >> uint32(13)) & uint32(1)) >> uint32(13)
            return uint16(o | sign)

        @dev
        def dec_f32(x):
            return float32(x)

        @dev
        def enc_f32(x):
            return float32(x)

        @dev
        def sigmoid(x):
            return float32(1.0) / (float32(1.0) + expf(-x))

        @dev
        def sigmoid_fast(x):
            # For bf16 / fp16 data: 2 MUFU ops instead of ~20 instructions; its few-ulp fp32 error vanishes in
            # the 16-bit rounding, and the kernels stay under the issue rate at full bandwidth.
            return fast_rcp(float32(1.0) + fast_expf(-x))

        # fp32 data gets torch's accurate sigmoid; bf16 / fp16 data the fast one (torch rounds its own
        # intermediates to 16 bits there, so its error is orders of magnitude above either).
        sigmoids = {"f32": sigmoid, "f16": sigmoid_fast, "bf16": sigmoid_fast}
        if not sim:
            # On the GPU fp16 converts in hardware (one cvt each way, IEEE round to nearest even): the integer
            # code above, which the simulator runs and tests/test_glu_kernels.py checks on every bit pattern, costs
            # ~20 instructions with branches per value and made the fp16 backward issue-bound.
            dec_f16, enc_f16 = hw_dec_f16, hw_enc_f16
        codecs = {"f32": (dec_f32, enc_f32), "f16": (dec_f16, enc_f16), "bf16": (dec_bf16, enc_bf16)}

        # pack2[code](lo, hi): two fp32 values narrowed into one 32-bit word of a 16-bit code, lo in the low half.
        # On the GPU one cvt for both (cvt.rn.bf16x2 / f16x2), which leaves a NaN as the hardware writes it (bf16
        # 0x7FFF): the unit stores below test the unit's values for NaN once (one branch a 16-byte unit, not one a
        # word) and on that rare branch set each bf16 NaN half to enc_bf16's 0x7FC0 (nan_fix). The simulator's
        # integer packers write 0x7FC0 themselves; nan_fix leaves their words as they are.
        if sim:

            def packer(enc):
                def pack(lo, hi):
                    return uint32(enc(lo)) | (uint32(enc(hi)) << uint32(16))

                return pack

            pack2 = {code: packer(codecs[code][1]) for code in ("f16", "bf16")}
        else:
            pack2 = {"f16": cvt_f16x2, "bf16": cvt_bf16x2}

        @dev
        def nan_fix_bf16(w):
            # a bf16 half is NaN when its exponent is all ones and its mantissa is not zero: |h| > 0x7F80
            if (w & uint32(0x7FFF)) > uint32(0x7F80):
                w = (w & uint32(0xFFFF0000)) | uint32(0x7FC0)
            if ((w >> uint32(16)) & uint32(0x7FFF)) > uint32(0x7F80):
                w = (w & uint32(0xFFFF)) | uint32(0x7FC00000)
            return w

        _DEFS.update(
            sim=sim,
            dev=dev,
            ld4=ld4,
            st4=st4,
            codecs=codecs,
            pack2=pack2,
            nan_fix_bf16=nan_fix_bf16,
            sigmoids=sigmoids,
            bits_f32=bits_f32,
            f32_bits=f32_bits,
        )
        return _DEFS


# Gated activations. act = (alpha, linear_offset, limit, cubic) names the elementwise function of a kernel:
#   act(a, b) = a' * sigmoid(alpha * (a' + cubic a'^3)) * (b' + linear_offset),
#   a' = min(a, limit),  b' = clamp(b, -limit, limit)
# for the gate a and linear b of one column (limit None: no clamp). SwiGLU is (1, 0, None, 0): silu(a) * b.
# quick_geglu is (1.702, linear_offset, None, 0), gpt-oss's clamped SwiGLU (alpha, 1, limit, 0), and the tanh-GELU
# GEGLU (2 sqrt(2 / pi), 0, None, 0.044715): gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x * sigmoid(2 z),
# z = sqrt(2 / pi) (x + 0.044715 x^3).
class Act(NamedTuple):
    """The constants of a gated activation (compiled into its kernels; a cache key). A plain (alpha, linear_offset,
    limit) tuple is read as cubic 0 wherever an act enters the kernels (``Act(*act)``)."""

    alpha: float
    linear_offset: float
    limit: float | None
    cubic: float = 0.0


_SWIGLU = Act(1.0, 0.0, None)
_GEGLU = Act(2.0 * math.sqrt(2.0 / math.pi), 0.0, None, 0.044715)
_acts: dict = {}  # (code, act) -> (gate, linear, bwd, fwd_word, bwd_word)


def _act_ops(code: str, act: tuple) -> tuple:
    """Device functions of ``act`` for data of ``code``, math in fp32 (cached):

    * gate(a) = a' * sigmoid(alpha * a') and linear(b) = b' + linear_offset: act(a, b) = gate(a) * linear(b);
    * bwd(gg, a, b, scale) = (d gate, d linear, act(a, b) * gg): the gradients of act(a, b) * scale for the
      incoming gradient gg (the seed's backward of g * weights) and the dweights term;
    * fwd_word / bwd_word: the same on 32-bit words, 2 packed bf16 / fp16 values or 1 fp32 value.

    The constants are compiled in and a term that does nothing (alpha 1, offset 0, no clamp) is not emitted, so
    SwiGLU's kernels are plain silu(a) * b (the same PTX instructions as SwiGLU's own code before the act existed).
    The clamp's gradient is torch.clamp's: the incoming one where lo <= x <= hi (bounds included), else 0 (NaN too).
    """
    key = (code, act)
    ops = _acts.get(key)
    if ops is not None:
        return ops
    d = _defs()
    with _defs_lock:
        if key in _acts:
            return _acts[key]
        from numba import float32, uint32

        dev, sig, bits_f32, f32_bits = d["dev"], d["sigmoids"][code], d["bits_f32"], d["f32_bits"]
        alpha, offset, limit, cubic = Act(*act)
        scaled, shifted, clamped, cubed = alpha != 1.0, offset != 0.0, limit is not None, cubic != 0.0
        k_alpha, k_offset, k_cubic = np.float32(alpha), np.float32(offset), np.float32(cubic)
        hi = np.float32(limit if clamped else 0.0)
        lo = -hi

        @dev
        def arg(a):  # the sigmoid's argument
            if cubed:
                a = a + k_cubic * a * a * a
            return k_alpha * a if scaled else a

        @dev
        def gate(a):
            if clamped:
                a = hi if a > hi else a  # NaN stays NaN, as in torch.clamp
            return a * sig(arg(a))

        @dev
        def linear(b):
            if clamped:
                b = hi if b > hi else (lo if b < lo else b)
            return b + k_offset if shifted else b

        @dev
        def bwd(gg, a, b, scale):
            pass_a = pass_b = True
            if clamped:
                pass_a = a <= hi
                pass_b = lo <= b and b <= hi
                a = hi if a > hi else a
                b = hi if b > hi else (lo if b < lo else b)
            x = arg(a)
            s = sig(x)
            q = a * s
            if shifted:
                b = b + k_offset
            gs = gg * scale
            # d(a s(x))/da = s (1 + a x'(a) (1 - s)); a x'(a) = x without the cubic term
            xd = k_alpha * a * (float32(1.0) + float32(3.0) * k_cubic * a * a) if cubed else x
            dgate = gs * s * (float32(1.0) + xd * (float32(1.0) - s)) * b
            dlin = gs * q
            if clamped:
                dgate = dgate if pass_a else float32(0.0)
                dlin = dlin if pass_b else float32(0.0)
            return dgate, dlin, q * b * gg

        # fwd_word returns the unit store's NaN test with its word: bf16 narrowed on the GPU needs its NaN halves set
        # afterwards (see pack2), which the forward does once a unit; fp32 words and fp16 halves are stored as they
        # come (False). bwd_word sets them a word at a time: a unit-wide test there took ptxas from 48 to 54
        # registers (sm_90), one block a SM fewer.
        if code == "f32":

            @dev
            def fwd_word(gw, uw, scale):
                return f32_bits(gate(bits_f32(gw)) * linear(bits_f32(uw)) * scale), False

            @dev
            def bwd_word(ggw, gw, uw, scale):
                dg, du, p = bwd(bits_f32(ggw), bits_f32(gw), bits_f32(uw), scale)
                return f32_bits(dg), f32_bits(du), p

        else:
            dec = d["codecs"][code][0]
            pack = d["pack2"][code]
            m16 = uint32(0xFFFF)
            bf16 = code == "bf16"

            @dev
            def fwd_word(gw, uw, scale):
                a0 = dec(gw & m16)
                a1 = dec(gw >> uint32(16))
                o0 = gate(a0) * linear(dec(uw & m16)) * scale
                o1 = gate(a1) * linear(dec(uw >> uint32(16))) * scale
                return pack(o0, o1), bf16 and ((o0 != o0) | (o1 != o1))

            @dev
            def pack_fixed(lo, hi):
                w = pack(lo, hi)
                if bf16 and ((lo != lo) | (hi != hi)):  # rare: one branch a word
                    # by the values, not nan_fix's bit test: that took the bf16 backward from 48 to 52 registers
                    if lo != lo:
                        w = (w & uint32(0xFFFF0000)) | uint32(0x7FC0)
                    if hi != hi:
                        w = (w & uint32(0xFFFF)) | uint32(0x7FC00000)
                return w

            @dev
            def bwd_word(ggw, gw, uw, scale):
                dg0, du0, p0 = bwd(dec(ggw & m16), dec(gw & m16), dec(uw & m16), scale)
                dg1, du1, p1 = bwd(dec(ggw >> uint32(16)), dec(gw >> uint32(16)), dec(uw >> uint32(16)), scale)
                return pack_fixed(dg0, dg1), pack_fixed(du0, du1), p0 + p1

        ops = _acts[key] = (gate, linear, bwd, fwd_word, bwd_word)
        return ops


# A kernel spec names one compiled kernel; every gated activation shares the one template in _pyfunc. GluSpec is the
# named form moe_raw builds; a plain 7-tuple (no act: SwiGLU) or 8-tuple in the same order is read the same way.
class GluSpec(NamedTuple):
    kind: str  # "fwd" | "bwd"
    weighted: bool  # a weights [N, 1] array is read (and, backward, dweights written)
    vec: bool  # 16-byte units (y, g and out share one dtype) rather than elements
    y: str  # storage code of y: "f32" | "f16" | "bf16"
    g: str  # of the incoming gradient (backward)
    out: str  # of the output (forward) or dy (backward)
    w: str  # of the weights
    act: Act = None  # the activation (None: SwiGLU)


def _spec_act(spec) -> Act:
    act = spec[7] if len(spec) > 7 else None
    return _SWIGLU if act is None else Act(*act)


# vec kernels take y, g and out as uint32 word arrays (one dtype for all three); element kernels take each array in
# its storage type.
# Unweighted kernels still take (unused) weight arrays, so every kind has one parameter list:
#   fwd(y, out, w, n_rows, n_cols, y_stride, half, out_stride, w_stride)
#   bwd(g, y, w, dy, dw, n_rows, n_cols, g_stride, y_stride, half, dy_stride, w_stride)
# n_cols: units per half row (16-byte vectors or elements); strides and ``half`` (offset of the up half in y and
# in dy) in storage units (uint32 words or elements).
_N_ARRAYS = {"fwd": 3, "bwd": 5}
_N_SCALARS = {"fwd": 6, "bwd": 7}


def _signature(spec) -> str:
    """Numba signature of a spec's kernel."""
    kind, weighted, vec, yc, gc, oc, wc = spec[:7]
    w = _ELEM_TYPE[wc] + "[::1]" if weighted else "float32[::1]"
    y = "uint32[::1]" if vec else _ELEM_TYPE[yc] + "[::1]"
    o = "uint32[::1]" if vec else _ELEM_TYPE[oc] + "[::1]"
    if kind == "fwd":
        arrays = [y, o, w]
    else:
        g = "uint32[::1]" if vec else _ELEM_TYPE[gc] + "[::1]"
        arrays = [g, y, w, o, w]
    return f"void({', '.join(arrays + ['int64'] * _N_SCALARS[kind])})"


def _abi(spec) -> str:
    """struct codes of the kernel's parameters, as Numba lays them out (``_ARRAY_ABI``)."""
    return _ARRAY_ABI * _N_ARRAYS[spec[0]] + "q" * _N_SCALARS[spec[0]]


def _pyfunc(spec):
    """The Python source of a spec's kernel (compiled by Numba, or run by the CUDA simulator)."""
    d = _defs()
    kind, weighted, vec, yc, gc, oc, wc = spec[:7]
    from numba import float32, int64, uint64

    ld4, st4 = d["ld4"], d["st4"]
    gate, linear, bwd, fwd_word, bwd_word = _act_ops(yc, _spec_act(spec))
    nan_fix = d["nan_fix_bf16"]  # only reached where fwd_word found a bf16 NaN
    wdec, wenc = d["codecs"][wc]
    ydec = d["codecs"][yc][0]
    oenc = d["codecs"][oc][1]
    block = _SIM_BLOCK if d["sim"] else _BLOCK
    if kind == "fwd":
        # One lane's units of a row segment: c, c + 32, ... < end (a 16-byte vector, or one element).
        if vec:

            @d["dev"]
            def fwd_load(y, yg, yu, c):
                return ld4(y, yg + 4 * c), ld4(y, yu + 4 * c)

            @d["dev"]
            def fwd_store(out, ob, c, words, scale):
                (g0, g1, g2, g3), (u0, u1, u2, u3) = words
                o0, n0 = fwd_word(g0, u0, scale)
                o1, n1 = fwd_word(g1, u1, scale)
                o2, n2 = fwd_word(g2, u2, scale)
                o3, n3 = fwd_word(g3, u3, scale)
                if (n0 | n1) | (n2 | n3):  # rare: a NaN among the unit's bf16 values (fwd_word)
                    o0, o1, o2, o3 = nan_fix(o0), nan_fix(o1), nan_fix(o2), nan_fix(o3)
                st4(out, ob + 4 * c, o0, o1, o2, o3)

            @d["dev"]
            def fwd_lane(y, out, yg, yu, ob, c, end, scale):
                # One unit a lane (a segment is 32 units): 32 registers. Two units a step, both loaded before either
                # was stored, took 40, and ptxas still issued the second unit's loads after the first unit's math.
                while c < end:
                    fwd_store(out, ob, c, fwd_load(y, yg, yu, c), scale)
                    c += 32

        else:

            @d["dev"]
            def fwd_lane(y, out, yg, yu, ob, c, end, scale):
                while c < end:
                    out[ob + c] = oenc(gate(ydec(y[yg + c])) * linear(ydec(y[yu + c])) * scale)
                    c += 32

        seg = _FWD_SEGMENT_UNITS

        def swiglu_fwd(y, out, w, n_rows, n_cols, y_stride, half, out_stride, w_stride):
            # One warp per (row, segment of `seg` units): long rows are split so the grid stays fine-grained.
            tid = cuda.threadIdx.x
            # unsigned: one udiv (32-bit when both fit) without floor division's sign fix-ups
            n_seg = (uint64(n_cols) + uint64(seg - 1)) // uint64(seg)
            item = uint64(cuda.blockIdx.x) * uint64(block // 32) + uint64(tid >> 5)
            row_u = item // n_seg
            if row_u >= uint64(n_rows):
                return
            row = int64(row_u)
            c0 = int64((item - row_u * n_seg) * uint64(seg))
            scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
            yg = row * y_stride
            ob = row * out_stride
            fwd_lane(y, out, yg, yg + half, ob, c0 + int64(tid & 31), min(n_cols, c0 + seg), scale)

        return swiglu_fwd

    # Backward. Every thread reaches the barriers of the weighted reduction, rows past n_rows with a zero sum.
    @d["dev"]
    def store_row_sum(dw, acc, tid, lane, row, n_rows):
        """dw[row] = the sum of the warp's 32 lane partials (acc): a fixed pairwise tree in shared memory, so the
        weight gradient is bitwise deterministic (no atomics)."""
        part = cuda.shared.array(block, float32)
        part[tid] = acc
        cuda.syncthreads()
        s = 16
        while s > 0:
            if lane < s:
                part[tid] += part[tid + s]
            cuda.syncthreads()
            s >>= 1
        if lane == 0 and row < n_rows:
            dw[row] = wenc(part[tid])

    # One lane's units of a row: c, c + 32, ... < n_cols. Writes dy's units and returns the lane's share of the
    # weight gradient's dot product, summed in column order.
    if vec:

        @d["dev"]
        def bwd_load(g, y, gb, yg, yu, c):
            return ld4(g, gb + 4 * c), ld4(y, yg + 4 * c), ld4(y, yu + 4 * c)

        @d["dev"]
        def bwd_store(dy, dg, du, c, words, scale):
            (q0, q1, q2, q3), (a0, a1, a2, a3), (b0, b1, b2, b3) = words
            dg0, du0, p0 = bwd_word(q0, a0, b0, scale)
            dg1, du1, p1 = bwd_word(q1, a1, b1, scale)
            dg2, du2, p2 = bwd_word(q2, a2, b2, scale)
            dg3, du3, p3 = bwd_word(q3, a3, b3, scale)
            st4(dy, dg + 4 * c, dg0, dg1, dg2, dg3)
            st4(dy, du + 4 * c, du0, du1, du2, du3)
            return (p0 + p1) + (p2 + p3)

        @d["dev"]
        def bwd_lane(g, y, dy, gb, yg, yu, dg, du, c, n_cols, scale):
            # Two units a step, both loaded before either is stored: the compiler cannot move a load above a store
            # to dy (it may alias g or y). The sum keeps the one-unit loop's order (the same dweights bit for bit).
            acc = float32(0.0)
            while c + 32 < n_cols:
                near = bwd_load(g, y, gb, yg, yu, c)
                far = bwd_load(g, y, gb, yg, yu, c + 32)
                acc += bwd_store(dy, dg, du, c, near, scale)
                acc += bwd_store(dy, dg, du, c + 32, far, scale)
                c += 64
            if c < n_cols:  # a last single unit
                acc += bwd_store(dy, dg, du, c, bwd_load(g, y, gb, yg, yu, c), scale)
            return acc

    else:
        gdec = d["codecs"][gc][0]

        @d["dev"]
        def bwd_lane(g, y, dy, gb, yg, yu, dg, du, c, n_cols, scale):
            acc = float32(0.0)
            while c < n_cols:
                dgate, dup, p = bwd(gdec(g[gb + c]), ydec(y[yg + c]), ydec(y[yu + c]), scale)
                dy[dg + c] = oenc(dgate)
                dy[du + c] = oenc(dup)
                acc += p
                c += 32
            return acc

    def swiglu_bwd(g, y, w, dy, dw, n_rows, n_cols, g_stride, y_stride, half, dy_stride, w_stride):
        tid = cuda.threadIdx.x
        lane = tid & 31
        row = int64(cuda.blockIdx.x) * (block // 32) + (tid >> 5)
        acc = float32(0.0)
        if row < n_rows:
            scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
            gb = row * g_stride
            yg = row * y_stride
            dg = row * dy_stride
            acc = bwd_lane(g, y, dy, gb, yg, yg + half, dg, dg + half, int64(lane), n_cols, scale)
        if weighted:
            store_row_sum(dw, acc, tid, lane, row, n_rows)

    return swiglu_bwd


_kernel_lock = threading.RLock()
_dispatchers: dict = {}  # spec -> Numba dispatcher (or the simulator's FakeCUDAKernel)


def _dispatcher(spec):
    disp = _dispatchers.get(spec)
    if disp is None:
        with _kernel_lock:
            disp = _dispatchers.get(spec)
            if disp is None:
                fn = _pyfunc(spec)
                disp = cuda.jit(fn) if _simulator() else cuda.jit(fn, lineinfo=False)
                _dispatchers[spec] = disp
    return disp


def _numba_kernel(spec, index: int):
    """Numba's compiled kernel (``numba.cuda.dispatcher._Kernel``) of a spec, bound to device ``index``."""
    _numba_numpy_compat()
    disp = _dispatcher(spec)
    with _kernel_lock, cuda.gpus[index]:
        return disp.compile(_signature(spec))  # compiles once (per compute capability), binds to the context


def _layout(spec) -> tuple:
    """(storage bytes, numpy type) of each array parameter of a spec's kernel, in order."""
    kind, weighted, vec, yc, gc, oc, wc = spec[:7]
    w = (2 if wc != "f32" else 4, _ELEM_NP[wc]) if weighted else (4, np.float32)

    def data(code):
        return (4, np.uint32) if vec else (2 if code != "f32" else 4, _ELEM_NP[code])

    return (data(yc), data(oc), w) if kind == "fwd" else (data(gc), data(yc), w, data(oc), w)


def _ptx(spec, cc=(9, 0)) -> str:
    """PTX of a spec's kernel for compute capability ``cc``: NVVM only, so it works without a GPU (tests read the
    kernel's real parameter list from it). Numba compiles device functions for the current device's compute
    capability; with no device that lookup is answered with ``cc``."""
    import numba.cuda.dispatcher as numba_dispatcher

    _numba_numpy_compat()
    _defs()
    current = numba_dispatcher.get_current_device

    class _Device:
        compute_capability = cc

    numba_dispatcher.get_current_device = _Device
    try:
        ptx, _ = cuda.compile_ptx(_pyfunc(spec), _signature(spec), cc=cc)
    finally:
        numba_dispatcher.get_current_device = current
    return ptx
