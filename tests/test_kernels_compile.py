"""NVRTC compiles every kernel family with every template instance the launcher asks for, as CuPy does at run time
(CPU only: NVRTC needs no GPU), for one architecture of each set of ``__CUDA_ARCH__`` branches the kernels have. This
catches what nvcc in CI cannot: NVRTC has no libc headers and its own predefined macros.

NVRTC's part is the front end, so these compile to PTX: sm_90 group by group, as the launcher compiles
(test_nvrtc_compiles_each_group_alone), the other branch sets whole (_BRANCH_ARCHS). ptxas for every claimed
architecture (_launch.CHECKED_ARCHS) is .ci/compile_kernels.sh's (nvcc to SASS, ptxas warnings as errors), and a GPU
run compiles NVRTC's cubins for real. Until 2026-12-07 these tests also made cubins for 80 / 90 / 100 and PTX for 86 /
89 / 120: ptxas was most of that time (on CI's 2 cores the router's three cubins took 57-77 s each), and it repeated
the nvcc step's work."""

import importlib.resources
import io
import os

import pytest

from moe_raw import _launch

pytestmark = pytest.mark.extras  # the README's simulator command runs these (conftest)


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


def _options(arch=90, ptx=False):
    """CuPy's NVRTC options for a device of compute capability ``arch`` (cupy/cuda/compiler.py in CuPy 14:
    _compile_with_cache_cuda adds -ftz=true; _compile_using_nvrtc_no_warning -arch=sm_XX, which makes a cubin, and
    --device-as-default-execution-space). On a CUDA machine CuPy adds the toolkit headers itself; here the nvcc
    install provides cuda_bf16.h."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = [f"-I{cuda_home}/include"] if os.path.isdir(f"{cuda_home}/include") else []
    target = f"-arch=compute_{arch}" if ptx else f"-arch=sm_{arch}"  # compute_XX: PTX to read, no ptxas
    return (*_launch.NVRTC_OPTIONS, "-ftz=true", target, "--device-as-default-execution-space", *include)


# One architecture of each set of __CUDA_ARCH__ branches in kernels/ but sm_90's (compiled group by group below):
# below 9.0 (no bulk copies) and 10.0 and up (also chunks.cu's sm_100 branch). 9.0 has common.cuh's bulk copies and
# programmatic launches.
_BRANCH_ARCHS = (80, 100)


@pytest.mark.parametrize("arch", _BRANCH_ARCHS)
@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_nvrtc_compiles_every_instance(family, arch):
    """Every instance to PTX for sm_<arch> (the front end and that architecture's branches), each entry present,
    with an empty log."""
    _, nvrtc = _nvrtc()
    supported = getattr(nvrtc, "getSupportedArchs", lambda: None)()
    if supported is not None and arch not in supported:
        major, minor = nvrtc.getVersion()
        pytest.skip(f"NVRTC {major}.{minor} cannot target sm_{arch} (sm_100 / sm_120 need NVRTC >= 12.8)")
    names = list(_launch.KERNELS[family])
    _, prog = _nvrtc_program(_launch.kernel_source(family), f"{family}.cu", names, "ptx")
    log = io.StringIO()
    binary, mapping = prog.compile(_options(arch, ptx=True), log)
    ptx = binary.decode() if isinstance(binary, bytes) else binary
    assert f".target sm_{arch}" in ptx, ptx[:400]
    assert all(f".entry {mapping[n]}(" in ptx for n in names), "an instance is missing from the PTX"
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


def _groups(family):
    return sorted({_launch._compile_group(family, n) for n in _launch.KERNELS[family]})


@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_compile_groups_split_each_family(family):
    """The launcher compiles a family in groups (_launch._compile_group): every instance is in exactly one, which
    holds it, and a group is what its members name; the router's are one (V, L) pair's forward and backward,
    quantize's one element type's kernels (the fill alone), the permute family's gathers one group per element
    type."""
    names = _launch.KERNELS[family]
    groups = _groups(family)
    assert sorted(n for g in groups for n in g) == sorted(names)  # a partition
    for n in names:
        assert n in _launch._compile_group(family, n)
        assert all(_launch._compile_group(family, m) == _launch._compile_group(family, n)
                   for m in _launch._compile_group(family, n))  # fmt: skip
    if family == "router":
        assert groups == sorted((f"moe_raw::router_fwd<{v}, {lanes}>", f"moe_raw::router_bwd<{v}, {lanes}>")
                                for v, lanes in _launch.ROUTER_SHAPES)  # fmt: skip
    if family == "quantize":
        assert _launch._compile_group(family, "moe_raw::quantize_warp<__nv_bfloat16>") == tuple(
            f"moe_raw::quantize_{kind}<__nv_bfloat16>" for kind in ("rows", "warp", "grad_rows")
        )
        assert _launch._compile_group(family, "moe_raw::quantize_fill<256>") == ("moe_raw::quantize_fill<256>",)
    if family == "permute":
        g = _launch._compile_group(family, "moe_raw::gather_warp<__nv_bfloat16, 16>")
        assert {_launch.base_name(n) for n in g} == {"gather_reduce", "gather_warp", "unpermute_bwd"}
        assert all("<__nv_bfloat16, " in n for n in g) and len(g) == 14  # 3 kernels x widths 16 ... 2, LONE and QUAD
        assert "moe_raw::permute_scatter<16>" in _launch._compile_group(family, "moe_raw::routing_pack<256>")


@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_nvrtc_compiles_each_group_alone(family):
    """Each group compiles by itself, as the launcher compiles it (to PTX for sm_90 with an empty log: an instance
    that compiled only beside another, e.g. a template another group instantiates, would fail here). The groups
    partition the family, so this is also NVRTC's sm_90 check of every instance."""
    _nvrtc()
    options = _options(90, ptx=True)
    for group in _groups(family):
        _, prog = _nvrtc_program(_launch.kernel_source(family), f"{family}.cu", list(group), method="ptx")
        log = io.StringIO()
        ptx, mapping = prog.compile(options, log)
        assert sorted(mapping) == sorted(group)
        assert log.getvalue().strip("\x00 \n") == "", (group, log.getvalue())


@pytest.mark.parametrize("arch", (80, 90))
def test_nvrtc_compiles_the_permute_probe_kernels(arch):
    """bench.probe_permute's own kernels (the write-only rows; the phased row mover, over common.cuh's bulk-copy
    helpers) compile as its launchers build them, with an empty log, and take parameters of the widths their
    launchers pack: a probe that runs on the GPU only must not find out there that it no longer builds."""
    import re

    from bench import probe_permute as P

    options = _options(arch, ptx=True)
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


def test_first_calls_compile_only_their_groups(monkeypatch):
    """What the launcher compiles at first use (a stand-in CuPy records each module's instances; no GPU): a router
    call compiles its (V, L) pair only, its backward reuses that module, another E compiles another pair; a bf16
    unpermute compiles the bf16 gathers, not the other element types'."""
    import contextlib
    from types import SimpleNamespace

    from moe_raw import _cupy_cache

    modules = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.names = tuple(name_expressions)
            modules.append(self.names)

        def compile(self):
            pass

        def get_function(self, name):
            assert name in self.names, f"{name} is not in the module's instances"  # as CuPy's lookup fails
            return SimpleNamespace(kernel=SimpleNamespace(ptr=1000 + len(modules)))

    fake = SimpleNamespace(RawModule=RawModule, cuda=SimpleNamespace(Device=lambda index: contextlib.nullcontext()))
    monkeypatch.setattr(_cupy_cache, "cupy", lambda: fake)
    monkeypatch.setattr(_launch, "_modules", {})
    monkeypatch.setattr(_launch, "_kernels", {})
    _launch.function("router", "moe_raw::router_fwd<16, 4>", 0)
    _launch.function("router", "moe_raw::router_bwd<16, 4>", 0)
    assert modules == [("moe_raw::router_fwd<16, 4>", "moe_raw::router_bwd<16, 4>")]
    _launch.function("router", "moe_raw::router_fwd<16, 8>", 0)
    assert modules[1] == ("moe_raw::router_fwd<16, 8>", "moe_raw::router_bwd<16, 8>")
    _launch.function("permute", "moe_raw::gather_warp<__nv_bfloat16, 16>", 0)
    _launch.function("permute", "moe_raw::unpermute_bwd<__nv_bfloat16, 8>", 0)
    assert len(modules) == 3 and all("<__nv_bfloat16, " in n for n in modules[2])
    _launch.function("router", "moe_raw::router_fwd<16, 4>", 1)  # another device: its own module
    assert len(modules) == 4 and modules[3] == modules[0]
