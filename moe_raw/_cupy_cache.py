"""CuPy, imported lazily, and its disk cache's failures turned into a slower success (``moe_raw._launch`` compiles
through it).

CuPy's disk cache (``CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``; cupy/cuda/compiler.py and
_compiler_cache.py in CuPy 14). Each entry is one file, the SHA-1 of the payload followed by the payload; an entry
whose hash does not match (truncated, overwritten) reads as a miss, so CuPy compiles again and replaces it
atomically. What CuPy does not absorb is an OSError: its import creates the directory and fails where that is
impossible (a path under a regular file, a read-only parent), leaving a half-imported ``cupy`` no retry can fix;
and a compile raises when an entry can't be read (a directory in its place) or the new entry can't be written (a
read-only directory or file system). moe_raw turns both into a compile without the disk cache, with one
``RuntimeWarning`` naming the directory: ``_import_cupy`` imports CuPy with a private temporary directory, and
``compile_module`` compiles again with ``CUPY_CACHE_IN_MEMORY=1``. The kernels then work, but every new process
compiles the kernels it uses again (seconds). A read-only directory that already holds the entries still serves them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import warnings


def cupy():
    """The cupy module (imported on first use: ``import moe_raw`` needs no CuPy)."""
    try:
        if "cupy" not in sys.modules:
            _import_cupy()
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "moe_raw needs CuPy for CUDA tensors: pip install 'moe_raw[cuda13]' (or [cuda12], matching your CUDA)"
        ) from e
    return cupy


_import_lock = threading.Lock()
_warned = False


def warn(path: str, error: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"moe_raw: CuPy could not use its kernel cache directory {path!r} (CUPY_CACHE_DIR): {error}. Compiling "
            "without it, so every new process compiles the kernels it uses again (seconds). Point CUPY_CACHE_DIR at a "
            "writable directory to keep them.",
            RuntimeWarning,
            stacklevel=2,
        )


def _import_cupy() -> None:
    """The first import of CuPy. CuPy 14 creates its cache directory at import and a failure there leaves it
    half-imported for good (module docstring), so the directory is made here first; where that fails, CuPy is
    imported with a private temporary directory (removed at exit) and the environment is restored after."""
    with _import_lock:
        if "cupy" in sys.modules:
            return
        path = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
        try:
            if importlib.util.find_spec("cupy") is not None:  # no directory for a CuPy that is not installed
                os.makedirs(path, exist_ok=True)
        except OSError as e:
            warn(path, e)
            tmp = tempfile.mkdtemp(prefix="moe_raw-cupy-cache-")
            atexit.register(shutil.rmtree, tmp, True)
            with env("CUPY_CACHE_DIR", tmp):
                import cupy  # noqa: F401
        else:
            import cupy  # noqa: F401


@contextlib.contextmanager
def env(name: str, value: str):
    """Set one environment variable for a ``with`` block (CuPy reads it at import / compile), then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def compile_module(mod) -> None:
    """mod.compile(), and where CuPy's disk cache can't be read or written (module docstring) once more in memory.
    CuPy memoizes the compiled module per device by source and options, so that one serves every later
    get_function without touching the disk again."""
    try:
        mod.compile()
    except OSError as e:
        warn(os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache"), e)
        with env("CUPY_CACHE_IN_MEMORY", "1"):
            mod.compile()
