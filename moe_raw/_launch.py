"""The one kernel launcher: load ``kernels/<family>.cu``, compile it once per device, launch on torch's stream.

* Sources are read with ``importlib.resources`` from the installed package ``moe_raw.kernels`` (the wheel ships
  them), prefixed with ``#line 1 "<path>"`` so NVRTC errors name the real file and line.
* One ``cupy.RawModule`` per (family, device) holds every template instance (``name_expressions``); CuPy caches
  the binary on disk (``~/.cupy/kernel_cache``), so only the first use on a machine compiles.
* Launches go to torch's current stream of the tensors' device, so they order with torch ops and are captured by
  ``torch.cuda.graph``. The stream wrapper is cached: a new ``cupy.cuda.ExternalStream`` per call costs 20-26 us
  against 11 us for the whole cached launch (H100, design.md).
* Arguments: torch tensors and ``__cuda_array_interface__`` objects pass as raw device pointers (zero-copy; bf16 and
  ``requires_grad`` tensors included, which CAI / DLPack export would refuse); scalars must already be numpy
  scalars of the kernel parameter's type (CuPy would silently pass a Python float as a double).

cupy is imported lazily: ``import moe_raw`` works on a machine with no GPU.
"""

from __future__ import annotations

import importlib.resources
import threading

import numpy as np
import torch

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
SCALAR_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # kernels/common.cuh

# Every kernel instance a family exposes; all are compiled together, once per device.
_VEC_BYTES = (16, 8, 4, 2, 1)


def _permute_instances() -> tuple[str, ...]:
    names = ["moe_raw::routing_pack<256>", "moe_raw::routing_scan<1024>"]
    names += [f"moe_raw::permute_scatter<{vb}>" for vb in _VEC_BYTES]
    for dtype, ctype in CTYPES.items():
        size = torch.empty((), dtype=dtype).element_size()
        for vb in _VEC_BYTES:
            if vb >= size:
                names += [f"moe_raw::gather_reduce<{ctype}, {vb}>", f"moe_raw::unpermute_bwd<{ctype}, {vb}>"]
    return tuple(names)


KERNELS = {"permute": _permute_instances()}

_lock = threading.Lock()
_modules: dict = {}
_functions: dict = {}
_streams: dict = {}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log with real file:line locations."""


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "moe_raw needs CuPy for CUDA tensors: pip install 'moe_raw[cuda13]' (or [cuda12], matching your CUDA)"
        ) from e
    return cupy


def _module(family: str, device_index: int):
    key = (family, device_index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:  # threads racing on the first call compile once
        mod = _modules.get(key)
        if mod is not None:
            return mod
        cupy = _cupy()
        root = importlib.resources.files("moe_raw.kernels")
        src_file = root / f"{family}.cu"
        with importlib.resources.as_file(root) as kernels_dir:
            path = kernels_dir / f"{family}.cu"
            code = f'#line 1 "{path}"\n' + src_file.read_text()
            # Headers are inlined so the cache key (the code) changes when common.cuh does.
            common = (root / "common.cuh").read_text()
            code = code.replace('#include "common.cuh"', f'#line 1 "{kernels_dir / "common.cuh"}"\n{common}\n#line 1 "{path}"')
            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=code, options=("-std=c++17",), name_expressions=KERNELS[family])
                try:
                    mod.compile()
                except cupy.cuda.compiler.CompileException as e:
                    raise KernelCompileError(f"moe_raw: compiling kernels/{family}.cu failed:\n{e}") from e
        _modules[key] = mod
        return mod


def function(family: str, name: str, device_index: int):
    """The compiled kernel ``name`` (one of KERNELS[family]) for a device; cached."""
    key = (family, name, device_index)
    fn = _functions.get(key)
    if fn is None:
        fn = _module(family, device_index).get_function(name)
        _functions[key] = fn
    return fn


def _raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


# torch's private getter skips building a torch.cuda.Stream object (Inductor uses the same call).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream)


def _current_stream(device_index: int):
    raw = _raw_stream(device_index)
    key = (raw, device_index)
    stream = _streams.get(key)
    if stream is None:
        stream = _cupy().cuda.ExternalStream(raw, device_index)
        _streams[key] = stream
    return stream


def ptr(x) -> np.uintp:
    """Device pointer of a torch tensor, a ``__cuda_array_interface__`` object, or None (null)."""
    if x is None:
        return np.uintp(0)
    if isinstance(x, torch.Tensor):
        return np.uintp(x.data_ptr())
    return np.uintp(x.__cuda_array_interface__["data"][0])


def launch(family: str, name: str, device: torch.device, grid: int, block: int, args: tuple, shared_mem: int = 0):
    """Launch kernel ``name`` of ``kernels/<family>.cu`` on torch's current stream of ``device``.

    grid, block: 1-D sizes (grid < 2^31). args: numpy scalars and device pointers (``ptr``), in kernel order.
    Callers return before launching when there is no work (grid == 0).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = function(family, name, index)
    stream = _current_stream(index)
    cupy = _cupy()
    if cupy.cuda.runtime.getDevice() == index:
        fn((grid,), (block,), args, shared_mem=shared_mem, stream=stream)
    else:
        with cupy.cuda.Device(index):
            fn((grid,), (block,), args, shared_mem=shared_mem, stream=stream)
