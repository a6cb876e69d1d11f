"""Reliability: long runs, threads, a second GPU, the compile cache, shared memory at the expert limit.

GPU tests (``@pytest.mark.gpu``, each skipped without CUDA):
* Long: 10,000 autograd round trips of permute -> unpermute, and 10,000 iterations of the SwiGLU family, leave
  ``torch.cuda.memory_allocated()`` exactly where it was after a warm-up, and moe_raw's host caches unchanged.
  (Large: T * K * H > 2^31 elements is ``tests/test_permute.py::test_offsets_past_2_31_elements``, slow.)
* Threads: first calls from 8 Python threads at once, in a fresh process (a subprocess, so every moe_raw cache
  starts empty), compile the CUDA C module once and each Numba kernel once, and all threads get the right answers.
* Second GPU (``torch.cuda.device_count() >= 2``): every op on cuda:1 tensors, with cuda:0 current, gives the right
  answer and runs on cuda:1's current stream.
* Compile cache (subprocesses with ``CUPY_CACHE_DIR`` in a temporary directory): corrupt entries (truncated, random
  bytes, a directory in their place) and a directory that can't be created or written still give right answers:
  CuPy recompiles (a hash mismatch reads as a miss) or moe_raw compiles in memory with one RuntimeWarning.
* E = 4096 (MAX_EXPERTS): the row kernels ask for more than 48 KiB of shared memory and are opted in to it.

CPU tests (CI) of the same machinery: the cache fallbacks with a stand-in CuPy, CuPy's own cache backend on
corrupt entries, the import with a cache directory that can't be made, and the shared-memory opt-in bookkeeping.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import needs_cuda

from moe_raw import _cupy_cache, _launch

pytestmark = pytest.mark.extras  # the README's simulator command runs these (conftest)

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _env(**extra) -> dict:
    """The test's environment for a subprocess, without the simulator or a forced in-memory cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "CUPY_CACHE_IN_MEMORY")}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------------------------
# Long runs: no memory growth


def _host_cache_sizes() -> tuple:
    GL = sys.modules["moe_raw._kernels.glu_launch"]
    return tuple(len(c) for c in (_launch._modules, _launch._kernels, _launch._shared_allowed, GL._compiled, GL._PLANS))


@pytest.mark.parametrize("loop", ["permute_unpermute", "swiglu"])
@pytest.mark.gpu
@needs_cuda
def test_10000_calls_no_memory_growth(loop):
    """After a warm-up (first-use compiles, the allocator's pools), 10,000 more iterations leave the bytes held by
    live tensors exactly as they were: every temporary, autograd graph and cached row map is freed each step. The
    results of the last iteration equal the first's (deterministic kernels)."""
    from conftest import make_probs, make_routing

    import moe_raw

    dev = torch.device("cuda")
    if loop == "permute_unpermute":
        T, H, E, K = 64, 256, 8, 2
        x = torch.randn(T, H, device=dev).to(BF16).requires_grad_()
        rm = make_routing(T, E, K, dev)
        p = make_probs(rm).requires_grad_()
        g = torch.randn(T, H, device=dev).to(BF16)

        def step(i):
            fused = bool(i & 1)
            out, _, idx = moe_raw.permute(x, rm, p, num_out_tokens=T * K, fused=fused)
            y = moe_raw.unpermute(out, idx, (T, H), p, None if fused else rm, fused=fused)
            return (y.detach(), *torch.autograd.grad(y, (x, p), g))

    else:
        n, f = 64, 256
        y = torch.randn(n, 2 * f, device=dev).to(BF16)
        g = torch.randn(n, f, device=dev).to(BF16)
        w = torch.rand(n, 1, device=dev)
        yl, wl = y.clone().requires_grad_(), w.clone().requires_grad_()

        def step(i):
            out = moe_raw.weighted_bias_swiglu_impl(yl, wl)
            grads = torch.autograd.grad(out, (yl, wl), g)
            return (
                moe_raw.swiglu(y), moe_raw.weighted_swiglu(y, w), moe_raw.swiglu_back(g, y),
                *moe_raw.weighted_swiglu_back(g, y, w), out.detach(), *grads,
            )  # fmt: skip

    first = [step(0), step(1)]
    for i in range(100):
        step(i)
    # Garbage that earlier tests left in reference cycles is freed by gc whenever it runs: collect it on both sides
    # of the loop, so the comparison counts only what the loop keeps alive (seen in a full GPU run: +-34,816 bytes
    # from an earlier test's garbage, and 0 with the test alone).
    gc.collect()
    torch.cuda.synchronize()
    allocated, caches = torch.cuda.memory_allocated(), _host_cache_sizes()
    for i in range(10_000):
        step(i)
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated, f"{torch.cuda.memory_allocated() - allocated} bytes more"
    assert _host_cache_sizes() == caches
    for i in (0, 1):
        for a, b in zip(step(i), first[i], strict=True):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Threads: compile once, right answers

_THREADS_SCRIPT = textwrap.dedent(
    """
    import collections, importlib, json, threading
    import torch
    import moe_raw
    from moe_raw import _launch, reference as R

    S = importlib.import_module("moe_raw.activations")
    GC = importlib.import_module("moe_raw._kernels.glu_codegen")
    GL = importlib.import_module("moe_raw._kernels.glu_launch")
    counts = collections.Counter()

    def counted(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key(*args, **kwargs)] += 1
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    # Each is called only where its cache misses, under that cache's lock: one call per module / kernel built. A
    # CuPy module is one compile group of a family (_launch._compile_group): its instance list is the key.
    cp = _launch._cupy_cache.cupy()
    counted(cp, "RawModule", lambda **kw: f"cupy module {kw['name_expressions']}")
    counted(GC, "_pyfunc", lambda spec: f"numba dispatcher {spec}")
    counted(GL, "_numba_kernel", lambda spec, index: f"numba compile {spec} on {index}")

    dev = torch.device("cuda")
    T, H, E, K, n, f = 300, 256, 16, 4, 77, 64
    x = torch.randn(T, H, device=dev)
    scores = torch.rand(T, E, device=dev)
    rm = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, scores.topk(K, 1).indices, True)
    p = torch.rand(T, E, device=dev) * rm
    gx = torch.randn(T, H, device=dev)
    y, g, w = torch.randn(n, 2 * f, device=dev), torch.randn(n, f, device=dev), torch.rand(n, 1, device=dev)
    torch.cuda.synchronize()

    def dispatch():
        res = {}
        for fused in (False, True):
            xl, pl = x.clone().requires_grad_(), p.clone().requires_grad_()
            out, pp, idx = moe_raw.permute(xl, rm, pl, num_out_tokens=T * K, fused=fused)
            yy = moe_raw.unpermute(out, idx, (T, H), pl, None if fused else rm, fused=fused)
            grads = torch.autograd.grad(yy, (xl, pl), gx)
            res[f"permute {fused}"] = (out.detach(), pp.detach(), idx, yy.detach(), *grads)
        return res

    def swiglus():
        yl, wl = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = moe_raw.weighted_bias_swiglu_impl(yl, wl)
        return {"swiglu": (moe_raw.swiglu(y), moe_raw.swiglu_back(g, y), *moe_raw.weighted_swiglu_back(g, y, w),
                           out.detach(), *torch.autograd.grad(out, (yl, wl), g))}

    n_threads = 8
    barrier, results, errors = threading.Barrier(n_threads), [None] * n_threads, []

    def worker(i):
        try:
            barrier.wait()
            first, second = (dispatch, swiglus) if i % 2 else (swiglus, dispatch)
            res = first()
            res.update(second())
            torch.cuda.current_stream().synchronize()
            results[i] = res
        except BaseException as e:
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mismatches = []
    if not errors:
        cpu = lambda t: t.cpu() if t is not None else None
        for fused in (False, True):  # thread 0 against the reference on the CPU
            xc, pc = x.cpu().requires_grad_(), p.cpu().requires_grad_()
            ro, rpp, ridx = R.permute(xc, rm.cpu(), pc, T * K, fused)
            ry = R.unpermute(ro, ridx, (T, H), pc, None if fused else rm.cpu(), fused)
            ref = (ro, rpp, ridx, ry, *torch.autograd.grad(ry, (xc, pc), gx.cpu()))
            for name, a, b in zip("out pp idx y dx dp".split(), results[0][f"permute {fused}"], ref):
                if not torch.allclose(cpu(a).double(), b.detach().double(), rtol=1e-4, atol=1e-4):
                    mismatches.append(f"permute fused={fused} {name} vs reference")
        yc, wc = y.cpu().requires_grad_(), w.cpu().requires_grad_()
        ro = R.weighted_bias_swiglu_impl(yc, wc)
        ref = (R.swiglu(y.cpu()), R.swiglu_back(g.cpu(), y.cpu()), *R.weighted_swiglu_back(g.cpu(), y.cpu(), w.cpu()),
               ro.detach(), *torch.autograd.grad(ro, (yc, wc), g.cpu()))
        for k, (a, b) in enumerate(zip(results[0]["swiglu"], ref)):
            if not torch.allclose(a.cpu(), b, rtol=1e-4, atol=1e-4):
                mismatches.append(f"swiglu output {k} vs reference")
        for i in range(1, n_threads):  # every thread equals thread 0 bit for bit (deterministic kernels)
            for key, vals in results[0].items():
                for k, (a, b) in enumerate(zip(vals, results[i][key])):
                    if not torch.equal(a, b):
                        mismatches.append(f"thread {i} {key} output {k}")
    print("RESULT " + json.dumps({"errors": errors, "mismatches": mismatches, "counts": dict(counts)}))
    """
)


@pytest.mark.gpu
@needs_cuda
def test_first_calls_from_threads_compile_once(tmp_path):
    """8 threads start their first calls together (a barrier), half with permute and half with SwiGLU, in a fresh
    process with an empty CuPy cache (so the NVRTC compile takes seconds and the threads pile up on it)."""
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT], env=_env(CUPY_CACHE_DIR=str(tmp_path / "cache")), cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(s for s in result.stdout.splitlines() if s.startswith("RESULT "))
    report = json.loads(line[len("RESULT ") :])
    assert report["errors"] == [], report["errors"]
    assert report["mismatches"] == [], report["mismatches"]
    counts = report["counts"]
    assert any(k.startswith("cupy module") and "moe_raw::permute_" in k for k in counts), counts
    assert any(k.startswith("numba compile") for k in counts), counts
    assert all(v == 1 for v in counts.values()), f"built more than once: {counts}"


# ----------------------------------------------------------------------------------------------------------------
# A second GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_op_on_the_second_gpu_on_its_current_stream():
    """Inputs on cuda:1 are written on a side stream of cuda:1 after a long sleep; every op then runs with cuda:0
    current and that side stream current on cuda:1. A launch on any other stream (or device) would read the zeros
    the inputs held before, so right answers show each op ran on cuda:1's current stream."""
    import moe_raw

    d1 = torch.device("cuda", 1)
    T, H, E, K, n, f = 300, 512, 16, 4, 77, 256
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=gen)
    rm_new = torch.zeros(T, E, dtype=torch.bool).scatter_(1, scores.topk(K, 1).indices, True)
    new = dict(
        x=torch.randn(T, H, generator=gen), rm=rm_new, p=torch.rand(T, E, generator=gen) * rm_new,
        gx=torch.randn(T, H, generator=gen), y=torch.randn(n, 2 * f, generator=gen),
        g=torch.randn(n, f, generator=gen), w=torch.rand(n, 1, generator=gen),
    )  # fmt: skip

    def run_all(t):
        res = []
        for fused, with_map in ((False, True), (True, False), (False, False)):
            xl, pl = t["x"].clone().requires_grad_(), t["p"].clone().requires_grad_()
            probs = pl if (fused or with_map) else None
            out, pp, idx = moe_raw.permute(xl, t["rm"], pl, num_out_tokens=T * K, fused=fused)
            yy = moe_raw.unpermute(out, idx, (T, H), probs, t["rm"] if with_map else None, fused=fused)
            wrt = (xl, pl) if probs is not None else (xl,)
            res += [out, pp, idx, yy, *torch.autograd.grad(yy, wrt, t["gx"])]
        yl, wl = t["y"].clone().requires_grad_(), t["w"].clone().requires_grad_()
        o = moe_raw.weighted_bias_swiglu_impl(yl, wl)
        res += [moe_raw.swiglu(t["y"]), moe_raw.weighted_swiglu(t["y"], t["w"]), moe_raw.swiglu_back(t["g"], t["y"])]
        res += [*moe_raw.weighted_swiglu_back(t["g"], t["y"], t["w"]), o, *torch.autograd.grad(o, (yl, wl), t["g"])]
        return [r.detach() for r in res]

    torch.cuda.set_device(0)
    run_all({k: v.to(d1) for k, v in new.items()})  # warm-up on cuda:1: compiles, so the timed part only launches
    expected = [r.cpu() for r in run_all({k: v.to("cuda:0") for k, v in new.items()})]
    src = {k: v.to(d1) for k, v in new.items()}
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    torch.cuda.synchronize(d1)
    side = torch.cuda.Stream(device=d1)
    with torch.cuda.stream(side):  # cuda:1 current, its current stream the side stream
        torch.cuda._sleep(200_000_000)  # ~0.1 s: far longer than queuing everything below
        for k in dst:
            dst[k].copy_(src[k])
        with torch.cuda.device(0):  # cuda:0 current; cuda:1's current stream stays the side stream
            got = run_all(dst)
    side.synchronize()
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.device == d1, k
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5, msg=f"output {k}")


# ----------------------------------------------------------------------------------------------------------------
# E = MAX_EXPERTS: more than 48 KiB of shared memory


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.gpu
@needs_cuda
def test_max_experts_opt_in_shared_memory(dtype):
    """E = 4096: unpermute's backward needs 12-16 bytes of shared memory per expert (49-66 KiB), fp64 unpermute 12,
    and permute's scatter with 16 KiB bf16 rows 8 per expert plus its 16 KiB stage: over the 48 KiB a launch gets
    without opting in. Checked against closed forms: y[t] = x[t] * sum_e p[t, e], dx = g * sum_e p, dp[t, e] =
    <g[t], x[t]> where routed."""
    from conftest import make_probs, make_routing

    import moe_raw

    T, E, K = 64, 4096, 8
    H = 8192 if dtype == BF16 else 1024
    dev = torch.device("cuda")
    rm = make_routing(T, E, K, dev)
    pdtype = F64 if dtype == F64 else F32
    x = torch.randn(T, H, device=dev).to(dtype)
    p = make_probs(rm, pdtype)
    g = torch.randn(T, H, device=dev).to(dtype)
    x64, p64, g64 = x.double(), p.double(), g.double()
    psum = p64.sum(1, keepdim=True)
    tol = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for fused in (False, True):
        xl, pl = x.clone().requires_grad_(), p.clone().requires_grad_()
        out, _, idx = moe_raw.permute(xl, rm, pl, num_out_tokens=T * K, fused=fused)
        y = moe_raw.unpermute(out, idx, (T, H), pl, None if fused else rm, fused=fused)
        dx, dp = torch.autograd.grad(y, (xl, pl), g)
        torch.testing.assert_close(y.double(), x64 * psum, **tol)
        torch.testing.assert_close(dx.double(), g64 * psum, **tol)
        dp_ref = (g64 * x64).sum(1, keepdim=True) * rm
        torch.testing.assert_close(dp.double(), dp_ref, rtol=tol["rtol"], atol=tol["atol"] * H**0.5)
    assert _launch._shared_allowed, "no kernel was opted in to more shared memory"


# ----------------------------------------------------------------------------------------------------------------
# Compile cache (GPU): subprocesses with their own CUPY_CACHE_DIR

_CHECK_SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")  # moe_raw's RuntimeWarning reaches stderr
    import torch
    import moe_raw
    from moe_raw import reference as R

    T, H, E, K = 300, 256, 16, 4
    x = torch.randn(T, H, device="cuda")
    top = torch.rand(T, E, device="cuda").topk(K, 1).indices
    rm = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, top, True)
    p = torch.rand(T, E, device="cuda") * rm
    for fused in (False, True):
        xl = x.clone().requires_grad_()
        out, _, idx = moe_raw.permute(xl, rm, p, num_out_tokens=T * K, fused=fused)
        y = moe_raw.unpermute(out, idx, (T, H), p, None if fused else rm, fused=fused)
        (dx,) = torch.autograd.grad(y, xl, torch.ones_like(y))
        ro, _, ri = R.permute(x.cpu(), rm.cpu(), p.cpu(), T * K, fused)
        assert torch.equal(out.detach().cpu(), ro)
        ry = R.unpermute(ro, ri, (T, H), p.cpu(), None if fused else rm.cpu(), fused)
        torch.testing.assert_close(y.detach().cpu(), ry)
        torch.testing.assert_close(dx.cpu(), p.cpu().sum(1, keepdim=True).expand(T, H))
    yy, ww = torch.randn(33, 128, device="cuda"), torch.rand(33, 1, device="cuda")
    torch.testing.assert_close(moe_raw.weighted_swiglu(yy, ww).cpu(), R.weighted_swiglu(yy.cpu(), ww.cpu()))
    print("RESULT OK")
    """
)
_WARNING = "RuntimeWarning: moe_raw: CuPy could not use its kernel cache directory"  # once per warning shown


def _no_file_writes():
    """preexec_fn: any write to a regular file fails with EFBIG, also for root (RLIMIT_FSIZE = 0; SIGXFSZ ignored,
    which exec keeps, so the write returns an error instead of killing the process). Pipes are not limited."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def _check_run(cache_dir, preexec_fn=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", _CHECK_SCRIPT], env=_env(CUPY_CACHE_DIR=str(cache_dir)), cwd=REPO,
        capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn,
    )  # fmt: skip
    assert result.returncode == 0 and "RESULT OK" in result.stdout, result.stderr[-4000:]
    return result


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.suffix == ".cubin")


def _valid_entry(path: Path) -> bool:
    """CuPy's on-disk format: the SHA-1 (hex) of the payload, then the payload."""
    data = path.read_bytes()
    return len(data) > 40 and data[:40] == hashlib.sha1(data[40:]).hexdigest().encode()


@pytest.mark.parametrize("damage", ["truncate", "random_bytes", "directory"])
@pytest.mark.gpu
@needs_cuda
def test_corrupt_cache_entries(tmp_path, damage):
    """A first process fills the cache; every entry is then damaged and a second process must still be right.
    Truncated or overwritten entries fail CuPy's hash check: a miss, recompiled and replaced (a valid entry again,
    no warning). A directory in an entry's place makes CuPy's read raise: moe_raw compiles in memory and warns."""
    cache = tmp_path / "cache"
    _check_run(cache)
    entries = _entries(cache)
    assert entries and all(_valid_entry(p) for p in entries)
    for p in entries:
        size = p.stat().st_size
        if damage == "truncate":
            p.write_bytes(p.read_bytes()[: size // 3])
        elif damage == "random_bytes":
            p.write_bytes(os.urandom(size))
        else:
            p.unlink()
            p.mkdir()
    second = _check_run(cache)
    if damage == "directory":
        assert _WARNING in second.stderr, second.stderr[-4000:]
    else:
        assert _WARNING not in second.stderr
        assert all(_valid_entry(p) for p in entries), "CuPy should have replaced the damaged entries"


@pytest.mark.gpu
@needs_cuda
def test_cache_dir_that_cannot_be_created(tmp_path):
    """CUPY_CACHE_DIR under a regular file: no one can create it, root included. CuPy's import would fail for good;
    moe_raw imports it with a private temporary directory, warns once naming the directory, and works."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = _check_run(blocker / "cache")
    assert result.stderr.count(_WARNING) == 1, result.stderr[-4000:]
    assert str(blocker / "cache") in result.stderr


@pytest.mark.parametrize("how", ["chmod", "rlimit"])
@pytest.mark.gpu
@needs_cuda
def test_cache_dir_that_cannot_be_written(tmp_path, how):
    """An existing directory that can't be written: chmod 0o555 (not for root, who writes through it) or no file
    writes at all (RLIMIT_FSIZE = 0, root included). With no entry there CuPy's write raises after the compile:
    moe_raw compiles in memory, warns once and works. With the entry already there (a read-only, pre-filled cache)
    it is read, with no warning."""
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root writes through chmod 0o555; the rlimit variant covers root")
    cache = tmp_path / "cache"
    cache.mkdir()

    @contextlib.contextmanager
    def unwritable():
        if how == "chmod":
            cache.chmod(0o555)
            try:
                yield None
            finally:
                cache.chmod(0o755)
        else:
            yield _no_file_writes

    with unwritable() as preexec:
        first = _check_run(cache, preexec)
    assert first.stderr.count(_WARNING) == 1, first.stderr[-4000:]
    assert not _entries(cache)
    _check_run(cache)  # fill it
    assert _entries(cache)
    with unwritable() as preexec:
        second = _check_run(cache, preexec)
    assert _WARNING not in second.stderr, second.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------------------
# CPU (CI): the same machinery without a GPU


class _FakeCupy:
    """Just enough of CuPy for ``_launch._module``: RawModule.compile raises ``error`` unless CuPy would compile
    in memory (CUPY_CACHE_IN_MEMORY=1), or always with ``always``."""

    def __init__(self, error: OSError, always: bool = False):
        self.compiles = []
        fake = self

        class RawModule:
            def __init__(self, code, options, name_expressions):
                self.code = code

            def compile(self):
                in_memory = os.environ.get("CUPY_CACHE_IN_MEMORY") == "1"
                fake.compiles.append(in_memory)
                if always or not in_memory:
                    raise error

        self.RawModule = RawModule
        self.cuda = SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            compiler=SimpleNamespace(CompileException=type("CompileException", (Exception,), {})),
        )


@pytest.fixture
def fresh_launcher(monkeypatch):
    monkeypatch.setattr(_launch, "_modules", {})
    monkeypatch.setattr(_cupy_cache, "_warned", False)
    monkeypatch.setenv("CUPY_CACHE_DIR", "/ro/cache")
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)


def test_unwritable_cache_compiles_in_memory_once_warned(monkeypatch, fresh_launcher):
    fake = _FakeCupy(PermissionError(13, "Permission denied", "/ro/cache/tmpabc"))
    monkeypatch.setattr(_cupy_cache, "cupy", lambda: fake)
    with pytest.warns(RuntimeWarning, match=r"'/ro/cache' \(CUPY_CACHE_DIR\): .*Permission denied") as caught:
        m0 = _launch._module("permute", 0)
        m1 = _launch._module("permute", 1)
    assert len(caught) == 1  # one warning per process
    assert fake.compiles == [False, True, False, True]  # each device: the disk attempt, then in memory
    assert "CUPY_CACHE_IN_MEMORY" not in os.environ  # restored
    assert _launch._module("permute", 0) is m0 and _launch._module("permute", 1) is m1 and m0 is not m1
    assert fake.compiles == [False, True, False, True]  # cached: no more compiles


def test_in_memory_failure_propagates(monkeypatch, fresh_launcher):
    """An OSError that is not about the cache (it fails in memory too) reaches the caller; nothing is cached."""
    fake = _FakeCupy(OSError(5, "Input/output error"), always=True)
    monkeypatch.setattr(_cupy_cache, "cupy", lambda: fake)
    with pytest.warns(RuntimeWarning), pytest.raises(OSError, match="Input/output error"):
        _launch._module("permute", 0)
    assert fake.compiles == [False, True]
    assert ("permute", 0) not in _launch._modules
    assert "CUPY_CACHE_IN_MEMORY" not in os.environ


def test_cupy_cache_backend_reads_corrupt_entries_as_misses(tmp_path):
    """What the GPU tests rely on, in CuPy's own cache backend (CuPy 14): a damaged entry reads as a miss (None), so
    CuPy compiles again and replaces it; a directory in an entry's place raises the OSError moe_raw handles."""
    cache_mod = pytest.importorskip("cupy.cuda._compiler_cache", reason="CuPy >= 14's cache backend")
    backend = cache_mod.DiskKernelCacheBackend(str(tmp_path))
    payload = os.urandom(1000)
    backend.save("k.cubin", payload, "source")
    entry = tmp_path / "k.cubin"
    assert backend.load("k.cubin") == payload and _valid_entry(entry)
    valid = entry.read_bytes()
    for damaged in (b"", valid[:10], valid[:-1], os.urandom(len(valid)), valid[:-1] + bytes([valid[-1] ^ 1])):
        entry.write_bytes(damaged)
        assert backend.load("k.cubin") is None
    backend.save("k.cubin", payload, "source")  # replaced atomically
    assert backend.load("k.cubin") == payload
    entry.unlink()
    entry.mkdir()
    with pytest.raises(OSError):
        backend.load("k.cubin")


_IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, os, warnings
    from moe_raw import _cupy_cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cupy = _cupy_cache.cupy()
    from cupy.cuda import compiler
    backend = getattr(compiler, "_kernel_cache_backend", None)
    cache_dir = getattr(backend, "_cache_dir", None)
    print("RESULT " + json.dumps({
        "cache_dir": cache_dir, "exists": bool(cache_dir) and os.path.isdir(cache_dir),
        "env": os.environ.get("CUPY_CACHE_DIR"), "warnings": [str(w.message) for w in caught],
    }))
    """
)


def test_cupy_import_with_a_cache_dir_that_cannot_be_created(tmp_path):
    """CPU (CuPy imports without a GPU): CUPY_CACHE_DIR under a regular file. CuPy 14's import would raise
    NotADirectoryError and stay half-imported; moe_raw imports it with a private temporary directory (removed at
    exit), warns once naming the directory, and leaves CUPY_CACHE_DIR as it was."""
    pytest.importorskip("cupy")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = str(blocker / "cache")
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT], env=_env(CUPY_CACHE_DIR=bad), cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(s for s in result.stdout.splitlines() if s.startswith("RESULT "))[len("RESULT ") :])
    if report["cache_dir"] is None:
        pytest.skip("CuPy < 14: no cache backend at import (the directory is made at compile time)")
    assert Path(report["cache_dir"]).name.startswith("moe_raw-cupy-cache-") and report["exists"]
    assert not Path(report["cache_dir"]).exists(), "the private directory should be removed at exit"
    assert report["env"] == bad
    assert len(report["warnings"]) == 1 and bad in report["warnings"][0] and "CUPY_CACHE_DIR" in report["warnings"][0]


def test_shared_memory_opt_in_bookkeeping(monkeypatch):
    """launch() opts a function in only above 46 KiB, once per larger size, and never lowers it."""
    calls = []
    driver = SimpleNamespace(
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8,
        funcSetAttribute=lambda fn, attr, value: calls.append((fn, attr, value)),
    )
    fake = SimpleNamespace(cuda=SimpleNamespace(driver=driver, Device=lambda index: contextlib.nullcontext()))
    monkeypatch.setattr(_cupy_cache, "cupy", lambda: fake)
    monkeypatch.setattr(_launch, "_shared_allowed", {})
    monkeypatch.setattr(_launch, "launch_compiled", lambda *args: None)
    monkeypatch.setitem(_launch._kernels, ("permute", "k", 0), (1234, None, 0, None))
    dev = torch.device("cuda", 0)
    for shared in (1024, 46 * 1024, 50_000, 50_000, 60_000, 55_000):
        _launch.launch("permute", "k", dev, 1, 128, (), shared_mem=shared)
    assert calls == [(1234, 8, 50_000), (1234, 8, 60_000)]
    assert _launch._shared_allowed == {1234: 60_000}
