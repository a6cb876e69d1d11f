"""NVRTC compiles every kernel family with every template instance the launcher asks for (CPU only: NVRTC needs no
GPU). This catches what nvcc in CI cannot: NVRTC has no libc headers and its own predefined macros."""

import importlib.resources
import os

import pytest

from moe_raw import _launch


def _nvrtc_program(code, name, names):
    compiler = pytest.importorskip("cupy.cuda.compiler", reason="CuPy not installed (pip install '.[cuda13]')")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load libnvrtc means "cannot check here"
        pytest.skip(f"libnvrtc not loadable ({type(e).__name__}); pip install nvidia-cuda-nvrtc")
    return compiler, compiler._NVRTCProgram(code, name, name_expressions=names)


def _options():
    # On a CUDA machine CuPy adds the toolkit headers itself; here the nvcc install provides cuda_bf16.h.
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = [f"-I{cuda_home}/include"] if os.path.isdir(f"{cuda_home}/include") else []
    return (*_launch.NVRTC_OPTIONS, "-arch=compute_90", *include)


@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_nvrtc_compiles_every_instance(family):
    names = list(_launch.KERNELS[family])
    compiler, prog = _nvrtc_program(_launch.kernel_source(family), f"{family}.cu", names)
    ptx, mapping = prog.compile(_options())
    assert len(ptx) > 0
    assert sorted(mapping) == sorted(names)


def test_nvrtc_error_names_file_and_line():
    # kernel_source's #line directives make NVRTC report the real file and line, also past the inlined header.
    marker = "constexpr int kTileTokens"  # a line of permute.cu after the #include
    code = _launch.kernel_source("permute").replace(marker, "undefined_thing x; " + marker, 1)
    bad_line = next(i for i, t in enumerate(code.split("\n")) if "undefined_thing" in t)
    original = (importlib.resources.files("moe_raw.kernels") / "permute.cu").read_text().split("\n")
    src_line = next(i + 1 for i, t in enumerate(original) if t.startswith(marker))
    assert bad_line > src_line  # the header was inlined above it
    compiler, prog = _nvrtc_program(code, "permute.cu", None)
    with pytest.raises(compiler.CompileException, match=rf"permute\.cu\({src_line}\): error"):
        prog.compile(_options())


@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_every_kernel_has_a_signature(family):
    bases = {n.split("<")[0].split("::")[-1] for n in _launch.KERNELS[family]}
    assert bases == set(_launch.SIGNATURES[family])
