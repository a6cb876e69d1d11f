"""Which GPUs moe_raw supports, and the checks behind the claim (CPU only).

* ``_launch.check_device`` refuses a GPU older than MIN_COMPUTE_CAPABILITY with a clear error, before any compile,
  on both compile paths (the CUDA C modules and the Numba SwiGLU kernels); a supported GPU passes once and is then
  a set lookup (torch.cuda is monkeypatched: no GPU needed).
* The claim agrees everywhere: _launch.CHECKED_ARCHS, .ci/compile_kernels.sh's ARCHS (nvcc), MIN_COMPUTE_CAPABILITY
  and the README's "Supported GPUs:" paragraph.
* Every kernels/*.cu instantiates under MOE_RAW_NVCC_CHECK exactly the instances _launch.KERNELS compiles at run
  time, so the nvcc check covers all of them.
* The Numba kernels compile with real NVVM to PTX for every claimed architecture, and ptxas assembles each one for
  it (a subprocess without the simulator; skipped where libnvvm is missing). NVRTC: tests/test_kernels_compile.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_raw import _cupy_cache, _launch

pytestmark = pytest.mark.extras  # the README's simulator command runs these (conftest)

S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIN_ARCH = 10 * _launch.MIN_COMPUTE_CAPABILITY[0] + _launch.MIN_COMPUTE_CAPABILITY[1]


# ---------------------------------------------------------------------------------------------------------------
# check_device


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answers for made-up devices {index: (name, (major, minor))}; counts capability queries."""
    gpus: dict = {}
    calls: list = []

    def capability(index=None):
        calls.append(index)
        return gpus[index][1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpus[index][0])
    monkeypatch.setattr(_launch, "_supported_devices", set())
    gpus["calls"] = calls
    return gpus


def test_unsupported_gpu_is_refused_with_its_name_and_capability(fake_gpus):
    fake_gpus[0] = ("Tesla T4", (7, 5))
    message = r"moe_raw needs compute capability >= 8\.0 \(Ampere or newer\); cuda:0 is Tesla T4 \(7\.5\)"
    with pytest.raises(RuntimeError, match=message):
        _launch.check_device(0)
    with pytest.raises(RuntimeError, match="sm_80, sm_86"):  # refused every time, not remembered as checked
        _launch.check_device(0)


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1)])
def test_supported_gpu_passes_once(fake_gpus, cc):
    fake_gpus[1] = ("NVIDIA Something", cc)
    _launch.check_device(1)
    _launch.check_device(1)
    assert fake_gpus["calls"] == [1]  # after the first pass: one set lookup, no torch.cuda call


def test_each_device_is_checked(fake_gpus):
    fake_gpus[0], fake_gpus[1] = ("NVIDIA H100 80GB HBM3", (9, 0)), ("Tesla V100-SXM2-16GB", (7, 0))
    _launch.check_device(0)
    with pytest.raises(RuntimeError, match=r"cuda:1 is Tesla V100-SXM2-16GB \(7\.0\)"):
        _launch.check_device(1)


def test_torch_without_cuda_checks_nothing(fake_gpus, monkeypatch):
    """A CPU-only torch cannot name the GPU (CPU tests drive _module with a stand-in CuPy): no check, no error."""
    fake_gpus[0] = ("Tesla T4", (7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _launch.check_device(0)
    assert fake_gpus["calls"] == [] and _launch._supported_devices == set()


def test_module_compile_refuses_before_compiling(fake_gpus, monkeypatch):
    """The CUDA C path: _module checks before CuPy is touched (a T4 never reaches NVRTC or ptxas)."""
    fake_gpus[7] = ("Tesla T4", (7, 5))
    monkeypatch.setattr(_cupy_cache, "cupy", lambda: pytest.fail("compiled for an unsupported GPU"))
    with pytest.raises(RuntimeError, match="cuda:7 is Tesla T4"):
        _launch._module("permute", 7)
    with pytest.raises(RuntimeError, match="cuda:7 is Tesla T4"):
        _launch.launch("topk", _launch.KERNELS["topk"][0], torch.device("cuda", 7), 1, 256, ())


def test_numba_compile_refuses_before_compiling(fake_gpus, monkeypatch):
    """The Numba path (swiglu._fast_kernel) checks before Numba compiles."""
    fake_gpus[7] = ("Quadro RTX 8000", (7, 5))
    monkeypatch.setattr(GL, "_numba_kernel", lambda spec, index: pytest.fail("compiled for an unsupported GPU"))
    spec = ("fwd", False, True, "bf16", "bf16", "bf16", "f32")
    with pytest.raises(RuntimeError, match=r"cuda:7 is Quadro RTX 8000 \(7\.5\)"):
        GL._fast_kernel(spec, 7)


# ---------------------------------------------------------------------------------------------------------------
# One claim: CHECKED_ARCHS, .ci/compile_kernels.sh, MIN_COMPUTE_CAPABILITY, the README


def _script_archs() -> tuple:
    text = (ROOT / ".ci" / "compile_kernels.sh").read_text()
    found = re.findall(r'^ARCHS="([\d ]+)"\s*$', text, flags=re.M)
    assert len(found) == 1, 'expected one ARCHS="..." line in .ci/compile_kernels.sh'
    return tuple(int(a) for a in found[0].split())


def test_nvcc_script_checks_the_claimed_archs():
    assert _script_archs() == _launch.CHECKED_ARCHS
    assert min(_launch.CHECKED_ARCHS) == MIN_ARCH  # the oldest checked arch is the minimum check_device lets in
    assert list(_launch.CHECKED_ARCHS) == sorted(set(_launch.CHECKED_ARCHS))


def _readme_support_paragraph() -> str | None:
    """The README's paragraph (up to the next blank line) that starts at the line containing "Supported GPUs:"."""
    lines = (ROOT / "README.md").read_text().split("\n")
    for i, line in enumerate(lines):
        if "Supported GPUs:" in line:
            para = [line[line.index("Supported GPUs:") :]]
            for more in lines[i + 1 :]:
                if not more.strip():
                    break
                para.append(more)
            return " ".join(para)
    return None


def test_readme_states_the_checked_support():
    """The README's "Supported GPUs:" paragraph names the minimum compute capability as "8.0" (not merely "8.0x" or
    "18.0") and, where it lists sm_XX architectures, exactly CHECKED_ARCHS."""
    para = _readme_support_paragraph()
    if para is None:
        pytest.skip('README.md has no "Supported GPUs:" line yet (the support statement is still to be written)')
    major, minor = _launch.MIN_COMPUTE_CAPABILITY
    assert re.search(rf"(?<![\d.]){major}\.{minor}(?![\d])", para), f"README does not name {major}.{minor}: {para}"
    listed = {int(a) for a in re.findall(r"\bsm_(\d+)", para)}
    if listed:
        assert listed == set(_launch.CHECKED_ARCHS), f"README lists {sorted(listed)}, CI checks {_launch.CHECKED_ARCHS}"


# ---------------------------------------------------------------------------------------------------------------
# The nvcc check instantiates every instance NVRTC compiles at run time


def _nvcc_instances(path: pathlib.Path) -> set:
    """Kernel instances explicitly instantiated in the file's #ifdef MOE_RAW_NVCC_CHECK block, with its function-like
    macros expanded and its constexpr int constants replaced by their values, as "name<args>" without spaces."""
    text = path.read_text()
    block = text[text.index("#ifdef MOE_RAW_NVCC_CHECK") :]
    block = block[: block.index("#endif")]
    block = re.sub(r"\\\n", " ", block)  # join macro continuation lines
    macros = {}
    for name, params, body in re.findall(r"^#define (\w+)\(([^)]*)\)(.*)$", block, flags=re.M):
        macros[name] = ([p.strip() for p in params.split(",")], body)
    body_lines = []
    for line in block.split("\n"):
        if line.startswith("#") or line.lstrip().startswith("//"):
            continue
        call = re.fullmatch(r"\s*(\w+)\(([^)]*)\)\s*;?\s*", line)
        if call and call.group(1) in macros:
            params, body = macros[call.group(1)]
            args = [a.strip() for a in call.group(2).split(",")]
            assert len(args) == len(params), line
            for p, a in zip(params, args, strict=True):
                body = re.sub(rf"\b{p}\b", a, body)
            line = body
        body_lines.append(line)
    expanded = "\n".join(body_lines)
    consts = dict(re.findall(r"constexpr int (\w+) = (\d+);", text))
    instances = set()
    for name, args in re.findall(r"template __global__ void (\w+)<([^>]*)>\s*\(", expanded):
        args = ",".join(consts.get(a.strip(), a.strip()) for a in args.split(","))
        instances.add(f"{name}<{args}>")
    return instances


@pytest.mark.parametrize("family", sorted(_launch.KERNELS))
def test_nvcc_check_instantiates_every_launched_instance(family):
    wanted = {n.removeprefix("moe_raw::").replace(" ", "") for n in _launch.KERNELS[family]}
    have = _nvcc_instances(ROOT / "kernels" / f"{family}.cu")
    assert wanted - have == set(), f"kernels/{family}.cu lacks MOE_RAW_NVCC_CHECK instantiations"
    assert have - wanted == set(), f"kernels/{family}.cu instantiates instances moe_raw never launches"


def test_every_kernel_file_is_a_family():
    assert {p.stem for p in (ROOT / "kernels").glob("*.cu")} == set(_launch.KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Numba's kernels: PTX for every claimed architecture (real NVVM, no GPU), assembled by ptxas for it

_ENV = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}

_PTX_ARCHS = r"""
import importlib, itertools, os, re, shutil, subprocess, sys, tempfile, time
S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")
archs = [int(a) for a in sys.argv[1:]]
codes = ("f32", "f16", "bf16")
acts = (None, (1.702, 0.0, None), (1.702, 1.0, 7.0), tuple(GC._GEGLU))  # SwiGLU (its own code), Quick-GEGLU,
# clamped SwiGLU, GEGLU (tanh)
specs = []
# every kind (fwd / bwd, weighted or not, 16-byte vector or element) with every activation; the dtype rotates so
# each kind meets all three and each activation all three
for g, (kind, weighted, vec) in enumerate(itertools.product(("fwd", "bwd"), (False, True), (True, False))):
    for a, act in enumerate(acts):
        c = codes[(g + a) % 3]
        specs.append((kind, weighted, vec, c, c, c, c if weighted else "f32") + (() if act is None else (act,)))
specs += [  # element kernels' dtype mixes
    ("fwd", True, False, "bf16", "bf16", "bf16", "f32", acts[1]),  # weights fp32, y bf16
    ("bwd", True, False, "bf16", "f32", "bf16", "f16", acts[2]),  # g fp32, weights fp16
    ("bwd", False, False, "f16", "bf16", "f32", "f32"),  # dy promoted to fp32
]
try:
    GC._ptx(specs[0], (9, 0))
except Exception as e:  # noqa
    if "nvvm" in str(e).lower() or "NVVM" in type(e).__name__:  # NvvmSupportError is an ImportError too
        print("NO_NVVM", type(e).__name__, e); sys.exit(0)
    if isinstance(e, ImportError):  # the job without the GPU extras: no numba-cuda
        print("NO_NUMBA", type(e).__name__, e); sys.exit(0)
    raise
cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
ptxas = shutil.which("ptxas") or (cuda_home + "/bin/ptxas" if os.path.exists(cuda_home + "/bin/ptxas") else None)
try:  # nvJitLink's ptxas comes with the GPU extras (the same CUDA release as their NVVM); a toolkit's ptxas can be
    # older than the PTX NVVM writes ("Unsupported .version")
    from cuda.bindings import nvjitlink
    nvjitlink.version()
except Exception as e:  # noqa
    nvjitlink = None
    print("NO_NVJITLINK", type(e).__name__, e)


def link(ptx, arch):  # nvJitLink's ptxas on ptx for sm_<arch>, warnings as errors: "" or the error log
    opts = [f"-arch=sm_{arch}", "-Xptxas=--warning-as-error"]
    handle = nvjitlink.create(len(opts), opts)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        nvjitlink.complete(handle)
        return ""
    except nvjitlink.nvJitLinkError as e:
        log = bytearray(nvjitlink.get_error_log_size(handle))
        nvjitlink.get_error_log(handle, log)
        return f"{e}: {bytes(log).decode(errors='replace')}"
    finally:
        nvjitlink.destroy(handle)


print("ASSEMBLER", "nvJitLink" if nvjitlink else ptxas)
tmpdir = tempfile.TemporaryDirectory()
tmp = tmpdir.name
for arch in archs:
    t = time.perf_counter()
    procs = []
    assembled = bool(nvjitlink or ptxas)
    for i, spec in enumerate(specs):
        ptx = GC._ptx(spec, (arch // 10, arch % 10))
        assert re.search(rf"^\.target sm_{arch}\b", ptx, flags=re.M), (arch, spec, ptx[:300])
        assert ".entry" in ptx, spec
        if nvjitlink:
            error = link(ptx, arch)
            assert not error, (arch, spec, error)
        elif ptxas:  # assembled while NVVM compiles the next one
            path = os.path.join(tmp, f"{arch}_{i}.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            cmd = [ptxas, f"-arch=sm_{arch}", "--warning-as-error", "-o", os.devnull, path]
            procs.append((spec, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    nvvm_s = time.perf_counter() - t
    for spec, p in procs:
        out = p.communicate()[0]
        if p.returncode != 0 and "Unsupported .version" in out:  # NVVM newer than this ptxas: PTX only
            print("PTXAS_TOO_OLD", out.strip()); ptxas = None; assembled = False; break
        assert p.returncode == 0, (arch, spec, out)
    print("OK", arch, len(specs), "assembled" if assembled else "ptx-only", f"{nvvm_s:.1f}s",
          f"{time.perf_counter() - t:.1f}s")
"""


def _numba_ptx(arch: int):
    """A subprocess (no simulator) for one arch: its line "OK <arch> ..." or the reason nothing compiled.

    One subprocess an arch, so that pytest-xdist's workers share the six (each about 7 s of start-up and 20-40 s of
    NVVM and ptxas on CI's 2 cores). Until 2026-12-07 one subprocess took them all in turn on one worker: 241 s that
    the simulator command waited on."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PTX_ARCHS), str(arch)],
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.parametrize("arch", _launch.CHECKED_ARCHS)
def test_numba_kernels_compile_for_every_claimed_arch(arch):
    """35 gated-activation kernels (fwd / bwd x weighted or not x vector or element x SwiGLU / Quick-GEGLU / clamped
    / GEGLU, fp32 / fp16 / bf16 and dtype mixes) to PTX targeting sm_<arch>, each assembled by ptxas for sm_<arch> with
    warnings as errors (nvJitLink's ptxas, from the GPU extras; else the toolkit's). About 28 s an arch on CI's 2
    cores."""
    if importlib.util.find_spec("numba") is None:  # the job without the extras: no subprocess start for nothing
        pytest.skip("Numba CUDA not installed: cannot compile PTX here (pip install '.[cuda13]')")
    proc = _numba_ptx(arch)
    if "NO_NUMBA" in proc.stdout:
        pytest.skip(f"Numba CUDA not installed: cannot compile PTX here ({proc.stdout.strip()})")
    if "NO_NVVM" in proc.stdout:
        pytest.skip(f"libnvvm not found: cannot compile PTX here ({proc.stdout.strip()})")
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("OK ")]
    mine = [ln for ln in lines if int(ln[1]) == arch]
    assert mine, proc.stdout + proc.stderr
    if mine[0][3] != "assembled":
        pytest.skip(f"PTX for sm_{arch} generated, but no usable ptxas to assemble it ({proc.stdout.strip()})")
