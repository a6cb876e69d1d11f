"""LLVM-level and PTX helpers of the gated-activation kernels on the GPU (Numba CUDA intrinsics), used by
``glu_codegen._defs``; the CUDA simulator runs plain-Python stand-ins of them instead (defined there).

16-byte vector loads / stores, a wrapping 32-bit add, fp16 <-> fp32 conversions by LLVM's half type, and single PTX
instructions as pure intrinsics: ``ex2.approx.ftz`` and the round-to-nearest-even bf16 / bf16x2 / f16x2 narrowing
``cvt``s (sm_80+). Imported only when a kernel is built: ``import moe_raw`` needs neither Numba nor llvmlite.
"""

from __future__ import annotations


def vector_intrinsics():
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

    def asm(ptx, constraints, ret, args):
        # one PTX instruction as an intrinsic (pure: no side effects, so it schedules and folds freely)
        def codegen(context, builder, sig, llargs):
            ftype = ir.FunctionType(context.get_value_type(ret), [context.get_value_type(a) for a in args])
            return builder.call(ir.InlineAsm(ftype, ptx, constraints), llargs)

        if len(args) == 1:

            def unary(typingctx, x):
                return ret(*args), codegen

            return intrinsic(unary)

        def binary(typingctx, x, y):
            return ret(*args), codegen

        return intrinsic(binary)

    f32 = types.float32
    # 2^x with flush to zero (MUFU.EX2 alone)
    ex2_ftz = asm("ex2.approx.ftz.f32 $0, $1;", "=f,f", f32, [f32])
    # fp32 -> bf16 bits, round to nearest even (sm_80+)
    cvt_bf16 = asm("cvt.rn.bf16.f32 $0, $1;", "=h,f", types.uint16, [f32])
    # (lo, hi) -> one word, hi in the upper half: cvt.rn.{bf16x2,f16x2}.f32 d, a, b puts a in the upper half
    cvt_bf16x2 = asm("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", types.uint32, [f32, f32])
    cvt_f16x2 = asm("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", types.uint32, [f32, f32])
    return ld4, st4, add32, f16_to_f32, f32_to_f16, ex2_ftz, cvt_bf16, cvt_bf16x2, cvt_f16x2
