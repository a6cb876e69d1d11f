"""Launching the gated-activation kernels: the dtype plan of a call, Numba's kernel ABI packed by hand (one
``struct.pack_into``, one ``cuLaunchKernel`` through ``moe_raw._launch``), the per-device compile cache, the CUDA
simulator's path for CPU tensors, and the torch twins used off the kernels (CPU tensors, float64).

Launch cost. Numba's dispatcher costs 52-104 us a call with torch tensors (measured on an H100). Here each kernel is
compiled once per (signature, device) and its loaded function handle is launched through
``moe_raw._launch.launch_compiled``: one ``struct.pack_into`` of the argument words, one ``cuLaunchKernel`` on
torch's current stream (CUDA-graph capturable). The packing reproduces Numba's kernel ABI (``_ARRAY_ABI``).
The first call of each signature on a device compiles it (NVVM, about a second). Host time of one op at N=16
on the H100 hosts: 14-20 us forward, 26-29 us weighted backward (its two output allocations, ~5 us each there,
and the launch, ~8 us, are most of it); torch.compile of the seed: 49-72 us (bench/results/*-h100-swiglu).

Below: ``glu_codegen`` (kernel source and compile), ``moe_raw._launch``. Above: ``moe_raw.activations`` (public
functions, autograd) and ``moe_raw._ops`` (torch.compile custom ops), which call ``glu_fwd`` / ``glu_bwd`` only.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_raw import _launch, reference
from moe_raw._kernels import glu_codegen
from moe_raw._kernels.glu_codegen import (
    _BLOCK,
    _SIM_BLOCK,
    _SWIGLU,
    _WARPS_PER_BLOCK,
    Act,
    GluSpec,
    _abi,
    _dispatcher,
    _layout,
    _numba_kernel,
    _simulator,
    warp_items,
)
from moe_raw._launch import row_view

_CODE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # dtypes with kernels
_compiled: dict = {}  # (spec, device index) -> _launch.compiled_kernel tuple


def _fast_kernel(spec, index: int):
    """The launch tuple of a spec on device ``index``: the CUfunction/CUkernel handle Numba loaded, wrapped by
    ``_launch.compiled_kernel`` with the parameter layout of Numba's ABI. Cached."""
    key = (spec, index)
    kern = _compiled.get(key)
    if kern is None:
        _launch.check_device(index)  # an unsupported GPU fails here, before Numba compiles
        with glu_codegen._kernel_lock:
            kern = _compiled.get(key)
            if kern is None:
                numba_kernel = _numba_kernel(spec, index)
                with glu_codegen.cuda.gpus[index]:
                    # numba/cuda/codegen.py::CUDACodeLibrary.get_cufunc: the function loaded for the current
                    # device, cached there per device; .handle is what Numba's own launch hands the driver.
                    cufunc = numba_kernel._codelibrary.get_cufunc()
                kern = _launch.compiled_kernel(int(cufunc.handle), _abi(spec), owner=(numba_kernel, cufunc))
                _compiled[key] = kern
    return kern


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
    """Launch a spec's kernel: one warp per row (forward: per row segment, ``warp_items``), ``_BLOCK`` threads a
    block. index >= 0: the CUDA device of the tensors, the fast launch on torch's current stream there. index < 0:
    CPU tensors, Numba's simulator (only under NUMBA_ENABLE_CUDASIM=1). scalars[1] is the row's unit count."""
    warps = warp_items(spec[0], n_rows, scalars[1])
    if index >= 0:
        kern = _compiled.get((spec, index)) or _fast_kernel(spec, index)
        args = _kernel_args(spec, tensors, spans, scalars)
        _launch.launch_compiled(kern, index, _launch.cdiv(warps, _WARPS_PER_BLOCK), _BLOCK, args)
        return
    if not _simulator():
        raise RuntimeError(
            "moe_raw.activations: the Numba kernels run on CUDA tensors (or under NUMBA_ENABLE_CUDASIM=1)"
        )
    _dispatcher(spec)[_launch.cdiv(warps, _SIM_BLOCK // 32), _SIM_BLOCK](*_sim_arrays(spec, tensors, spans), *scalars)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: validated 2-D views in, outputs written (no allocation, no validation)


_ESIZE = {"f32": 4, "f16": 2, "bf16": 2}


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
        act = Act(*act)  # a plain 3-tuple reads as cubic 0
        act = None if act == _SWIGLU else act  # SwiGLU's own code path
        vec = GluSpec(kind, weighted, True, yc, gc, oc, wc, act) if yc == gc == oc else None
        plan = _PLANS[key] = (_ESIZE[yc], (vec, GluSpec(kind, weighted, False, yc, gc, oc, wc, act)))
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
    y = row_view(y)
    n_rows, two_f = y.shape
    out = y.new_empty((n_rows, two_f >> 1))
    if n_rows and two_f:
        _launch_kernel(*_fwd_args(y, weights, out, act), n_rows, y.get_device())
    return out


def _swiglu_bwd(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype, act: tuple):
    g, y = row_view(g), row_view(y)
    n_rows, two_f = y.shape
    dy = y.new_empty((n_rows, two_f), dtype=out_dtype)
    dw = weights.new_empty((n_rows, 1)) if weights is not None else None
    _bwd_into(g, y, weights, dy, dw, act)
    return dy, dw


def _on_kernels(y, g=None, weights=None) -> bool:
    """Whether the kernels run: CUDA tensors of kernel dtypes (float64 goes to the reference: fp32 math would
    lose its precision). Tests under NUMBA_ENABLE_CUDASIM=1 patch this to run the kernels on CPU tensors."""
    return (
        y.is_cuda
        and y.dtype in _CODE
        and (g is None or g.dtype in _CODE)
        and (weights is None or weights.dtype in _CODE)
    )


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, contiguous: torch's CPU loops round some fp32 results 1 ulp differently on strided and contiguous
    data (vectorised vs scalar paths), so every layout is brought to one before the math, as the kernels' results
    do not depend on layout either."""
    return x.to(dtype).contiguous()


def _glu_torch(y, weights, act: tuple) -> torch.Tensor:
    """The kernels' forward in torch: act(y) (* weights) in fp32 (fp64 if an input is fp64), rounded once to
    y.dtype. Plain torch ops, so autograd differentiates it where that is asked for (the ``*_back`` functions)."""
    acc = _acc_dtype(y, weights)
    y_acc = _dense(y, acc)
    out = reference.swiglu(y_acc) if act == _SWIGLU else reference.quick_glu(y_acc, *act)
    if weights is not None:
        out = out * _dense(weights, acc)
    return out.to(y.dtype)


def _glu_back_torch(g, y, weights, act: tuple, out_dtype: torch.dtype):
    """The kernels' backward in torch, in fp32 (fp64 if an input is fp64): (dy in out_dtype, dweights in
    weights.dtype | None)."""
    acc = _acc_dtype(g, y, weights)
    g_acc, y_acc = _dense(g, acc), _dense(y, acc)
    if weights is None:
        dy = reference.swiglu_back(g_acc, y_acc) if act == _SWIGLU else reference.quick_glu_back(g_acc, y_acc, *act)
        return dy.to(out_dtype), None
    w_acc = _dense(weights, acc)
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


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return x.reshape(rows, x.shape[-1])  # not -1: a last dim of 0 leaves -1 ambiguous


def _weighted_fn_backward(grad_output, saved_input, weights, act: tuple, input_dtype, needs_input_grad) -> tuple:
    """The backward of WeightedSwiGLUFunction / WeightedQuickGeGLUFunction and of their torch.compile custom op:
    (d input [N, 2F] in input_dtype | None, d weights [N, 1] | None), one kernel pass. saved_input is the input,
    or its float8_e4m3fn copy (fp8_input_store), widened back here."""
    dinput, dweights = _glu_bwd(grad_output, saved_input.to(input_dtype), weights, act, input_dtype)
    return (dinput if needs_input_grad[0] else None), (dweights if needs_input_grad[1] else None)
