"""moe_raw's CUDA C kernels run on the CPU (cuda_emu.h says how and what is not modelled), for the tests.

``emulated()`` is a context manager: inside it, ``moe_raw._launch.launch`` runs each kernel of kernels/*.cu with
the emulator on CPU tensors (their addresses are host memory), through the same launchers, argument packing and
parameter buffer a GPU launch uses: the launchers' ``*_cuda`` functions can be called with CPU tensors and their
results compared with the CPU path / the reference. Each family is compiled once (g++, host code, ~10-60 s) into a
shared library cached under ``$MOE_RAW_EMU_CACHE`` (default ``~/.cache/moe_raw/emu``), keyed by a hash of its
source, so test workers and later runs reuse it.

``unavailable()`` says why it cannot run here (no C++ compiler, no CUDA headers), or None.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading

import torch

from moe_raw import _launch

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.h"
CXX = os.environ.get("CXX", "g++")
# UBSan checks as traps (no runtime library to load): a misaligned uint4 / uint2 access, which faults on the GPU but
# not on x86, a shift past the width, a signed overflow (index arithmetic that should have been 64-bit).
_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-U_FORTIFY_SOURCE",
          "-fsanitize=alignment,shift,signed-integer-overflow", "-fsanitize-undefined-trap-on-error")  # fmt: skip
_lock = threading.Lock()
_libraries: dict = {}  # family -> ctypes library
_handles: dict = {}  # handle -> (library, index in its table)


def cuda_include() -> str | None:
    """A directory holding cuda_bf16.h / cuda_fp8.h (the toolkit's), or None."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    for root in roots:
        if root and (pathlib.Path(root) / "include" / "cuda_fp8.h").is_file():
            return str(pathlib.Path(root) / "include")
    return None


def unavailable() -> str | None:
    if shutil.which(CXX) is None:
        return f"the CUDA emulator needs a C++ compiler ({CXX} not found)"
    if cuda_include() is None:
        return "the CUDA emulator needs the CUDA toolkit's headers (cuda_fp8.h; set CUDA_HOME)"
    return None


_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")


def emulator_source(code: str, names) -> str:
    """CUDA C source ``code`` as host C++ for cuda_emu.h, with a launch table of its kernel instances ``names``
    (C++ names of __global__ functions or template instances, in launch-index order)."""
    code = _EXTERN_SHARED.sub(r"\1* \2 = static_cast<\1*>(::emu::dynamic_shared());", code)
    code = re.sub(r"\b__shared__\b", "static", code)
    call = "return ::emu::launch(&{}, emu_grid, emu_block, emu_smem, emu_params);"
    cases = "\n".join(f"    case {i}: " + call.format(name) for i, name in enumerate(names))
    return f"""#include "{HEADER}"
{code}
#line 1 "cuda_emu launch table"
static std::string emu_dispatch(int emu_index, emu::Dim3 emu_grid, emu::Dim3 emu_block, size_t emu_smem,
                                const unsigned char* emu_params) {{
  switch (emu_index) {{
{cases}
  }}
  return "no kernel " + std::to_string(emu_index);
}}

extern "C" void emu_schedule(int mode) {{ ::emu::schedule() = mode; }}

extern "C" int emu_launch(int index, unsigned gx, unsigned gy, unsigned bx, unsigned long long smem,
                          const unsigned char* params, char* error, int error_len) {{
  const std::string e = emu_dispatch(index, {{gx, gy, 1}}, {{bx, 1, 1}}, smem, params);
  std::snprintf(error, error_len, "%s", e.c_str());
  return e.empty() ? 0 : 1;
}}
"""


def _cache_dir() -> pathlib.Path:
    """$MOE_RAW_EMU_CACHE, else ~/.cache/moe_raw/emu, else (a home that cannot be written) the temp directory's."""
    root = os.environ.get("MOE_RAW_EMU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_raw", "emu")
    for path in (pathlib.Path(root), pathlib.Path(tempfile.gettempdir()) / "moe_raw_emu"):
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise RuntimeError(f"cuda_emu: no writable cache directory ({root} or the temp directory)")


SCHEDULES = ("ascending", "descending", "shuffled")
schedule = "ascending"  # the thread order of every library loaded from now on and, through set_schedule, loaded ones


def set_schedule(order: str) -> None:
    """Resume runnable threads in ``order`` (one of SCHEDULES) in every emulator library, loaded or not."""
    global schedule
    schedule = SCHEDULES[SCHEDULES.index(order)]
    for lib in _loaded:
        lib.emu_schedule(SCHEDULES.index(order))


_loaded: list = []  # every library build() returned


def build(tag: str, code: str, names):
    """The emulator library of CUDA C ``code`` exposing kernels ``names`` (compiled on first use, then cached on
    disk by a hash of everything that goes into it)."""
    source = emulator_source(code, names)
    key = hashlib.sha256((source + HEADER.read_text() + CXX + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{tag}-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = pathlib.Path(tmp) / f"{tag}.cpp"
            src.write_text(source)
            out = pathlib.Path(tmp) / "lib.so"
            cmd = [CXX, *_FLAGS, f"-I{cuda_include()}", str(src), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"cuda_emu: compiling {tag} failed:\n{done.stderr[-6000:]}")
            os.replace(out, target)  # atomic: concurrent builders leave one whole file
    lib = ctypes.CDLL(str(target))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong]
    lib.emu_launch.argtypes += [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.emu_schedule.argtypes = [ctypes.c_int]
    lib.emu_schedule(SCHEDULES.index(schedule))
    _loaded.append(lib)
    return lib


def library(family: str):
    """The emulator library of kernels/<family>.cu with every instance of _launch.KERNELS[family]."""
    lib = _libraries.get(family)
    if lib is None:
        with _lock:
            lib = _libraries.get(family)
            if lib is None:
                lib = _libraries[family] = build(family, _launch.kernel_source(family), _launch.KERNELS[family])
    return lib


def run(lib, index: int, grid, block: int, shared_mem: int, params: int, what: str = "") -> None:
    """Launch kernel ``index`` of an emulator library; ``params``: the address of its packed parameter buffer (as
    cuLaunchKernel reads it). Raises EmulatedKernelError."""
    gx, gy = grid if isinstance(grid, tuple) else (grid, 1)
    error = ctypes.create_string_buffer(1024)
    if lib.emu_launch(index, gx, gy, block, shared_mem, params, error, len(error)):
        raise EmulatedKernelError(f"{what} grid ({gx}, {gy}) block {block} shared {shared_mem}: {error.value.decode()}")


class EmulatedKernelError(RuntimeError):
    """The emulator found an error the hardware would leave undefined (see cuda_emu.h)."""


launches: list = []  # (kernel name, grid, block, shared bytes) of every emulated launch, for tests that check which
overlapped: list = []  # kernel names of the launches made with overlap (programmatic dependent launches)


def _function(family: str, name: str, index: int):
    handle = len(_handles) + 1
    _handles[handle] = (family, name, library(family), _launch.KERNELS[family].index(name))
    kern = _launch.compiled_kernel(handle, _launch.SIGNATURES[family][_launch.base_name(name)])
    _launch._kernels[(family, name, index)] = kern
    return kern


def _launch_kernel(handle, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
    family, name, lib, i = _handles[handle]
    launches.append((name, (gx, gy), bx, smem))
    run(lib, i, (gx, gy), bx, smem, extra + _launch._PARAMS_OFFSET, name)  # the parameters _launch packed


def _launch_kernel_overlapped(handle, *args):
    """An overlapped launch (``_launch.launch(..., overlap=True)``): recorded in ``overlapped``, then run as any
    other (the emulator runs launches one after another, which an overlapped launch's pdl_wait also guarantees)."""
    overlapped.append(_handles[handle][1])
    _launch_kernel(handle, *args)


@contextlib.contextmanager
def emulated(order: str = "ascending"):
    """Inside: every ``moe_raw._launch`` launch runs on the emulator (CPU tensors), threads resumed in ``order``
    (SCHEDULES). Restores everything on exit."""
    saved_order = schedule
    set_schedule(order)
    saved = dict(
        function=_launch.function,
        _launch_kernel=_launch._launch_kernel,
        _get_device=_launch._get_device,
        _raw_stream=_launch._raw_stream,
        _allow_shared_mem=_launch._allow_shared_mem,
        _launch_kernel_overlapped=_launch._launch_kernel_overlapped,
        has_bulk_copy=_launch.has_bulk_copy,
        _kernels=dict(_launch._kernels),
    )
    current_device = torch.cuda.current_device
    try:
        _launch._kernels.clear()
        _launch.function = _function
        _launch._launch_kernel = _launch_kernel
        _launch._get_device = lambda: 0
        _launch._raw_stream = lambda index: 0
        _launch._allow_shared_mem = lambda *args: None
        _launch._launch_kernel_overlapped = _launch_kernel_overlapped
        _launch.has_bulk_copy = lambda device: True  # cuda_emu.h defines MOE_RAW_BULK_COPY; pdl_wait is a no-op
        torch.cuda.current_device = lambda: 0
        yield
    finally:
        set_schedule(saved_order)
        torch.cuda.current_device = current_device
        _launch._kernels.clear()
        _launch._kernels.update(saved.pop("_kernels"))
        for k, v in saved.items():
            setattr(_launch, k, v)
