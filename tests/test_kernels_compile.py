"""NVRTC compiles every kernel family with every template instance the launcher asks for, to SASS for every
architecture moe_raw claims (_launch.CHECKED_ARCHS), as CuPy does at run time (CPU only: NVRTC needs no GPU). This
catches what nvcc in CI cannot: NVRTC has no libc headers and its own predefined macros. About 5.5 s an arch on
CI's 2 cores (permute.cu is most of it)."""

import importlib.resources
import io
import os

import pytest

from moe_raw import _launch


def _nvrtc():
    """cupy.cuda.compiler and the loaded libnvrtc, or skip."""
    compiler = pytest.importorskip("cupy.cuda.compiler", reason="CuPy not installed (pip install '.[cuda13]')")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load libnvrtc means "cannot check here"
        pytest.skip(f"libnvrtc not loadable ({type(e).__name__}: {e}); pip install nvidia-cuda-nvrtc")
    return compiler, nvrtc


def _nvrtc_program(code, name, names, method="cubin"):
    compiler, _ = _nvrtc()
    return compiler, compiler._NVRTCProgram(code, name, name_expressions=names, method=method)


def _options(arch=90):
    """CuPy's NVRTC options for a device of compute capability ``arch`` (cupy/cuda/compiler.py in CuPy 14:
    _compile_with_cache_cuda adds -ftz=true; _compile_using_nvrtc_no_warning -arch=sm_XX, which makes a cubin, and
    --device-as-default-execution-space). On a CUDA machine CuPy adds the toolkit headers itself; here the nvcc
    install provides cuda_bf16.h."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = [f"-I{cuda_home}/include"] if os.path.isdir(f"{cuda_home}/include") else []
    return (*_launch.NVRTC_OPTIONS, "-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space", *include)


@pytest.mark.parametrize("arch", _launch.CHECKED_ARCHS)
@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_nvrtc_compiles_every_instance(family, arch):
    """Every instance to a cubin for sm_<arch> (front end, the __CUDA_ARCH__ branches, ptxas), with an empty log:
    a ptxas warning (sm_75's is "Value of threads per SM ... is out of range") fails too."""
    _, nvrtc = _nvrtc()
    supported = getattr(nvrtc, "getSupportedArchs", lambda: None)()
    if supported is not None and arch not in supported:
        major, minor = nvrtc.getVersion()
        pytest.skip(f"NVRTC {major}.{minor} cannot target sm_{arch} (sm_100 / sm_120 need NVRTC >= 12.8)")
    names = list(_launch.KERNELS[family])
    compiler, prog = _nvrtc_program(_launch.kernel_source(family), f"{family}.cu", names)
    log = io.StringIO()
    cubin, mapping = prog.compile(_options(arch), log)
    assert cubin[:4] == b"\x7fELF"  # a cubin, not PTX
    assert sorted(mapping) == sorted(names)
    assert log.getvalue().strip("\x00 \n") == "", log.getvalue()


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
    bases = {_launch.base_name(n) for n in _launch.KERNELS[family]}
    assert bases == set(_launch.SIGNATURES[family])


@pytest.mark.parametrize("arch", (80, 90))
def test_nvrtc_compiles_the_permute_probe_kernels(arch):
    """bench.probe_permute's own kernels (the write-only rows; the phased row mover, over common.cuh's bulk-copy
    helpers) compile as its launchers build them, with an empty log, and take parameters of the widths their
    launchers pack: a probe that runs on the GPU only must not find out there that it no longer builds."""
    import re

    from bench import probe_permute as P

    options = tuple(o.replace(f"-arch=sm_{arch}", f"-arch=compute_{arch}") for o in _options(arch))  # PTX to read
    width = {"P": "u64", "q": "u64", "i": "u32"}
    for code, name, signature in ((P._WRITE_ONLY_SRC, "write_only_rows", P._WRITE_ONLY_SIGNATURE),
                                  (P._phased_source(), "phased_rows", P._PHASED_SIGNATURE)):  # fmt: skip
        _, prog = _nvrtc_program(code, f"{name}.cu", None, method="ptx")
        log = io.StringIO()
        ptx, _ = prog.compile(options, log)
        assert log.getvalue().strip("\x00 \n") == "", log.getvalue()
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        params = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S).group(1)
        assert re.findall(r"\.param \.(u64|u32)", params) == [width[c] for c in signature], (name, params)
