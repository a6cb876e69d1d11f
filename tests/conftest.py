"""Shared fixtures and helpers of moe_raw's tests (CPU and GPU).

* ``seed`` (autouse): every test starts from ``torch.manual_seed(0)`` (all devices), so a failure reproduces.
* ``side_stream``: a fresh non-default CUDA stream (skips the test without CUDA).
* ``needs_cuda`` / ``needs_two_gpus``: the skip markers (import them: ``from conftest import needs_cuda``).
* ``DEVICES`` / ``ON_CUDA`` / ``device_cases``: parametrize a check that is the same on every device over the CPU
  (always run) and CUDA (marked ``gpu``, skipped without a device), with the CPU on smaller shapes where needed.
* ``make_routing`` / ``make_probs``: random routing maps and router probabilities. They are drawn on the CPU from
  the seeded global generator and then moved, so a case has the same data on every device.

The markers ``gpu``, ``slow`` and ``extras`` are registered in setup.cfg ([tool:pytest]). ``extras`` marks a check
that the GPU extras (CuPy, Numba) or Numba's CUDA simulator change: the README's simulator command (``-m extras``)
runs only those, since every other test has run in the CPU command already. A test that asks for the ``kernels``
fixture is marked here; a test that skips without the extras and carries neither ``extras`` nor ``gpu`` fails (below).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from unittest import mock

import pytest
import torch

# Under pytest-xdist (the README's `-n auto`: a worker a core) torch's own intra-op threads would oversubscribe the
# cores: on CI's 2 cores test_permute + test_reference + test_quantize took 90 s with torch's default threads a worker
# and 40 s with one (2026-12-07). A worker's results do not depend on it: every CPU check is bit-exact for moves and
# within tolerance for arithmetic, whatever the thread count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROUTING_KINDS = ("topk", "empty_expert", "one_expert", "sparse", "balanced")

# The one CUDA skip marker of the suite (GPU tests also carry the ``gpu`` marker, registered in setup.cfg).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device needed")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (torch.cuda.device_count() >= 2)",
)

# The marks of every CUDA case: skipped without a device, selected by ``-m gpu``.
ON_CUDA = [needs_cuda, pytest.mark.gpu]
# A check that is the same on every device: ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]


def device_cases(cpu_cases, cuda_cases, ids=None):
    """``(device, case)`` params: ``cpu_cases`` on the CPU, ``cuda_cases`` on CUDA (marked ``gpu``).

    For a check that is the same on every device but whose large shapes are too slow for the CPU suite (2 cores in
    CI): give the CPU the small cases and CUDA every case. ``ids`` names a case (the device is put in front)."""
    name = ids if ids is not None else str
    return [pytest.param("cpu", c, id=f"cpu-{name(c)}") for c in cpu_cases] + [
        pytest.param("cuda", c, id=f"cuda-{name(c)}", marks=ON_CUDA) for c in cuda_cases
    ]


@pytest.fixture(autouse=True, scope="session")
def emulated_kernels():
    """MOE_RAW_EMULATE_KERNELS=1: every op on CPU tensors runs the CUDA C kernels on the emulator (tests/cuda_emu)
    instead of its torch twin, through the same launchers a GPU call uses, so the CPU suite checks the kernels (an
    exploratory run: a test of the CPU twin's own traits can fail for that reason alone)."""
    if os.environ.get("MOE_RAW_EMULATE_KERNELS") != "1":
        yield
        return
    import cuda_emu

    from moe_raw import _launch

    if cuda_emu.unavailable():
        raise RuntimeError(f"MOE_RAW_EMULATE_KERNELS=1: {cuda_emu.unavailable()}")
    with cuda_emu.emulated(), mock.patch.object(_launch, "runs_kernels", lambda x: True):
        yield


def pytest_collection_modifyitems(items):
    for item in items:
        if "kernels" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.extras)


# A skip reason that names the extras or the simulator: the test checks something only they bring.
_EXTRAS_SKIP = re.compile(r"numba|cupy|cudasim", re.IGNORECASE)


def _fail_a_skip_for_the_extras(report, why: str) -> None:
    """Turn a skip whose reason names the extras into a failure that says ``why`` (the reason appended)."""
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _EXTRAS_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"{why} (its skip: {reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail a test that skips for want of the extras but is not marked ``extras`` (nor ``gpu``): the simulator
    command deselects it, so no CI job would ever run it."""
    report = (yield).get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("extras") or item.get_closest_marker("gpu"):
        return
    _fail_a_skip_for_the_extras(
        report,
        f"{item.nodeid} skips without the GPU extras but is not marked `extras`: the README's simulator command "
        "(-m extras) would deselect it, so no CI job would run it. Mark it @pytest.mark.extras (or pytestmark in "
        "its module).",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Fail a module that skips as a whole for want of the extras: its ``extras`` mark cannot be read from a module that
    did not import, so the simulator command would deselect its tests. Import the extras in its tests or fixtures."""
    report = (yield).get_result()
    if report.skipped and isinstance(collector, pytest.Module):
        _fail_a_skip_for_the_extras(
            report,
            f"{collector.nodeid} skips as a whole without the GPU extras: the README's simulator command (-m extras) "
            "could not see its tests' mark. Import the extras inside its tests or fixtures.",
        )


def pytest_terminal_summary(terminalreporter):
    emulator = sys.modules.get("cuda_emu")
    if emulator is not None and emulator.launches:
        names = {name for name, *_ in emulator.launches}
        terminalreporter.write_line(
            f"cuda_emu: {len(emulator.launches)} kernel launches emulated ({len(names)} kernel instances)"
        )


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def side_stream():
    """A new CUDA stream that starts after everything already queued on the current stream."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA device needed")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    yield stream
    stream.synchronize()


def _topk_map(num_tokens: int, num_experts: int, k: int) -> torch.Tensor:
    """[T, E] bool: each token routed to exactly k distinct experts, chosen uniformly at random."""
    routing_map = torch.zeros((num_tokens, num_experts), dtype=torch.bool)
    if num_tokens and k:
        choice = torch.rand(num_tokens, num_experts).topk(k, dim=1).indices
        routing_map.scatter_(1, choice, True)
    return routing_map


def make_routing(num_tokens: int, num_experts: int, k: int, device="cpu", kind: str = "topk") -> torch.Tensor:
    """A random bool routing map [T, E] on ``device``.

    kind:
        "topk":         every token routed to exactly K distinct random experts.
        "empty_expert": as "topk" over E - 1 experts; one random expert gets no token (needs K <= E - 1).
        "one_expert":   every token routed to expert 0 only (needs K == 1).
        "sparse":       token t routed to k_t ~ U{0..K} distinct random experts; at least one token (the middle
                        one) is unrouted whenever T >= 2, and on average about T / (K + 1) tokens are.
        "balanced":     token t routed to experts (t K + j) mod E, j < K: every expert gets the same count
                        (within one when E does not divide T K).
    """
    if k > num_experts or k < 0:
        raise ValueError(f"make_routing: need 0 <= K <= E, got K={k}, E={num_experts}")
    T, E, K = num_tokens, num_experts, k
    if kind == "topk":
        routing_map = _topk_map(T, E, K)
    elif kind == "empty_expert":
        if E < 2 or K > E - 1:
            raise ValueError(f"make_routing: 'empty_expert' needs E >= 2 and K <= E - 1, got E={E}, K={K}")
        empty = int(torch.randint(E, ()).item())
        keep = [e for e in range(E) if e != empty]
        routing_map = torch.zeros((T, E), dtype=torch.bool)
        routing_map[:, keep] = _topk_map(T, E - 1, K)
    elif kind == "one_expert":
        if K != 1:
            raise ValueError(f"make_routing: 'one_expert' routes each token to expert 0 only, so K must be 1, got {K}")
        routing_map = torch.zeros((T, E), dtype=torch.bool)
        routing_map[:, 0] = True
    elif kind == "sparse":
        routing_map = _topk_map(T, E, K)
        if T:
            # Keep the first k_t of a random order of the token's K experts.
            k_t = torch.randint(0, K + 1, (T,))
            if T >= 2:
                k_t[T // 2] = 0
            ranks = torch.rand(T, E).masked_fill(~routing_map, 2.0).argsort(dim=1).argsort(dim=1)
            routing_map &= ranks < k_t.unsqueeze(1)
    elif kind == "balanced":
        experts = (torch.arange(T).unsqueeze(1) * K + torch.arange(K).unsqueeze(0)) % E
        routing_map = torch.zeros((T, E), dtype=torch.bool)
        if T and K:
            routing_map.scatter_(1, experts, True)
    else:
        raise ValueError(f"make_routing: unknown kind {kind!r}; expected one of {ROUTING_KINDS}")
    return routing_map.to(device)


def make_probs(routing_map: torch.Tensor, dtype=torch.float32, off_route: float = 0.0) -> torch.Tensor:
    """Router probabilities [T, E] in ``dtype``: positive, summing to 1 over each token's routes, and equal to
    ``off_route`` (0 as the seed's dense probs; NaN to check that nothing reads them) where the map is 0."""
    rm = routing_map.bool().cpu()
    logits = torch.randn(rm.shape).masked_fill(~rm, float("-inf"))
    probs = torch.softmax(logits, dim=1).nan_to_num(0.0)  # unrouted tokens: a row of -inf gives NaN
    probs = torch.where(rm, probs, torch.full_like(probs, off_route))
    return probs.to(dtype).to(routing_map.device)


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis profiles of tests/test_fuzz.py, chosen by the environment variable MOE_RAW_HYPOTHESIS_PROFILE:
#   ci (default)  40 examples per test (fewer for the slow CUDA-simulator test), derandomized: the same examples
#                 every run and no example database, for CPU CI.
#   dev           10 examples per test, derandomized: a quick local pass.
#   gpu           150 examples per test, random each run (--hypothesis-seed=N repeats a run); a failure prints its
#                 @reproduce_failure blob. MOE_RAW_HYPOTHESIS_PROFILE=gpu python -m pytest -m gpu tests/test_fuzz.py
#   gpu-long      1000 examples per test, for an occasional deep run.
# No deadline anywhere: example times vary with the drawn shapes, and the simulator and first-use kernel compiles
# are slow. The autouse ``seed`` fixture above is function-scoped, which hypothesis flags for every @given test; it
# only seeds torch once per test (the fuzz tests draw their data from their own seeded generators), so that check
# is off.

try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is a test extra; without it tests/test_fuzz.py skips itself
    pass
else:
    import os as _os

    _HYPOTHESIS_COMMON = dict(
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    _hypothesis_settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("dev", max_examples=10, derandomize=True, database=None, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("gpu", max_examples=150, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.register_profile("gpu-long", max_examples=1000, **_HYPOTHESIS_COMMON)
    _hypothesis_settings.load_profile(_os.environ.get("MOE_RAW_HYPOTHESIS_PROFILE", "ci"))


# ----------------------------------------------------------------------------------------------------------------
# numba-cuda's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, CPU CI) creates a block's shared arrays without a lock.


_SHARED_LOCK = threading.Lock()


def simulator_shared_memory_lock():
    """Patch numba-cuda's simulator so that ``cuda.shared.array`` is get-or-create under a lock.

    The simulator (numba_cuda 0.30.4, ``simulator/kernelapi.py::FakeCUDAShared.array``) keys a block's shared arrays
    by the calling source line and does ``get``, then ``np.empty`` and a store, without a lock, while the block's
    threads are Python threads. Two threads of block 0 that both miss the key get different arrays, and the weighted
    backward's reduction then sums another array's (uninitialized) partials: a wrong dweights row, rarely (2 of 1500
    launches of the same inputs here; 0 of 3000 with this lock). A simulator race, not moe_raw's: same key, same
    arrays, made once.
    """
    import numpy as np
    from numba.cuda.simulator import kernelapi

    real = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer), or the simulator's error
            return real(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _SHARED_LOCK:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    return mock.patch.object(kernelapi.FakeCUDAShared, "array", array)


@pytest.fixture(autouse=True)
def _simulator_shared_arrays_made_once():
    """Every simulator test runs with shared arrays made under a lock (CI saw a wrong dweights row from the race)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0"):
        yield
        return
    with simulator_shared_memory_lock():
        yield


@pytest.fixture
def kernels(monkeypatch):
    """Run moe_raw's Numba kernels on CPU tensors (CUDA simulator) and record every launch's spec
    (tests/test_glu_kernels.py, tests/test_activations.py). Skips unless NUMBA_ENABLE_CUDASIM=1."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("runs Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1")
    import importlib

    GL = importlib.import_module("moe_raw._kernels.glu_launch")
    monkeypatch.setattr(GL, "_on_kernels", lambda *t: True)
    launches = []
    launch = GL._launch_kernel

    def spy(spec, *args):
        launches.append(spec)
        return launch(spec, *args)

    monkeypatch.setattr(GL, "_launch_kernel", spy)
    # The simulator's block manager polls its threads while holding the GIL; a short switch interval makes each
    # syncthreads of the weighted backward ~10x faster.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield launches
    sys.setswitchinterval(interval)


# ---- helpers shared by test files (import them: from conftest import ...)


def run_on_side_stream(stream, fn, *fresh):
    """(fn(*fresh) on the current stream, fn(*copies) run on ``stream``, where the copies are written behind a long
    sleep): a kernel launched on any other stream than the current one reads zeros, so the two results differ."""
    expected = fn(*fresh)
    copies = [torch.zeros_like(t) for t in fresh]
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        for c, t in zip(copies, fresh, strict=True):
            c.copy_(t)
        got = fn(*copies)
    stream.synchronize()
    return expected, got


def assert_exact(got, expected, what: str) -> None:
    """got equals expected bit for bit (dtype, shape and every entry; floats compared as their bits, so a NaN equals
    the same NaN and -0 differs from 0)."""
    assert got is not None and expected is not None, f"{what}: got {got is not None}, expected {expected is not None}"
    expected = expected.to(got.device)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    a, b = got, expected
    if got.is_floating_point():  # compare the bits: a NaN equals the same NaN, -0 differs from 0
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        a, b = got.contiguous().view(bits), expected.contiguous().view(bits)
        got, expected = (t.float() if t.element_size() == 1 else t for t in (got, expected))  # fp8: no .item()
    if not torch.equal(a, b):
        diff = (a != b).view(a.shape)
        where = diff.nonzero()[:5].tolist()
        first = tuple(where[0]) if where else ()
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {got.numel()} entries differ, first at {where}: "
            f"got {got[first].item() if first else got} expected {expected[first].item() if first else expected}"
        )


def numba_launch(spec, tensors, spans, scalars, n_rows):
    """The same kernel launched by Numba's own dispatcher, on torch's current stream, over the same memory."""
    import numpy as np
    from numba import cuda

    GC = importlib.import_module("moe_raw._kernels.glu_codegen")
    _launch = importlib.import_module("moe_raw._launch")
    arrays = []
    for t, span, (_, np_type) in zip(tensors, spans, GC._layout(spec), strict=True):
        if t is None:
            arrays.append(cuda.device_array(1, dtype=np_type))
            continue
        desc = {"shape": (span,), "typestr": np.dtype(np_type).str, "data": (t.data_ptr(), False), "version": 3}
        arrays.append(cuda.from_cuda_array_interface(desc, owner=t, sync=False))
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    warps = GC.warp_items(spec[0], n_rows, scalars[1])
    GC._dispatcher(spec)[_launch.cdiv(warps, GC._WARPS_PER_BLOCK), GC._BLOCK, stream](*arrays, *scalars)


# ---- the gated activations (tests/test_activations.py, tests/test_glu_kernels.py)

GLU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.to(x.device)).abs().max().item() if x.numel() else 0.0


def assert_close_2x(out, ref64, torch_same, what=""):
    """Flash-attention's rule: |out - ref64| <= 2 |torch_same - ref64| + half an ulp of the output dtype (scaled to
    the output's magnitude: a one-element case can have torch land exactly by luck)."""
    assert out.dtype == torch_same.dtype and out.shape == ref64.shape, what
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * max_err(torch_same, ref64) + (HALF_ULP[out.dtype] + 1e-7) * scale
    err = max_err(out, ref64)
    assert err <= bound, f"{what}: err {err:.3g} > bound {bound:.3g}"


def assert_dw_close(dw, dw64, dw_torch, terms64, what="dweights"):
    """dweights sums F products: the 2x rule, or the worst-case bound of moe_raw's fp32 order (F / 32 terms a lane,
    then a 5-level tree, plus each product's rounding) where that is larger."""
    assert dw.dtype == dw_torch.dtype and dw.shape == dw64.shape, what
    depth = terms64.shape[-1] // 32 + 10
    bound_rows = depth * U32 * terms64.abs().sum(-1, keepdim=True) + HALF_ULP[dw.dtype] * dw64.abs()
    err_rows = (dw.double() - dw64).abs()
    torch_err = max_err(dw_torch, dw64)
    assert bool((err_rows <= torch.clamp(bound_rows, min=2 * torch_err) + 1e-30).all()), (
        f"{what}: err {err_rows.max().item():.3g}, torch err {torch_err:.3g}"
    )


def glu_inputs(n, f, dtype, wdtype=torch.float32, lead=(), device="cpu", scale=2.0):
    """y [*lead, n, 2F] (standard normal times ``scale``), g [*lead, n, F], weights [n, 1] in [0, 1), drawn on the
    CPU (the same values on every device)."""
    y = (torch.randn(*lead, n, 2 * f) * scale).to(dtype).to(device)
    g = torch.randn(*lead, n, f).to(dtype).to(device)
    w = torch.rand(n, 1).to(wdtype).to(device)
    return y, g, w


def run_nvvm_check(code: str, timeout: int = 300):
    """Run ``code`` in a fresh Python without the CUDA simulator (real NVVM compiles, no GPU needed). Skips where
    numba-cuda is not installed or the code prints NO_NVVM (libnvvm missing); returns the CompletedProcess."""
    import subprocess
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if "No module named 'numba'" in proc.stderr:
        pytest.skip("numba-cuda is not installed (it comes with the cuda12 / cuda13 extra)")
    if "NO_NVVM" in proc.stdout:
        pytest.skip("libnvvm not found: cannot compile PTX here")
    return proc
