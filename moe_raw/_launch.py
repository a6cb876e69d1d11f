"""The one kernel launcher: load ``kernels/<family>.cu``, compile it once per device, launch on torch's stream.

* Sources are read with ``importlib.resources`` from the installed package ``moe_raw.kernels`` (the wheel ships
  them), prefixed with ``#line 1 "<path>"`` so NVRTC errors name the real file and line.
* A ``cupy.RawModule`` per (family, group of template instances, device) (``name_expressions``;
  ``_compile_group``: a first call compiles the instances it is likely to use, not the family); CuPy caches the
  binary on disk (``~/.cupy/kernel_cache``), so only the first use on a machine compiles.
* Launches go to torch's current stream of the tensors' device (its raw handle, no stream object), so they order
  with torch ops and are captured by ``torch.cuda.graph``.
* Arguments are packed with one ``struct`` per kernel (SIGNATURES: the C type of every parameter) into a per-thread
  buffer handed to ``cuLaunchKernel`` as CU_LAUNCH_PARAM_BUFFER_POINTER. CuPy's ``Function.__call__`` converts each
  argument separately: 12 us for a 7-argument launch on an H100 host, against 6.5-7.2 us this way (same runs).
* Tensors pass as raw device addresses (zero-copy: the address ``__cuda_array_interface__`` exports, bf16 and
  ``requires_grad`` tensors included, which CAI / DLPack export would refuse); any CAI object is accepted too.
* A launch asking for more than 48 KiB of shared memory (E near MAX_EXPERTS, fp64 rows) opts the function in first
  (``_allow_shared_mem``); cuLaunchKernel refuses it otherwise.

cupy is imported lazily: ``import moe_raw`` works on a machine with no GPU.

CuPy is imported, and its disk cache's failures absorbed, by ``moe_raw._cupy_cache``.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import pathlib
import struct
import threading

import numpy as np
import torch

from moe_raw import _cupy_cache

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
SCALAR_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # kernels/common.cuh

# Every kernel instance a family exposes, compiled in groups (_compile_group), once per device.
_VEC_BYTES = (16, 8, 4, 2, 1)


def row_view(x):
    """x (2-D) as rows the kernels can read: unchanged when its last dim is contiguous (any row stride, 0 included)
    or has at most one element, else a contiguous copy (the rare case). Both kernel families use this one rule."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes: the one copy (the launchers of both kernel families use it)."""
    return -(-a // b)


# kernels/router.cu instances: (V experts a lane, L lanes a token). V = 16 and the smallest L with L * V >= E up to
# E = 512; V = 32, L = 32 up to E = 1024.
ROUTER_SHAPES = ((16, 1), (16, 2), (16, 4), (16, 8), (16, 16), (16, 32), (32, 32))

# kernels/permute.cu unpermute_bwd's QUAD instances (four rows a step, 16-byte packs) exist for these element types
# only: fp32's spilled 8 bytes at its 56-register cap (sm_90).
QUAD_CTYPES = ("__half", "__nv_bfloat16")


def _permute_instances() -> tuple[str, ...]:
    names = ["moe_raw::routing_pack<256>", "moe_raw::routing_scan<1024>", "moe_raw::pad_offsets<1024>"]
    names += [f"moe_raw::permute_{way}<{vb}>" for way in ("scatter", "small") for vb in _VEC_BYTES]
    names += [f"moe_raw::permute_grouped<16, {ke}>" for ke in (1, 4)]  # kernels/permute.cu KE
    names += [f"moe_raw::scatter_rows<{vb}>" for vb in _VEC_BYTES]
    for dtype, ctype in CTYPES.items():
        size = torch.empty((), dtype=dtype).element_size()
        for vb in _VEC_BYTES:
            if vb >= size:
                names += [f"moe_raw::gather_{way}<{ctype}, {vb}>" for way in ("reduce", "warp")]
                names.append(f"moe_raw::unpermute_bwd<{ctype}, {vb}>")
        names.append(f"moe_raw::unpermute_bwd<{ctype}, 16, true>")  # kernels/permute.cu LONE: where N < 2 T
        if ctype in QUAD_CTYPES:
            names.append(f"moe_raw::unpermute_bwd<{ctype}, 16, false, 4>")  # kernels/permute.cu QUAD: where N >= 4 T
    return tuple(names)


KERNELS = {
    "permute": _permute_instances(),
    "chunks": tuple(f"moe_raw::chunk_sort<{vb}>" for vb in _VEC_BYTES),
    "topk": tuple(
        f"moe_raw::topk_dense<{index}, {word}>"
        for index in ("int32_t", "int64_t")
        for word in ("uint16_t", "uint32_t", "uint64_t")
    ),
    "router": tuple(f"moe_raw::router_{way}<{v}, {lanes}>" for v, lanes in ROUTER_SHAPES for way in ("fwd", "bwd")),
    "quantize": tuple(
        f"moe_raw::quantize_{kind}<{c}>"
        for kind in ("rows", "warp", "grad_rows")
        for c in ("float", "__half", "__nv_bfloat16")
    )
    + ("moe_raw::quantize_fill<256>",),
}

# Parameter layout of every kernel, as struct codes: P device pointer, q int64_t, i int. struct's native
# alignment ('@') is the layout CUDA expects in a packed parameter buffer, so one struct.pack_into replaces
# CuPy's per-argument conversion, and a wrong Python type raises instead of being passed silently.
SIGNATURES = {
    "permute": {
        "routing_pack": "PiqqqiP",
        "routing_scan": "Pqi",
        "permute_scatter": "PqPqqiqiqPiqqPPPPiqqPqP",
        "permute_small": "PqPqqiqiqPiqqPPPPiqqPqP",
        "permute_grouped": "PqPqqiqiqPiqqPPPPiqqPqPii",
        "gather_reduce": "PqqPqqqiPPPPiqqPiPi",
        "gather_warp": "PqqPqqqiPPPPiqqPiPi",
        "unpermute_bwd": "PqPqPqqqiPPiqqPiP",
        "pad_offsets": "PqiqiPPPP",
        "scatter_rows": "PqPqqiqPP",
    },
    "chunks": {"chunk_sort": "PqPqqqPiPiiPqPii"},
    "topk": {"topk_dense": "PPqiiPqP"},
    "router": {"router_fwd": "PiqiPiiiiiidiPiPPP", "router_bwd": "PiqiiiidiPiiPP"},
    "quantize": {
        "quantize_rows": "PqiPiifiiPP",
        "quantize_warp": "PqiPiifiiPPq",
        "quantize_grad_rows": "PqiPiqPiqqifiiPP",
        "quantize_fill": "PPiiiqPqii",
    },
}


def _compile_group(family: str, name: str) -> tuple[str, ...]:
    """The instances of KERNELS[family] compiled in one module with ``name``: those a call that needs ``name`` is
    likely to need next, so that a first call compiles what it uses, not the whole family. NVRTC's time grows with
    the instances (ptxas most of it): to an sm_90 cubin on one CPU core, router.cu takes 23 s for its 14, 2.7 s for
    one (V, L) pair's forward and backward, of which a model uses one (its E). Groups: the router's and quantize's
    instances of the same template arguments (a pair; an element type's quantize kernels), permute's gathers one
    group per element type and the rest of permute one; chunks and topk whole (under 1 s)."""
    key = _group_key(family, name)
    return tuple(n for n in KERNELS[family] if _group_key(family, n) == key)


_GATHERS = ("gather_reduce", "gather_warp", "unpermute_bwd")  # permute.cu's row sums, templated on the element type


def _group_key(family: str, name: str):
    """What the instances of one compile group share (``_compile_group``)."""
    args = name[name.index("<") :]
    if family in ("router", "quantize"):  # router_fwd<V, L> with router_bwd<V, L>; quantize_*<T> of one T
        return args
    if family == "permute" and base_name(name) in _GATHERS:  # "<T": one element type, every vector width
        return args.split(",")[0]
    return None  # the rest of the family: permute's map kernels and byte movers, chunks, topk


_lock = threading.Lock()
_modules: dict = {}  # (family, instances, device index) -> cupy.RawModule
_kernels: dict = {}
_tls = threading.local()
_PARAMS_OFFSET = 64  # bytes: the cuLaunchKernel `extra` array and the buffer size live before the parameters
_PARAMS_CAPACITY = 448


# Support matrix. moe_raw runs on compute capability >= MIN_COMPUTE_CAPABILITY; CI compiles every kernel instance
# for each of CHECKED_ARCHS (compute capability x 10) with nvcc (.ci/compile_kernels.sh, whose ARCHS must equal
# this), NVRTC's front end for one architecture of each __CUDA_ARCH__ branch set (tests/test_kernels_compile.py) and,
# for the Numba kernels, NVVM + ptxas (tests/test_support_matrix.py).
# 7.x is refused: permute_scatter's __launch_bounds__(128, 12) asks for 1536 resident threads per SM, a Turing SM
# holds 1024 (ptxas: "Value of threads per SM ... is out of range"), and nothing is tested there.
MIN_COMPUTE_CAPABILITY = (8, 0)
CHECKED_ARCHS = (80, 86, 89, 90, 100, 120)
_supported_devices: set = set()  # device indices check_device passed


def check_device(index: int) -> None:
    """Raise RuntimeError if CUDA device ``index`` is older than MIN_COMPUTE_CAPABILITY. Called where kernels are
    compiled for a device (``_module``, and the Numba compile in moe_raw._kernels.glu_launch), so a launch never
    pays for it; after the first pass for a device it is one set lookup."""
    if index in _supported_devices:
        return
    if not torch.cuda.is_available():  # a torch without CUDA can't tell (CPU tests with a stand-in CuPy)
        return
    cc = tuple(torch.cuda.get_device_capability(index))
    if cc < MIN_COMPUTE_CAPABILITY:
        major, minor = MIN_COMPUTE_CAPABILITY
        raise RuntimeError(
            f"moe_raw needs compute capability >= {major}.{minor} (Ampere or newer); cuda:{index} is "
            f"{torch.cuda.get_device_name(index)} ({cc[0]}.{cc[1]}). Its kernels are built and checked for "
            + ", ".join(f"sm_{a}" for a in CHECKED_ARCHS)
            + "."
        )
    _supported_devices.add(index)


_bulk_copy_devices: dict = {}  # device index -> has_bulk_copy


def has_bulk_copy(device: torch.device) -> bool:
    """Whether the kernels compile their bulk-copy paths for ``device`` (a CUDA device of sm_90+: kernels/common.cuh
    defines MOE_RAW_BULK_COPY there; False for any other device). sm_90 also runs programmatic dependent launches
    (``launch(..., overlap=True)``). Cached: one dict lookup after the first call. The test emulator, whose kernels
    take those paths on CPU tensors, replaces it."""
    if device.type != "cuda":
        return False
    ok = _bulk_copy_devices.get(device.index)
    if ok is None:
        ok = _bulk_copy_devices[device.index] = torch.cuda.get_device_capability(device.index)[0] >= 9
    return ok


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log with real file:line locations."""


NVRTC_OPTIONS = ("-std=c++17",)


def _kernels_dir():
    """Where the kernel sources are: the ``kernels/`` next to ``moe_raw/`` when Python imported moe_raw from a source
    checkout (an editable install, a checkout on sys.path, the current directory shadowing another install), so the
    launchers and the kernels always come from the same tree; else the installed package ``moe_raw.kernels`` (the
    wheel)."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if os.path.isfile(os.path.join(checkout, "common.cuh")):
        return pathlib.Path(checkout)
    try:
        return importlib.resources.files("moe_raw.kernels")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "moe_raw: the CUDA kernel sources (package moe_raw.kernels) are not installed and no kernels/ directory "
            f"is next to {os.path.dirname(os.path.abspath(__file__))}; reinstall moe_raw (pip install moe_raw)"
        ) from None


def kernel_source(family: str) -> str:
    """The NVRTC source of kernels/<family>.cu: common.cuh inlined (NVRTC gets no include path, and the inlined
    text makes CuPy's cache key change when the header does), #line directives naming the real files."""
    root = _kernels_dir()
    with importlib.resources.as_file(root) as kernels_dir:
        path, header = kernels_dir / f"{family}.cu", kernels_dir / "common.cuh"
        lines = (root / f"{family}.cu").read_text().split("\n")
        common = (root / "common.cuh").read_text()
        for i, line in enumerate(lines):
            if line.strip() == '#include "common.cuh"':  # resume at the line after the include
                lines[i] = f'#line 1 "{header}"\n{common}\n#line {i + 2} "{path}"'
        return f'#line 1 "{path}"\n' + "\n".join(lines)


def _module(family: str, device_index: int, names: tuple[str, ...] | None = None):
    """The compiled module of kernels/<family>.cu holding the instances ``names`` (default: all of KERNELS[family])
    for device ``device_index``; compiled once per process (and from CuPy's disk cache after the first process)."""
    names = KERNELS[family] if names is None else names
    key = (family, names, device_index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    check_device(device_index)  # an unsupported GPU fails here, before any compile
    with _lock:  # threads racing on the first call compile once
        mod = _modules.get(key)
        if mod is not None:
            return mod
        cupy = _cupy_cache.cupy()
        code = kernel_source(family)
        with cupy.cuda.Device(device_index):
            mod = cupy.RawModule(code=code, options=NVRTC_OPTIONS, name_expressions=names)
            try:
                _cupy_cache.compile_module(mod)
            except cupy.cuda.compiler.CompileException as e:
                raise KernelCompileError(f"moe_raw: compiling kernels/{family}.cu failed:\n{e}") from e
        _modules[key] = mod
        return mod


def base_name(name: str) -> str:
    """A kernel instance's function name: "moe_raw::gather_warp<float, 16>" -> "gather_warp" (SIGNATURES' key)."""
    return name.split("<")[0].split("::")[-1]


def function(family: str, name: str, device_index: int):
    """(cupy Function, struct.Struct of its parameters) for kernel ``name`` of KERNELS[family]; cached."""
    key = (family, name, device_index)
    kern = _kernels.get(key)
    if kern is None:
        mod = _module(family, device_index, _compile_group(family, name))
        with _cupy_cache.cupy().cuda.Device(device_index):
            # RawKernel.kernel: the cupy.cuda.Function (its .ptr is the CUfunction) loaded in this device's context
            fn = mod.get_function(name).kernel
        # fn is kept alive with the handle: it owns the loaded module.
        kern = compiled_kernel(fn.ptr, SIGNATURES[family][base_name(name)], owner=fn)
        _kernels[key] = kern
    return kern


def _param_buffer():
    """This thread's launch buffer: the cuLaunchKernel ``extra`` array (5 words), the parameter-buffer size at byte
    40, the parameters from byte 64. A kernel's struct ("@Q16x" + signature) packs the size word, padding to byte
    64 and the parameters in one call at byte 40; 40 is 8-aligned, so struct's native alignment inside the pack is
    the absolute alignment CUDA expects."""
    buf = np.zeros((_PARAMS_OFFSET + _PARAMS_CAPACITY) // 8, dtype=np.uint64)
    base = buf.ctypes.data
    # CU_LAUNCH_PARAM_BUFFER_POINTER, params, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, CU_LAUNCH_PARAM_END
    buf[:5] = (1, base + _PARAMS_OFFSET, 2, base + 40, 0)
    _tls.buf, _tls.base = buf, base
    return buf, base


def _raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


# torch's private getter skips building a torch.cuda.Stream object (Inductor uses the same call).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream)


def runs_kernels(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the CUDA C kernels (kernels/*.cu) rather than its torch twin: x is on a CUDA
    device. The one switch of every dispatch site, so the test emulator (tests/cuda_emu) can run the kernels on CPU
    tensors by replacing it."""
    return x.is_cuda


def ptr(x) -> int:
    """Device address of a torch tensor (zero-copy; bf16 and requires_grad included), of any
    ``__cuda_array_interface__`` object (CuPy, Numba arrays), or 0 for None."""
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return x.data_ptr()
    return x.__cuda_array_interface__["data"][0]


def launch(
    family: str, name: str, device: torch.device, grid, block: int, args: tuple, shared_mem: int = 0,
    overlap: bool = False,
):  # fmt: skip
    """Launch kernel ``name`` of ``kernels/<family>.cu`` on torch's current stream of ``device``.

    grid: int (grid.x < 2^31) or (x, y); block: threads per block; args: Python ints in kernel order, device
    addresses from ``ptr`` (SIGNATURES gives each parameter's C type). Callers skip launches with no work.
    cuLaunchKernel copies the parameters before it returns, so the buffer is reused at once (a captured CUDA
    graph keeps its own copy). This is the hot path of every small call: keep it free of lookups.
    overlap: a programmatic dependent launch (kernels/common.cuh pdl_wait), which may start before the kernel
    ahead of it on the stream has finished; only for kernels that call pdl_wait() before touching its outputs.
    """
    index = device.index
    if index is None:
        index = torch.cuda.current_device()
    kern = _kernels.get((family, name, index)) or function(family, name, index)
    if shared_mem > _SHARED_NO_OPT_IN:
        _allow_shared_mem(kern[0], index, shared_mem)
    launch_compiled(kern, index, grid, block, args, shared_mem, overlap)


# A block gets 48 KiB of shared memory (static + dynamic) unless its function opted in to more. The row kernels'
# dynamic size grows with E (8-16 bytes per expert): at E = 4096 unpermute's backward asks for 48-64 KiB. The
# opt-in threshold leaves 2 KiB for their static shared memory (at most 1152 bytes: nvcc --resource-usage).
_SHARED_NO_OPT_IN = 46 * 1024
_shared_allowed: dict = {}  # CUfunction handle -> dynamic shared bytes it is opted in to


def _allow_shared_mem(cufunction: int, index: int, nbytes: int) -> None:
    """Raise the function's dynamic shared memory limit to ``nbytes`` (once per size; Hopper allows 227 KiB)."""
    if _shared_allowed.get(cufunction, 0) >= nbytes:
        return
    cupy = _cupy_cache.cupy()
    driver = cupy.cuda.driver
    with _lock, cupy.cuda.Device(index):
        nbytes = max(nbytes, _shared_allowed.get(cufunction, 0))  # never lower it under a racing launch
        driver.funcSetAttribute(cufunction, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
        _shared_allowed[cufunction] = nbytes


def compiled_kernel(cufunction: int, signature: str, owner=None) -> tuple:
    """Wrap any compiled CUDA function (a CUfunction handle, e.g. from Numba) for ``launch_compiled``.

    signature: struct codes of its parameters in order (P pointer, q int64, i int32, f float32, ...), laid out as
    the kernel's ABI expects. owner: any object that must stay alive while the handle is used.
    """
    params = struct.Struct("@Q16x" + signature)
    size = params.size - 24
    if size > _PARAMS_CAPACITY:
        raise ValueError(f"moe_raw: {size} bytes of kernel parameters exceed the {_PARAMS_CAPACITY} supported")
    return (cufunction, params.pack_into, size, owner)


def launch_compiled(kern: tuple, index: int, grid, block: int, args: tuple, shared_mem: int = 0, overlap=False):
    """Launch a ``function`` / ``compiled_kernel`` tuple on torch's current stream of device ``index`` (overlap:
    see ``launch``)."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf, base = _param_buffer()
    else:
        base = _tls.base
    kern[1](buf, 40, kern[2], *args)
    gx, gy = grid if grid.__class__ is tuple else (grid, 1)
    run = _launch_kernel_overlapped if overlap else _launch_kernel
    if _get_device() != index:
        with _cupy_cache.cupy().cuda.Device(index):
            run(kern[0], gx, gy, 1, block, 1, 1, shared_mem, _raw_stream(index), 0, base)
        return
    try:
        run(kern[0], gx, gy, 1, block, 1, 1, shared_mem, _raw_stream(index), 0, base)
    except _cupy_cache.cupy().cuda.driver.CUDADriverError as e:
        if "CUDA_ERROR_INVALID_CONTEXT" not in str(e):
            raise
        _cupy_cache.cupy().cuda.runtime.setDevice(index)  # a thread with no current context yet: bind the primary one
        run(kern[0], gx, gy, 1, block, 1, 1, shared_mem, _raw_stream(index), 0, base)


def _launch_kernel(*args):
    """cupy.cuda.driver.launchKernel, bound on first use (cupy is imported lazily)."""
    global _launch_kernel, _get_device
    cupy = _cupy_cache.cupy()
    _launch_kernel, _get_device = cupy.cuda.driver.launchKernel, cupy.cuda.runtime.getDevice
    return _launch_kernel(*args)


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute (cuda.h): the id, padding to 8, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [(f, ctypes.c_uint) for f in ("gx", "gy", "gz", "bx", "by", "bz", "shared_mem")] + [
        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)
    ]  # fmt: skip


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _launch_kernel_overlapped(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params, extra):
    """cuLaunchKernelEx with programmatic stream serialization allowed (the arguments of cuLaunchKernel), through
    ctypes: CuPy has no binding for it. Where the driver library or the entry point is missing, a plain launch
    (correct: the kernel's pdl_wait() then returns at once)."""
    global _launch_kernel_overlapped
    try:
        entry = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        _launch_kernel_overlapped = _launch_kernel
        return _launch_kernel(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params, extra)
    entry.restype = ctypes.c_int
    entry.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    driver_error = _cupy_cache.cupy().cuda.driver.CUDADriverError

    def launch_overlapped(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params, extra):
        config = getattr(_tls, "overlap_config", None)
        if config is None:  # one config and attribute a thread (the attribute is the same for every launch)
            attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
            attr.value[0] = 1
            config = _LaunchConfig(attrs=ctypes.pointer(attr), num_attrs=1)
            _tls.overlap_config, _tls.overlap_attr = config, attr
        config.gx, config.gy, config.gz, config.bx, config.by, config.bz = gx, gy, gz, bx, by, bz
        config.shared_mem, config.stream = shared_mem, stream
        status = entry(ctypes.byref(config), f, params or None, extra)
        if status:
            raise driver_error(status)

    _launch_kernel_overlapped = launch_overlapped
    return launch_overlapped(f, gx, gy, gz, bx, by, bz, shared_mem, stream, params, extra)


def _get_device() -> int:
    global _get_device
    _get_device = _cupy_cache.cupy().cuda.runtime.getDevice
    return _get_device()
