"""The SwiGLU family on Numba CUDA kernels, launched through moe_raw's one launcher.

``y [..., 2F]`` holds ``[gate | up]`` (``torch.chunk(y, 2, -1)``); ``weights [N, 1]``.

* ``swiglu(y) = silu(gate) * up``; ``weighted_swiglu(y, w) = swiglu(y) * w`` (in ``y.dtype``);
  ``swiglu_back(g, y) -> dy``; ``weighted_swiglu_back(g, y, w) -> (dy, dweights)``;
  ``WeightedSwiGLUFunction`` / ``weighted_bias_swiglu_impl``: the seed's autograd wrappers.
* The same kernels run Megatron-LM's Quick-GEGLU family (``quick_geglu``, ``weighted_quick_geglu``, their
  ``_back``, ``WeightedQuickGeGLUFunction`` / ``weighted_bias_quick_geglu_impl`` with its clamp_value) and gpt-oss's
  clamped SwiGLU (``clamped_swiglu`` and its weighted / ``_back`` forms): every one is
  gate' * sigmoid(alpha * gate') * (linear' + linear_offset) with an optional clamp (``_act_ops``), its constants
  compiled into the kernel (SwiGLU is alpha 1, offset 0, no clamp and compiles to its own code).
* CUDA tensors in float32 / float16 / bfloat16 run the kernels below; CPU tensors, and float64 anywhere (no
  kernel: its math would be fp32), run the seed's torch functions (``moe_raw.reference``).

Kernels (one file, built lazily so ``import moe_raw`` needs no Numba). Launch: block = 256 threads = 8 warps,
**one warp per row**, grid.x = cdiv(N, 8). Lanes stride over the row's F columns in *units*: a 16-byte vector
(``ld.global.v4.u32`` / ``st.global.v4.u32``, 8 bf16/fp16 or 4 fp32 values) when every row start, the
gate/up split and every stride are 16-byte aligned and y, g and the output share one dtype; else one element
(any F, any dtype mix). All math in fp32. The weighted backward writes ``dy`` and reduces the per-row dot
``sum(swiglu(y) * g)`` for ``dweights`` in the same pass: each lane sums its columns in order, then a fixed
pairwise tree over the 32 lanes in shared memory: no atomics, bitwise deterministic.
bf16 and fp16 are handled as uint16 bit patterns (Numba has no reliable bf16 type): bf16 widens by a 16-bit
shift and narrows with round-to-nearest-even in integer code (NaN -> 0x7FC0, as torch's scalar conversion);
fp16 converts with the hardware cvt on the GPU and with exact integer code under the simulator (both checked
against torch on every bit pattern). silu uses torch's accurate expf / division for fp32 data and
``__expf`` / ``__fdividef`` for bf16 / fp16 data (their few-ulp fp32 error is far below a 16-bit rounding, and
the cheaper math keeps the backward under the H100's issue rate at full bandwidth).
Bytes (bench/bench_swiglu.py): forward reads 2F and writes F elements per row (+ one weight); the weighted
backward reads g (F) and y (2F) and writes dy (2F) per row, plus a weight read and a dweight write.
Measured on an H100 (bf16, copy 3018 GB/s): forward 93% / 95% of copy at N=32768 F=2048 / N=98304 F=768,
weighted backward 93% / 97% (torch.compile of the seed: 97% / 55% and 53% / 24%).

Launch cost. Numba's dispatcher costs 52-104 us a call with torch tensors (measured on an H100). Here each kernel is
compiled once per (signature, device) and its loaded function handle is launched through
``moe_raw._launch.launch_compiled``: one ``struct.pack_into`` of the argument words, one ``cuLaunchKernel`` on
torch's current stream (CUDA-graph capturable). The packing reproduces Numba's kernel ABI (``_ARRAY_ABI``).
The first call of each signature on a device compiles it (NVVM, about a second). Host time of one op at N=16
on the H100 hosts: 14-20 us forward, 26-29 us weighted backward (its two output allocations, ~5 us each there,
and the launch, ~8 us, are most of it); torch.compile of the seed: 49-72 us (bench/results/*-h100-swiglu).

numpy >= 2.5 with numba-cuda 0.30: numba-cuda's ``numba/cuda/np/arrayobj.py`` runs ``overload(np.row_stack)``
when its target is first set up (the first compile), and numpy 2.5 removed ``np.row_stack``, so that compile
fails with ``AttributeError: module 'numpy' has no attribute 'row_stack'``. Before its first compile moe_raw
imports that module with a stand-in ``np.row_stack`` and deletes the stand-in right after
(``_numba_numpy_compat``): numpy is left as it was, Numba's registry is complete, and nothing else changes.
"""

from __future__ import annotations

import math
import numbers
import threading

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from moe_raw import _launch, reference

__all__ = [
    "swiglu",
    "weighted_swiglu",
    "swiglu_back",
    "weighted_swiglu_back",
    "WeightedSwiGLUFunction",
    "weighted_bias_swiglu_impl",
    "quick_geglu",
    "weighted_quick_geglu",
    "quick_geglu_back",
    "weighted_quick_geglu_back",
    "WeightedQuickGeGLUFunction",
    "weighted_bias_quick_geglu_impl",
    "clamped_swiglu",
    "weighted_clamped_swiglu",
    "clamped_swiglu_back",
    "weighted_clamped_swiglu_back",
]

_BLOCK = 256  # threads per block: 8 warps, one row each
_ROWS_PER_BLOCK = _BLOCK // 32
# The CUDA simulator runs every thread as a Python thread: 2 warps a block there (still several rows per block,
# through the same shared-memory reduction) keeps CI's small cases fast.
_SIM_BLOCK = 64
_VEC_BYTES = 16
_CODE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # dtypes with kernels
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Numba array type of a tensor's storage in the element-wise kernels (bf16/fp16 as their bit patterns).
_ELEM_TYPE = {"f32": "float32", "f16": "uint16", "bf16": "uint16"}
_ELEM_NP = {"f32": np.float32, "f16": np.uint16, "bf16": np.uint16}

# Numba's kernel ABI for an array argument: its data model (numba/cuda/datamodel/cuda_models.py::ArrayModel:
# meminfo, parent, nitems, itemsize, data, shape[ndim], strides[ndim]) flattened into separate parameters, and
# _Kernel._prepare_args (numba/cuda/dispatcher.py) passes them as meminfo=0, parent=0, devary.size,
# dtype.itemsize, devary.ptr, *shape, *strides_in_bytes, each a Python int that cuda.core's ParamHolder
# (cuda/core/_kernel_arg_handler.pyx) stores as an intptr_t. All our arrays are 1-D: 7 words. Our int64 scalars
# are ctypes.c_int64 there: one 8-byte word. tests/test_swiglu.py checks both against Numba itself.
_ARRAY_ABI = "PPqqPqq"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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

            @dev
            def bits_f32(u):
                return libdevice.int_as_float(int32(u))

            @dev
            def f32_bits(f):
                return uint32(libdevice.float_as_int(f))

            expf = math.exp  # float32 in -> __nv_expf (accurate, as torch's fp32 silu / sigmoid)
            fast_expf = libdevice.fast_expf  # __expf: ex2.approx; error far below a bf16 / fp16 rounding

            @dev
            def fast_rcp(x):
                return libdevice.fast_fdividef(float32(1.0), x)  # MUFU.RCP; 1/inf = 0, NaN stays NaN

            ld4, st4, add32, hw_dec_f16, hw_enc_f16 = _vector_intrinsics()

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
            # code above, which the simulator runs and tests/test_swiglu.py checks on every bit pattern, costs
            # ~20 instructions with branches per value and made the fp16 backward issue-bound.
            dec_f16, enc_f16 = hw_dec_f16, hw_enc_f16
        codecs = {"f32": (dec_f32, enc_f32), "f16": (dec_f16, enc_f16), "bf16": (dec_bf16, enc_bf16)}
        _DEFS.update(
            sim=sim, dev=dev, ld4=ld4, st4=st4, codecs=codecs, sigmoids=sigmoids, bits_f32=bits_f32, f32_bits=f32_bits
        )
        return _DEFS


def _vector_intrinsics():
    """LLVM-level helpers: 16-byte vector load / store of 4 uint32 words at word index i of a 1-D uint32 array
    (caller guarantees 16-byte alignment; one ld.global.v4.u32 / st.global.v4.u32 instead of four 4-byte
    accesses), and a wrapping 32-bit add."""
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    v4 = ir.VectorType(ir.IntType(32), 4)

    def _address(context, builder, aryty, ary, index):
        data = context.make_array(aryty)(context, builder, ary).data
        return builder.bitcast(builder.gep(data, [index]), v4.as_pointer())

    @intrinsic
    def ld4(typingctx, arr, index):
        sig = types.UniTuple(types.uint32, 4)(arr, index)

        def codegen(context, builder, sig, args):
            vec = builder.load(_address(context, builder, sig.args[0], args[0], args[1]), align=16)
            words = [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)]
            return context.make_tuple(builder, sig.return_type, words)

        return sig, codegen

    @intrinsic
    def st4(typingctx, arr, index, w0, w1, w2, w3):
        sig = types.void(arr, index, types.uint32, types.uint32, types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            vec = ir.Constant(v4, ir.Undefined)
            for k in range(4):
                vec = builder.insert_element(vec, args[2 + k], ir.Constant(ir.IntType(32), k))
            builder.store(vec, _address(context, builder, sig.args[0], args[0], args[1]), align=16)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def add32(typingctx, a, b):
        # a + b mod 2^32 in one 32-bit add (Numba would widen uint32 + uint32 to 64 bits)
        sig = types.uint32(types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            return builder.add(args[0], args[1])

        return sig, codegen

    @intrinsic
    def f16_to_f32(typingctx, h):
        # cvt.f32.f16 on the low 16 bits: exact (subnormals, inf, NaN payload)
        sig = types.float32(h)

        def codegen(context, builder, sig, args):
            bits = builder.trunc(args[0], ir.IntType(16))
            return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

        return sig, codegen

    @intrinsic
    def f32_to_f16(typingctx, f):
        # cvt.rn.f16.f32: round to nearest even, overflow to inf, NaN stays NaN
        sig = types.uint16(types.float32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return sig, codegen

    return ld4, st4, add32, f16_to_f32, f32_to_f16


# Gated activations. act = (alpha, linear_offset, limit) names the elementwise function of a kernel:
#   act(a, b) = a' * sigmoid(alpha * a') * (b' + linear_offset),  a' = min(a, limit),  b' = clamp(b, -limit, limit)
# for the gate a and linear b of one column (limit None: no clamp). SwiGLU is (1, 0, None): silu(a) * b.
# quick_geglu is (1.702, linear_offset, None), gpt-oss's clamped SwiGLU (alpha, 1, limit).
_SWIGLU = (1.0, 0.0, None)
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
        alpha, offset, limit = act
        scaled, shifted, clamped = alpha != 1.0, offset != 0.0, limit is not None
        k_alpha, k_offset = np.float32(alpha), np.float32(offset)
        hi = np.float32(limit if clamped else 0.0)
        lo = -hi

        @dev
        def gate(a):
            if clamped:
                a = hi if a > hi else a  # NaN stays NaN, as in torch.clamp
            return a * (sig(k_alpha * a) if scaled else sig(a))

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
            x = k_alpha * a if scaled else a
            s = sig(x)
            q = a * s
            if shifted:
                b = b + k_offset
            gs = gg * scale
            dgate = gs * s * (float32(1.0) + x * (float32(1.0) - s)) * b
            dlin = gs * q
            if clamped:
                dgate = dgate if pass_a else float32(0.0)
                dlin = dlin if pass_b else float32(0.0)
            return dgate, dlin, q * b * gg

        if code == "f32":

            @dev
            def fwd_word(gw, uw, scale):
                return f32_bits(gate(bits_f32(gw)) * linear(bits_f32(uw)) * scale)

            @dev
            def bwd_word(ggw, gw, uw, scale):
                dg, du, p = bwd(bits_f32(ggw), bits_f32(gw), bits_f32(uw), scale)
                return f32_bits(dg), f32_bits(du), p

        else:
            dec, enc = d["codecs"][code]
            m16 = uint32(0xFFFF)

            @dev
            def fwd_word(gw, uw, scale):
                a0 = dec(gw & m16)
                a1 = dec(gw >> uint32(16))
                o0 = enc(gate(a0) * linear(dec(uw & m16)) * scale)
                o1 = enc(gate(a1) * linear(dec(uw >> uint32(16))) * scale)
                return uint32(o0) | (uint32(o1) << uint32(16))

            @dev
            def bwd_word(ggw, gw, uw, scale):
                dg0, du0, p0 = bwd(dec(ggw & m16), dec(gw & m16), dec(uw & m16), scale)
                dg1, du1, p1 = bwd(dec(ggw >> uint32(16)), dec(gw >> uint32(16)), dec(uw >> uint32(16)), scale)
                dgw = uint32(enc(dg0)) | (uint32(enc(dg1)) << uint32(16))
                duw = uint32(enc(du0)) | (uint32(enc(du1)) << uint32(16))
                return dgw, duw, p0 + p1

        ops = _acts[key] = (gate, linear, bwd, fwd_word, bwd_word)
        return ops


# A kernel spec: (kind "fwd" | "bwd", weighted, vec, y code, g code, out code, w code[, act]): SwiGLU's specs are
# these 7 fields, every other activation appends its act (``_act_ops``); all share the one template in _pyfunc.
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
    from numba import float32, int64

    ld4, st4 = d["ld4"], d["st4"]
    gate, linear, bwd, fwd_word, bwd_word = _act_ops(yc, spec[7] if len(spec) > 7 else _SWIGLU)
    wdec, wenc = d["codecs"][wc]
    ydec = d["codecs"][yc][0]
    oenc = d["codecs"][oc][1]
    block = _SIM_BLOCK if d["sim"] else _BLOCK
    if kind == "fwd" and vec:

        def swiglu_fwd_vec(y, out, w, n_rows, n_cols, y_stride, half, out_stride, w_stride):
            tid = cuda.threadIdx.x
            row = int64(cuda.blockIdx.x) * (block // 32) + (tid >> 5)
            if row >= n_rows:
                return
            scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
            yg = row * y_stride
            yu = yg + half
            ob = row * out_stride
            c = int64(tid & 31)
            while c < n_cols:
                g0, g1, g2, g3 = ld4(y, yg + 4 * c)
                u0, u1, u2, u3 = ld4(y, yu + 4 * c)
                st4(
                    out, ob + 4 * c,
                    fwd_word(g0, u0, scale), fwd_word(g1, u1, scale), fwd_word(g2, u2, scale), fwd_word(g3, u3, scale),
                )  # fmt: skip
                c += 32

        return swiglu_fwd_vec
    if kind == "fwd":

        def swiglu_fwd_elem(y, out, w, n_rows, n_cols, y_stride, half, out_stride, w_stride):
            tid = cuda.threadIdx.x
            row = int64(cuda.blockIdx.x) * (block // 32) + (tid >> 5)
            if row >= n_rows:
                return
            scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
            yg = row * y_stride
            yu = yg + half
            ob = row * out_stride
            c = int64(tid & 31)
            while c < n_cols:
                out[ob + c] = oenc(gate(ydec(y[yg + c])) * linear(ydec(y[yu + c])) * scale)
                c += 32

        return swiglu_fwd_elem

    # Backward. Every thread reaches the barriers of the weighted reduction, rows past n_rows with a zero sum.
    if vec:

        def swiglu_bwd_vec(g, y, w, dy, dw, n_rows, n_cols, g_stride, y_stride, half, dy_stride, w_stride):
            tid = cuda.threadIdx.x
            lane = tid & 31
            row = int64(cuda.blockIdx.x) * (block // 32) + (tid >> 5)
            acc = float32(0.0)
            if row < n_rows:
                scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
                gb = row * g_stride
                yg = row * y_stride
                yu = yg + half
                dg = row * dy_stride
                du = dg + half
                c = int64(lane)
                while c < n_cols:
                    q0, q1, q2, q3 = ld4(g, gb + 4 * c)
                    a0, a1, a2, a3 = ld4(y, yg + 4 * c)
                    b0, b1, b2, b3 = ld4(y, yu + 4 * c)
                    dg0, du0, p0 = bwd_word(q0, a0, b0, scale)
                    dg1, du1, p1 = bwd_word(q1, a1, b1, scale)
                    dg2, du2, p2 = bwd_word(q2, a2, b2, scale)
                    dg3, du3, p3 = bwd_word(q3, a3, b3, scale)
                    st4(dy, dg + 4 * c, dg0, dg1, dg2, dg3)
                    st4(dy, du + 4 * c, du0, du1, du2, du3)
                    acc += (p0 + p1) + (p2 + p3)
                    c += 32
            if weighted:
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

        return swiglu_bwd_vec

    gdec = d["codecs"][gc][0]

    def swiglu_bwd_elem(g, y, w, dy, dw, n_rows, n_cols, g_stride, y_stride, half, dy_stride, w_stride):
        tid = cuda.threadIdx.x
        lane = tid & 31
        row = int64(cuda.blockIdx.x) * (block // 32) + (tid >> 5)
        acc = float32(0.0)
        if row < n_rows:
            scale = wdec(w[row * w_stride]) if weighted else float32(1.0)
            gb = row * g_stride
            yg = row * y_stride
            yu = yg + half
            dg = row * dy_stride
            du = dg + half
            c = int64(lane)
            while c < n_cols:
                dgate, dup, p = bwd(gdec(g[gb + c]), ydec(y[yg + c]), ydec(y[yu + c]), scale)
                dy[dg + c] = oenc(dgate)
                dy[du + c] = oenc(dup)
                acc += p
                c += 32
        if weighted:
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

    return swiglu_bwd_elem


_kernel_lock = threading.RLock()
_dispatchers: dict = {}  # spec -> Numba dispatcher (or the simulator's FakeCUDAKernel)
_compiled: dict = {}  # (spec, device index) -> _launch.compiled_kernel tuple


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


def _fast_kernel(spec, index: int):
    """The launch tuple of a spec on device ``index``: the CUfunction/CUkernel handle Numba loaded, wrapped by
    ``_launch.compiled_kernel`` with the parameter layout of Numba's ABI. Cached."""
    key = (spec, index)
    kern = _compiled.get(key)
    if kern is None:
        _launch.check_device(index)  # an unsupported GPU fails here, before Numba compiles
        with _kernel_lock:
            kern = _compiled.get(key)
            if kern is None:
                numba_kernel = _numba_kernel(spec, index)
                with cuda.gpus[index]:
                    # numba/cuda/codegen.py::CUDACodeLibrary.get_cufunc: the function loaded for the current
                    # device, cached there per device; .handle is what Numba's own launch hands the driver.
                    cufunc = numba_kernel._codelibrary.get_cufunc()
                kern = _launch.compiled_kernel(int(cufunc.handle), _abi(spec), owner=(numba_kernel, cufunc))
                _compiled[key] = kern
    return kern


def _layout(spec) -> tuple:
    """(storage bytes, numpy type) of each array parameter of a spec's kernel, in order."""
    kind, weighted, vec, yc, gc, oc, wc = spec[:7]
    w = (2 if wc != "f32" else 4, _ELEM_NP[wc]) if weighted else (4, np.float32)

    def data(code):
        return (4, np.uint32) if vec else (2 if code != "f32" else 4, _ELEM_NP[code])

    return (data(yc), data(oc), w) if kind == "fwd" else (data(gc), data(yc), w, data(oc), w)


_layouts: dict = {}


def _kernel_args(spec, tensors, spans, scalars) -> tuple:
    """The kernel's argument words in Numba's ABI: per 1-D array (``_ARRAY_ABI``) meminfo 0, parent 0, nitems,
    itemsize, data address, shape, stride in bytes; then the int64 scalars. tensors: None for an unused array
    (its span is 0); spans: storage units each array covers from the tensor's address. Unrolled: this runs on
    every call."""
    layout = _layouts.get(spec)
    if layout is None:
        layout = _layouts[spec] = tuple(size for size, _ in _layout(spec))
    if spec[0] == "fwd":
        y, o, w = tensors
        sy, so, sw = spans
        zy, zo, zw = layout
        return (
            0, 0, sy, zy, y.data_ptr(), sy, zy,
            0, 0, so, zo, o.data_ptr(), so, zo,
            0, 0, sw, zw, w.data_ptr() if w is not None else 0, sw, zw,
            *scalars,
        )  # fmt: skip
    g, y, w, d, dw = tensors
    sg, sy, sw, sd, sdw = spans
    zg, zy, zw, zd, zdw = layout
    pw, pdw = (w.data_ptr(), dw.data_ptr()) if w is not None else (0, 0)
    return (
        0, 0, sg, zg, g.data_ptr(), sg, zg,
        0, 0, sy, zy, y.data_ptr(), sy, zy,
        0, 0, sw, zw, pw, sw, zw,
        0, 0, sd, zd, d.data_ptr(), sd, zd,
        0, 0, sdw, zdw, pdw, sdw, zdw,
        *scalars,
    )  # fmt: skip


def _sim_arrays(spec, tensors, spans) -> list:
    """numpy views (sharing memory) of the storage each kernel array covers, for the CUDA simulator (CPU tensors)."""
    arrays = []
    for t, span, (size, np_type) in zip(tensors, spans, _layout(spec), strict=True):
        if t is None:
            arrays.append(np.zeros(4, dtype=np_type))
            continue
        esize = t.element_size()
        flat = t.as_strided((span * size // esize,), (1,))
        arr = (flat.view(torch.int16) if esize == 2 else flat).numpy()
        arrays.append(arr.view(np_type))
    return arrays


def _launch_kernel(spec, tensors, spans, scalars, n_rows: int, index: int) -> None:
    """Launch a spec's kernel: one warp per row, ``_BLOCK`` threads a block. index >= 0: the CUDA device of the
    tensors, the fast launch on torch's current stream there. index < 0: CPU tensors, Numba's simulator (only
    under NUMBA_ENABLE_CUDASIM=1)."""
    if index >= 0:
        kern = _compiled.get((spec, index)) or _fast_kernel(spec, index)
        args = _kernel_args(spec, tensors, spans, scalars)
        _launch.launch_compiled(kern, index, (n_rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK, _BLOCK, args)
        return
    if not _simulator():
        raise RuntimeError("moe_raw.swiglu: the Numba kernels run on CUDA tensors (or under NUMBA_ENABLE_CUDASIM=1)")
    _dispatcher(spec)[_cdiv(n_rows, _SIM_BLOCK // 32), _SIM_BLOCK](*_sim_arrays(spec, tensors, spans), *scalars)


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


# ----------------------------------------------------------------------------------------------------------------
# Launchers: validated 2-D views in, outputs written (no allocation, no validation)


_ESIZE = {"f32": 4, "f16": 2, "bf16": 2}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view with contiguous rows (any row stride, 0 included), else a contiguous copy (the rare case)."""
    return x if x.stride()[1] == 1 or x.shape[1] <= 1 else x.contiguous()


_PLANS: dict = {}


def _plan(kind: str, ydt, gdt, odt, wdt, act) -> tuple:
    """(element size, (16-byte spec or None, element spec)) for a dtype combination and activation; cached, so the
    hot path does one dict lookup keyed by dtypes instead of building the spec."""
    key = (kind, ydt, gdt, odt, wdt, act)
    plan = _PLANS.get(key)
    if plan is None:
        yc, gc, oc = _CODE[ydt], _CODE[gdt], _CODE[odt]
        weighted = wdt is not None
        wc = _CODE[wdt] if weighted else "f32"
        tail = () if act == _SWIGLU else (act,)
        vec = (kind, weighted, True, yc, gc, oc, wc, *tail) if yc == gc == oc else None
        plan = _PLANS[key] = (_ESIZE[yc], (vec, (kind, weighted, False, yc, gc, oc, wc, *tail)))
    return plan


def _fwd_args(y: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor, act: tuple = _SWIGLU):
    """(spec, tensors, spans, scalars) of the forward kernel writing out [N, F] from y [N, 2F] (unit last strides,
    N > 0, F > 0) and optional weights [N, 1]. 16-byte units when y and out share a dtype and the half row, both
    row strides and both start addresses are 16-byte multiples."""
    n_rows, two_f = y.shape
    f = two_f >> 1
    ydt = y.dtype
    key = ("fwd", ydt, ydt, out.dtype, weights.dtype if weights is not None else None, act)
    esize, (vec_spec, elem_spec) = _PLANS.get(key) or _plan(*key)
    y_stride, o_stride = y.stride()[0], out.stride()[0]
    if weights is None:
        w_stride = w_span = 0
    else:
        w_stride = weights.stride()[0]
        w_span = w_stride * (n_rows - 1) + 1
    if (
        vec_spec is not None
        and not (f * esize) & 15
        and not ((y_stride | o_stride) * esize) & 15
        and not (y.data_ptr() | out.data_ptr()) & 15
    ):
        k = 4 // esize  # elements per uint32 word
        return vec_spec, (y, out, weights), (
            (y_stride * (n_rows - 1) + two_f) // k, (o_stride * (n_rows - 1) + f) // k, w_span
        ), (n_rows, (f * esize) >> 4, y_stride // k, f // k, o_stride // k, w_stride)  # fmt: skip
    return elem_spec, (y, out, weights), (
        y_stride * (n_rows - 1) + two_f, o_stride * (n_rows - 1) + f, w_span
    ), (n_rows, f, y_stride, f, o_stride, w_stride)  # fmt: skip


def _bwd_args(g, y, weights, dy, dw, act: tuple = _SWIGLU):
    """(spec, tensors, spans, scalars) of the backward kernel writing dy [N, 2F] (and dw [N, 1] with weights) from
    g [N, F] and y [N, 2F] (unit last strides; dw contiguous; N > 0, F > 0)."""
    n_rows, two_f = y.shape
    f = two_f >> 1
    wdt = weights.dtype if weights is not None else None
    key = ("bwd", y.dtype, g.dtype, dy.dtype, wdt, act)
    esize, (vec_spec, elem_spec) = _PLANS.get(key) or _plan(*key)
    g_stride, y_stride, d_stride = g.stride()[0], y.stride()[0], dy.stride()[0]
    if weights is None:
        w_stride = w_span = dw_span = 0
    else:
        w_stride = weights.stride()[0]
        w_span, dw_span = w_stride * (n_rows - 1) + 1, n_rows
    last = n_rows - 1
    if (
        vec_spec is not None
        and not (f * esize) & 15
        and not ((g_stride | y_stride | d_stride) * esize) & 15
        and not (g.data_ptr() | y.data_ptr() | dy.data_ptr()) & 15
    ):
        k = 4 // esize
        return vec_spec, (g, y, weights, dy, dw), (
            (g_stride * last + f) // k, (y_stride * last + two_f) // k, w_span, (d_stride * last + two_f) // k, dw_span
        ), (n_rows, (f * esize) >> 4, g_stride // k, y_stride // k, f // k, d_stride // k, w_stride)  # fmt: skip
    return elem_spec, (g, y, weights, dy, dw), (
        g_stride * last + f, y_stride * last + two_f, w_span, d_stride * last + two_f, dw_span
    ), (n_rows, f, g_stride, y_stride, f, d_stride, w_stride)  # fmt: skip


def _fwd_into(y: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor, act: tuple = _SWIGLU) -> None:
    """out[N, F] = act(gate, up) (* weights), SwiGLU by default. y [N, 2F], out [N, F]: unit last strides, any row
    strides."""
    n_rows, two_f = y.shape
    if n_rows and two_f:
        _launch_kernel(*_fwd_args(y, weights, out, act), n_rows, y.get_device())


def _bwd_into(g, y, weights, dy, dw, act: tuple = _SWIGLU) -> None:
    """dy [N, 2F] (and dw [N, 1] when weights is given) from g [N, F], y [N, 2F] with unit last strides; dw
    contiguous."""
    n_rows, two_f = y.shape
    if n_rows == 0:
        return
    if two_f == 0:
        if dw is not None:
            dw.zero_()
        return
    _launch_kernel(*_bwd_args(g, y, weights, dy, dw, act), n_rows, y.get_device())


# ----------------------------------------------------------------------------------------------------------------
# Allocating functions (2-D in; kernels)


def _swiglu_fwd(y: torch.Tensor, weights: torch.Tensor | None, act: tuple) -> torch.Tensor:
    y = _rows(y)
    n_rows, two_f = y.shape
    out = y.new_empty((n_rows, two_f >> 1))
    if n_rows and two_f:
        _launch_kernel(*_fwd_args(y, weights, out, act), n_rows, y.get_device())
    return out


def _swiglu_bwd(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype, act: tuple):
    g, y = _rows(g), _rows(y)
    n_rows, two_f = y.shape
    dy = y.new_empty((n_rows, two_f), dtype=out_dtype)
    dw = weights.new_empty((n_rows, 1)) if weights is not None else None
    _bwd_into(g, y, weights, dy, dw, act)
    return dy, dw


# ----------------------------------------------------------------------------------------------------------------
# Validation and dispatch


def _on_kernels(y, g=None, weights=None) -> bool:
    """Whether the kernels run: CUDA tensors of kernel dtypes (float64 goes to the reference: fp32 math would
    lose its precision). Tests under NUMBA_ENABLE_CUDASIM=1 patch this to run the kernels on CPU tensors."""
    return (
        y.is_cuda
        and y.dtype in _CODE
        and (g is None or g.dtype in _CODE)
        and (weights is None or weights.dtype in _CODE)
    )


def _dense(x, arg: str, op: str) -> None:
    # sparse / mkldnn tensors have no strides or data pointer to hand the kernels
    if x.layout is not torch.strided:
        raise TypeError(f"{op}: {arg} must be a dense (strided) tensor, got layout {x.layout}")


def _check_y(y, op: str, two_d: bool, arg: str = "y") -> int:
    """F of a valid y; else the error naming y. Every check reads metadata only (no host sync)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(y).__name__}")
    _dense(y, arg, op)
    shape = y.shape
    if len(shape) != 2:
        if two_d:
            raise ValueError(f"{op}: {arg} must be 2-D [N, 2F], got shape {tuple(shape)}")
        if not shape:
            raise ValueError(f"{op}: {arg} must have a last dimension [..., 2F], got a 0-d tensor")
    if y.dtype not in _FLOATS:
        raise TypeError(f"{op}: {arg} must be float32, float16, bfloat16 or float64, got {y.dtype}")
    last = shape[-1]
    if last & 1:
        raise ValueError(f"{op}: the last dim of {arg} must be even ([gate | up] halves), got shape {tuple(shape)}")
    return last >> 1


def _same_device(x, y, arg: str, op: str) -> None:
    index = y.get_device()  # a CUDA index, or -1 (CPU and other devices: compare the devices themselves)
    if x.get_device() != index if index >= 0 else x.device != y.device:
        raise ValueError(f"{op}: {arg} is on {x.device} but y is on {y.device}; all tensors must share a device")


def _check_weights(weights, y, op: str, arg: str = "weights") -> None:
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor [N, 1], got {type(weights).__name__}")
    _dense(weights, arg, op)
    if weights.dtype not in _FLOATS:
        raise TypeError(f"{op}: {arg} must be float32, float16, bfloat16 or float64, got {weights.dtype}")
    shape, n_rows = weights.shape, y.shape[0]
    if len(shape) != 2 or shape[1] != 1 or shape[0] != n_rows:
        raise ValueError(f"{op}: {arg} must be [N, 1] with N = {n_rows} (rows of y), got {tuple(shape)}")
    _same_device(weights, y, arg, op)


def _check_g(g, y, f: int, op: str) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: g must be a torch.Tensor, got {type(g).__name__}")
    _dense(g, "g", op)
    if g.dtype not in _FLOATS:
        raise TypeError(f"{op}: g must be float32, float16, bfloat16 or float64, got {g.dtype}")
    g_shape, y_shape = g.shape, y.shape
    if len(g_shape) == 2 == len(y_shape):  # the common case, without building torch.Size slices
        bad = g_shape[0] != y_shape[0] or g_shape[1] != f
    else:
        bad = len(g_shape) != len(y_shape) or g_shape[-1] != f or g_shape[:-1] != y_shape[:-1]
    if bad:
        expected = (*y_shape[:-1], f)
        raise ValueError(f"{op}: g must be [..., F] = {expected} for y {tuple(y_shape)}, got {tuple(g_shape)}")
    _same_device(g, y, "g", op)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return x.reshape(rows, x.shape[-1])  # not -1: a last dim of 0 leaves -1 ambiguous


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _glu_torch(y, weights, act: tuple) -> torch.Tensor:
    """The kernels' forward in torch: act(y) (* weights) in fp32 (fp64 if an input is fp64), rounded once to
    y.dtype. Plain torch ops, so autograd differentiates it where that is asked for (the ``*_back`` functions)."""
    acc = _acc_dtype(y, weights)
    y_acc = y.to(acc)
    out = reference.swiglu(y_acc) if act == _SWIGLU else reference.quick_glu(y_acc, *act)
    if weights is not None:
        out = out * weights.to(acc)
    return out.to(y.dtype)


def _glu_back_torch(g, y, weights, act: tuple, out_dtype: torch.dtype):
    """The kernels' backward in torch, in fp32 (fp64 if an input is fp64): (dy in out_dtype, dweights in
    weights.dtype | None)."""
    acc = _acc_dtype(g, y, weights)
    g_acc, y_acc = g.to(acc), y.to(acc)
    if weights is None:
        dy = reference.swiglu_back(g_acc, y_acc) if act == _SWIGLU else reference.quick_glu_back(g_acc, y_acc, *act)
        return dy.to(out_dtype), None
    w_acc = weights.to(acc)
    if act == _SWIGLU:
        dy, dw = reference.weighted_swiglu_back(g_acc, y_acc, w_acc)
    else:
        dy, dw = reference.weighted_quick_glu_back(g_acc, y_acc, w_acc, *act)
    return dy.to(out_dtype), dw.to(weights.dtype)


def _glu_fwd(y, weights, act: tuple) -> torch.Tensor:
    """[N, F] from y [N, 2F] (and weights [N, 1]): the kernels for CUDA tensors of kernel dtypes, else torch."""
    if _on_kernels(y, None, weights):
        return _swiglu_fwd(y, weights, act)
    return _glu_torch(y, weights, act)


def _glu_bwd(g, y, weights, act: tuple, out_dtype: torch.dtype):
    """(dy [N, 2F] in out_dtype, dweights [N, 1] | None) from g [N, F], y [N, 2F]: kernels or torch, as _glu_fwd."""
    if _on_kernels(y, g, weights):
        return _swiglu_bwd(g, y, weights, out_dtype, act)
    return _glu_back_torch(g, y, weights, act, out_dtype)


class _GluFn(torch.autograd.Function):
    """Autograd of every gated activation (weighted or not): y [N, 2F], weights [N, 1] or None -> [N, F] in
    y.dtype; backward from one kernel pass (or its torch twin off the kernels). Not twice differentiable."""

    @staticmethod
    def forward(ctx, y, weights, act):
        ctx.save_for_backward(y, weights)
        ctx.act = act
        return _glu_fwd(y, weights, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, weights = ctx.saved_tensors
        dy, dweights = _glu_bwd(grad_out, y, weights, ctx.act, y.dtype)
        return (dy if ctx.needs_input_grad[0] else None), (dweights if ctx.needs_input_grad[1] else None), None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _gated(op: str, y, weights, weighted: bool, act: tuple) -> torch.Tensor:
    """Validated forward of the activation ``act``: y [..., 2F] -> [..., F], or with weights y [N, 2F] and
    weights [N, 1] -> [N, F] in y.dtype. Differentiable w.r.t. y and weights (one autograd node, built only when
    one of them requires grad)."""
    if not weighted:
        f = _check_y(y, op, two_d=False)
        if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
            return _ops.glu(y, *act)
        y2 = y if y.dim() == 2 else _as_2d(y)
        out = _GluFn.apply(y2, None, act) if _needs_grad(y) else _glu_fwd(y2, None, act)
        return out if y.dim() == 2 else out.view(*y.shape[:-1], f)
    _check_y(y, op, two_d=True)
    _check_weights(weights, y, op)
    if torch.compiler.is_compiling():
        return _ops.weighted_glu(y, weights, *act)
    if _needs_grad(y, weights):
        return _GluFn.apply(y, weights, act)
    return _glu_fwd(y, weights, act)


def _gated_back(op: str, g, y, weights, weighted: bool, act: tuple):
    """Validated backward of ``act``: dy [..., 2F] in promote(g, y); with weights (2-D) (dy in y.dtype, dweights
    [N, 1] in weights.dtype). Differentiable (twice-differentiable activations): when an input requires grad this
    runs the torch formula in fp32, whose autograd gives the second derivatives, on every device."""
    if not weighted:
        f = _check_y(y, op, two_d=False)
        _check_g(g, y, f, op)
        if torch.compiler.is_compiling():
            return _ops.glu_back(g, y, *act)
        out_dtype = y.dtype if g.dtype is y.dtype else torch.promote_types(g.dtype, y.dtype)
        if _needs_grad(g, y):
            return _glu_back_torch(g, y, None, act, out_dtype)[0]
        if y.dim() == 2:
            return _glu_bwd(g, y, None, act, out_dtype)[0]
        return _glu_bwd(_as_2d(g), _as_2d(y), None, act, out_dtype)[0].view(y.shape)
    f = _check_y(y, op, two_d=True)
    _check_g(g, y, f, op)
    _check_weights(weights, y, op)
    if torch.compiler.is_compiling():
        return _ops.weighted_glu_back(g, y, weights, *act)
    if _needs_grad(g, y, weights):
        return _glu_back_torch(g, y, weights, act, y.dtype)
    return _glu_bwd(g, y, weights, act, y.dtype)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up.

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference), ``[gate | up]`` halves; any
            leading strides, the last dim read contiguously (else copied).

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    return _gated("moe_raw.swiglu", y, None, False, _SWIGLU)


def weighted_swiglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """swiglu(y) * weights, returned in y.dtype.

    Args:
        y: [N, 2F] float32 | float16 | bfloat16 (float64: the torch reference); rows may be strided.
        weights: [N, 1] float32 | float16 | bfloat16, any strides (one weight per row, e.g. the router prob).

    Returns:
        [N, F] in y.dtype, computed in fp32 (silu(gate) * up * weight) and rounded once. Differentiable w.r.t. y
        and weights (backward: one kernel pass).
    """
    return _gated("moe_raw.weighted_swiglu", y, weights, True, _SWIGLU)


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of swiglu: dy = [g * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))) * up | g * silu(gate)].

    Args:
        g: [..., F] float, the gradient of swiglu(y) (any strides).
        y: [..., 2F] float, the forward input.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype) (the seed's dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    return _gated_back("moe_raw.swiglu_back", g, y, None, False, _SWIGLU)


def weighted_swiglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
    """Gradients of weighted_swiglu, in one pass over g and y.

    Args:
        g: [N, F] float, the gradient of weighted_swiglu(y, weights) (any strides).
        y: [N, 2F] float, the forward input.
        weights: [N, 1] float.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype). dy is swiglu_back(g * weights, y);
        dweights[n] = sum_f swiglu(y)[n, f] * g[n, f], reduced in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    return _gated_back("moe_raw.weighted_swiglu_back", g, y, weights, True, _SWIGLU)


# ----------------------------------------------------------------------------------------------------------------
# Quick-GEGLU (Megatron-LM / NeMo Automodel) and gpt-oss's clamped SwiGLU: the same kernels with another act


_QUICK_GELU_ALPHA = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x), Megatron's constant


def _constant(value, arg: str, op: str) -> float:
    """A finite float from a Python number or a 0-d CPU tensor (Megatron's Function takes linear_offset as a
    tensor). It is compiled into the kernel: a CUDA tensor (reading it would sync the host) and NaN / inf (never
    equal to themselves, so never a cache hit) are refused."""
    if value.__class__ is not float:  # a plain float, the common case, skips these checks (~1 us a call)
        if isinstance(value, torch.Tensor):
            if value.dim() != 0 or value.device.type != "cpu":
                raise TypeError(
                    f"{op}: {arg} must be a Python float or a 0-d CPU tensor (it is compiled into the kernel; reading "
                    f"a CUDA tensor would sync the host), got a tensor of shape {tuple(value.shape)} on {value.device}"
                )
            value = value.item()
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {arg} must be a float, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {arg} must be finite, got {value}")
    return value


def _limit(value, arg: str, op: str) -> float:
    limit = _constant(value, arg, op)
    if limit <= 0:
        raise ValueError(f"{op}: {arg} must be > 0 (the clamp is [-{arg}, {arg}] on the linear half), got {limit}")
    return limit


def _quick(linear_offset, op: str) -> tuple:
    return (_QUICK_GELU_ALPHA, _constant(linear_offset, "linear_offset", op), None)


def _clamped(alpha, limit, op: str) -> tuple:
    return (_constant(alpha, "alpha", op), 1.0, _limit(limit, "limit", op))


def quick_geglu(y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """Megatron-LM's quick_geglu: quick_gelu(gate) * (linear + linear_offset), quick_gelu(x) = x * sigmoid(1.702 x).

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference), ``[gate | linear]`` halves
            (torch.chunk, as swiglu); any leading strides, the last dim read contiguously (else copied).
        linear_offset: float added to the linear half; compiled into the kernel (one compile, about a second, per
            distinct value and dtype combination).

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    op = "moe_raw.quick_geglu"
    act = _quick(linear_offset, op)
    return _gated(op, y, None, False, act)


def weighted_quick_geglu(y: torch.Tensor, weights: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """quick_geglu(y, linear_offset) * weights, returned in y.dtype (Megatron-LM's weighted_quick_geglu).

    Args:
        y: [N, 2F] float32 | float16 | bfloat16 (float64: the torch reference); rows may be strided.
        weights: [N, 1] float32 | float16 | bfloat16, any strides.
        linear_offset: float added to the linear half (as quick_geglu).

    Returns:
        [N, F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y and weights.
    """
    op = "moe_raw.weighted_quick_geglu"
    act = _quick(linear_offset, op)
    return _gated(op, y, weights, True, act)


def quick_geglu_back(g: torch.Tensor, y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """Gradient of quick_geglu: with s = sigmoid(1.702 gate),
    dy = [g * s * (1 + 1.702 gate * (1 - s)) * (linear + linear_offset) | g * gate * s].

    Args:
        g: [..., F] float, the gradient of quick_geglu(y, linear_offset) (any strides).
        y: [..., 2F] float, the forward input.
        linear_offset: the forward's.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.quick_geglu_back"
    act = _quick(linear_offset, op)
    return _gated_back(op, g, y, None, False, act)


def weighted_quick_geglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, linear_offset: float = 0.0):
    """Gradients of weighted_quick_geglu, in one pass over g and y.

    Args:
        g: [N, F] float, the gradient of weighted_quick_geglu(y, weights, linear_offset) (any strides).
        y: [N, 2F] float, the forward input.
        weights: [N, 1] float.
        linear_offset: the forward's.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype): dy = quick_geglu_back(g * weights, y);
        dweights[n] = sum_f quick_geglu(y)[n, f] * g[n, f], reduced in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.weighted_quick_geglu_back"
    act = _quick(linear_offset, op)
    return _gated_back(op, g, y, weights, True, act)


def clamped_swiglu(y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: gate' * sigmoid(alpha * gate') * (linear' + 1), gate' = gate.clamp(max=limit),
    linear' = linear.clamp(-limit, limit).

    Megatron-LM expresses it as quick_geglu with linear_offset=1 and clamp_value=limit (alpha fixed at 1.702):
    ``weighted_bias_quick_geglu_impl`` here takes both, and alpha. The layout is ``[gate | linear]`` halves
    (torch.chunk, as Megatron and NeMo Automodel's swiglu_oai); gpt-oss's own checkpoints interleave gate and
    linear columns (y[..., ::2], y[..., 1::2]), so de-interleave those projection columns once when loading.

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference); last dim read contiguously.
        alpha: the gate's sigmoid scale; limit: the clamp (> 0). Both compiled into the kernel.

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    op = "moe_raw.clamped_swiglu"
    act = _clamped(alpha, limit, op)
    return _gated(op, y, None, False, act)


def weighted_clamped_swiglu(y: torch.Tensor, weights: torch.Tensor, alpha: float = 1.702, limit: float = 7.0):
    """clamped_swiglu(y, alpha, limit) * weights, returned in y.dtype (NeMo Automodel's swiglu_oai_deepep).

    Args:
        y: [N, 2F] float32 | float16 | bfloat16; weights: [N, 1] float; alpha, limit: as clamped_swiglu.

    Returns:
        [N, F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y and weights.
    """
    op = "moe_raw.weighted_clamped_swiglu"
    act = _clamped(alpha, limit, op)
    return _gated(op, y, weights, True, act)


def clamped_swiglu_back(g: torch.Tensor, y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Gradient of clamped_swiglu: quick_geglu's at the clamped values (alpha for 1.702, offset 1), zero where the
    clamp is active (gate > limit; |linear| > limit); at the bounds themselves it passes, as torch.clamp's.

    Args:
        g: [..., F] float (any strides); y: [..., 2F] float, the forward input; alpha, limit: the forward's.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.clamped_swiglu_back"
    act = _clamped(alpha, limit, op)
    return _gated_back(op, g, y, None, False, act)


def weighted_clamped_swiglu_back(g, y, weights, alpha: float = 1.702, limit: float = 7.0):
    """Gradients of weighted_clamped_swiglu, in one pass over g and y.

    Args:
        g: [N, F] float; y: [N, 2F] float; weights: [N, 1] float; alpha, limit: the forward's.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype): dy = clamped_swiglu_back(g * weights, y);
        dweights[n] = sum_f clamped_swiglu(y)[n, f] * g[n, f], in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.weighted_clamped_swiglu_back"
    act = _clamped(alpha, limit, op)
    return _gated_back(op, g, y, weights, True, act)


def _check_fp8_flag(fp8_input_store, op: str) -> None:
    # bool() of a CUDA tensor would sync, of a string would hide a misplaced argument
    if isinstance(fp8_input_store, torch.Tensor) or not isinstance(fp8_input_store, (bool, int)):
        raise TypeError(f"{op}: fp8_input_store must be a bool, got {type(fp8_input_store).__name__}")


class WeightedSwiGLUFunction(torch.autograd.Function):
    """Autograd of weighted_swiglu (the seed's ``WeightedSwiGLUFunction``): input [N, 2F], weights [N, 1].

    ``forward(ctx, input, weights, fp8_input_store)`` returns weighted_swiglu(input, weights) [N, F];
    ``backward`` returns (d input [N, 2F] in input.dtype, d weights [N, 1] in weights.dtype, None) from one
    kernel pass. Not twice differentiable.

    fp8_input_store=True saves ``input`` for backward as ``torch.float8_e4m3fn`` (half the memory of bf16) and
    upcasts it in backward, as the seed does. The precision cost falls on the gradients only (the forward output
    uses the full input): e4m3 keeps 3 mantissa bits, so each saved value carries a relative rounding error of up
    to 2^-4 (6.25%); magnitudes above 448 saturate to +-448 and below 2^-10 become 0 (torch's cast); values under
    2^-6 are subnormal with fewer bits still.
    """

    @staticmethod
    def forward(ctx, input, weights, fp8_input_store):
        op = "moe_raw.WeightedSwiGLUFunction"
        _check_y(input, op, two_d=True, arg="input")
        _check_weights(weights, input, op)
        _check_fp8_flag(fp8_input_store, op)
        saved = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(saved, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = bool(fp8_input_store)
        return weighted_swiglu(input, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        if ctx.fp8_input_store:
            input = input.to(ctx.ori_input_dtype)
        dinput, dweights = weighted_swiglu_back(grad_output, input, weights)
        return (
            dinput if ctx.needs_input_grad[0] else None,
            dweights if ctx.needs_input_grad[1] else None,
            None,
        )


def weighted_bias_swiglu_impl(input: torch.Tensor, weights: torch.Tensor, fp8_input_store: bool = False):
    """Token-weighted SwiGLU with autograd (the seed's ``weighted_bias_swiglu_impl``; no bias).

    Args:
        input: [N, 2F] or [S, B, 2F] (N = S * B) float32 | float16 | bfloat16 (float64: the torch reference).
        weights: [N, 1] float, one weight per row.
        fp8_input_store: save the input for backward as float8_e4m3fn (see ``WeightedSwiGLUFunction`` for the
            precision this costs the gradients).

    Returns:
        [N, F] or [S, B, F] in input.dtype. Differentiable w.r.t. input and weights.

    A bias is not supported, as in the seed: a Megatron-style call ``(input, bias, weights)`` lands a tensor in
    ``fp8_input_store`` and raises NotImplementedError.
    """
    op = "moe_raw.weighted_bias_swiglu_impl"
    if isinstance(fp8_input_store, torch.Tensor):
        raise NotImplementedError(
            f"{op}: bias is not supported for weighted swiglu fusion (as in the seed); the signature is "
            "(input, weights, fp8_input_store=False), so a third tensor argument looks like Megatron's "
            "(input, bias, weights) call"
        )
    _check_fp8_flag(fp8_input_store, op)
    _check_y(input, op, two_d=False, arg="input")  # before the reshape, so errors name this function's argument
    ori_shape = input.shape
    if len(ori_shape) not in (2, 3):
        raise ValueError(f"{op}: input must be 2-D [N, 2F] or 3-D [S, B, 2F], got shape {tuple(ori_shape)}")
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        _check_weights(weights, _as_2d(input), "moe_raw.WeightedSwiGLUFunction")  # what the Function checks
        output = _ops.weighted_glu_fn(_as_2d(input), weights, bool(fp8_input_store), *_SWIGLU)
    else:
        output = WeightedSwiGLUFunction.apply(_as_2d(input), weights, bool(fp8_input_store))
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], output.shape[1])


class WeightedQuickGeGLUFunction(torch.autograd.Function):
    """Autograd of weighted Quick-GEGLU (Megatron-LM's ``WeightedQuickGeGLUFunction``): input [N, 2F], weights
    [N, 1] -> [N, F] in input.dtype; backward (d input [N, 2F] in input.dtype, d weights [N, 1] in weights.dtype)
    from one kernel pass. Not twice differentiable.

    ``forward(ctx, input, weights, fp8_input_store, linear_offset, clamp_value=None, alpha=1.702)``: Megatron's
    parameters (linear_offset a float or a 0-d CPU tensor; Megatron passes a tensor on the input's device, which
    would have to be read back here), then two of moe_raw's: clamp_value applies Megatron's clamp (gate <=
    clamp_value, |linear| <= clamp_value) inside the kernels instead of as torch ops before the Function, and alpha
    replaces quick_gelu's 1.702. fp8_input_store saves the (unclamped) input as float8_e4m3fn as
    ``WeightedSwiGLUFunction`` does, so the backward's clamp test also sees the fp8-rounded input: it can differ from
    Megatron's (which tests the full-precision input) for inputs within one e4m3 step (2^-4 relative) of the bound.
    """

    @staticmethod
    def forward(ctx, input, weights, fp8_input_store, linear_offset, clamp_value=None, alpha=_QUICK_GELU_ALPHA):
        op = "moe_raw.WeightedQuickGeGLUFunction"
        _check_y(input, op, two_d=True, arg="input")
        _check_weights(weights, input, op)
        _check_fp8_flag(fp8_input_store, op)
        limit = _limit(clamp_value, "clamp_value", op) if clamp_value is not None else None
        act = (_constant(alpha, "alpha", op), _constant(linear_offset, "linear_offset", op), limit)
        saved = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(saved, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = bool(fp8_input_store)
        ctx.act = act
        return _gated(op, input, weights, True, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        if ctx.fp8_input_store:
            input = input.to(ctx.ori_input_dtype)
        op = "moe_raw.WeightedQuickGeGLUFunction"
        dinput, dweights = _gated_back(op, grad_output, input, weights, True, ctx.act)
        return (
            dinput if ctx.needs_input_grad[0] else None,
            dweights if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def _check_bias(bias, input, op: str) -> None:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    _dense(bias, "bias", op)
    if bias.dtype not in _FLOATS:
        raise TypeError(f"{op}: bias must be float32, float16, bfloat16 or float64, got {bias.dtype}")
    try:
        fits = torch.broadcast_shapes(bias.shape, input.shape) == input.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: bias must broadcast to input {tuple(input.shape)}, got {tuple(bias.shape)}")
    _same_device(bias, input, "bias", op)


def weighted_bias_quick_geglu_impl(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor,
    fp8_input_store: bool = False,
    linear_offset: float = 0.0,
    clamp_value: float | None = None,
    alpha: float = _QUICK_GELU_ALPHA,
):
    """Token-weighted Quick-GEGLU with autograd: Megatron-LM's ``weighted_bias_quick_geglu_impl`` (NeMo Automodel's
    adds alpha, which its own body ignores; here it is used).

    gpt-oss experts (Megatron's quick_gelu with glu_linear_offset=1.0, activation_func_clamp_value=7.0):
    ``weighted_bias_quick_geglu_impl(x, None, probs, linear_offset=1.0, clamp_value=7.0)``.

    Args:
        input: [N, 2F] or [S, B, 2F] (N = S * B) float32 | float16 | bfloat16 (float64: the torch reference),
            ``[gate | linear]`` halves.
        bias: None, or a float tensor broadcast to input, added after the clamp as Megatron does. That path runs
            torch ops for the clamp and the add (autograd differentiates them; output in input.dtype) before the
            kernels; without a bias the clamp runs inside the kernels.
        weights: [N, 1] float, one weight per row.
        fp8_input_store: save the input for backward as float8_e4m3fn (see ``WeightedQuickGeGLUFunction``).
        linear_offset: float added to the linear half. clamp_value: None, or the clamp (> 0): gate <= clamp_value,
            |linear| <= clamp_value, zero gradient where active. alpha: quick_gelu's sigmoid scale.

    Returns:
        [N, F] or [S, B, F] in input.dtype. Differentiable w.r.t. input, bias and weights.
    """
    op = "moe_raw.weighted_bias_quick_geglu_impl"
    _check_fp8_flag(fp8_input_store, op)
    _check_y(input, op, two_d=False, arg="input")  # before the reshape, so errors name this function's argument
    ori_shape, ori_dtype = input.shape, input.dtype
    if len(ori_shape) not in (2, 3):
        raise ValueError(f"{op}: input must be 2-D [N, 2F] or 3-D [S, B, 2F], got shape {tuple(ori_shape)}")
    if bias is not None:
        _check_bias(bias, input, op)
        if clamp_value is not None:
            input = reference.clamp_glu(input, _limit(clamp_value, "clamp_value", op))
        input = input + bias
        clamp_value = None
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        fn_op = "moe_raw.WeightedQuickGeGLUFunction"  # what the Function checks
        _check_weights(weights, _as_2d(input), fn_op)
        limit = _limit(clamp_value, "clamp_value", fn_op) if clamp_value is not None else None
        act = (_constant(alpha, "alpha", fn_op), _constant(linear_offset, "linear_offset", fn_op), limit)
        output = _ops.weighted_glu_fn(_as_2d(input), weights, bool(fp8_input_store), *act)
    else:
        output = WeightedQuickGeGLUFunction.apply(
            _as_2d(input), weights, bool(fp8_input_store), linear_offset, clamp_value, alpha
        )
    if output.dtype != ori_dtype:  # a wider bias promoted the sum; Megatron returns input.dtype
        output = output.to(ori_dtype)
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], output.shape[1])


# Last: _ops reads this module's functions when its ops run.
from moe_raw import _ops  # noqa: E402
