"""``moe_raw.permute`` / ``moe_raw.unpermute`` against ``moe_raw.reference``, on the CPU (the torch twins of
moe_raw/_cpu.py, run in CI) and on CUDA (kernels/permute.cu): the same checks on both, through the same autograd
Functions.

Rules (the project's test rules):
* Pure moves are bit-exact (``torch.equal``): permuted tokens, permuted probs, sorted_indices, the fused row map,
  the probs gradient of permute, the rows gradient of unpermute without probs, and every fused-vs-unfused pair.
* Arithmetic (sums of rows, products with probs, dot products) follows flash-attention's rule against the reference
  run on ``.double()`` inputs: ``err(kernel) <= 2 * err(reference in the same dtype) + atol``, where atol is a few
  fp32 roundings of the largest term (the kernels accumulate in fp32), so fp32 outputs get a tight stated bound.
* Outputs cannot be poisoned from outside, so on CUDA ``_poison`` fills freed allocator blocks of the outputs' sizes
  with 0xFF bytes (NaN / -1) right before each call (the caching allocator hands them back), and the forward grid
  runs every case twice on fresh data: a row the kernel never writes shows up as NaN or as the first trial's value.
* The reference runs on the tensors' device: on the GPU for speed, but on the CPU whenever T or N is 0 (it then
  index_selects row 0 of an empty tensor, which the CPU tolerates and torch's CUDA kernel would trap as a
  device-side assert, killing the session).
* Its fp64 row-map unpermute loops over experts (30 s on 2 CPU cores at T=1027, H=7168, E=256), so the CPU runs
  the small cases of each list (``_cases``) or the same check at a smaller shape (``_shape``), keeping the CPU
  suite fast; CUDA runs every case at the original sizes. The sweeps and the > 2^31-element test are CUDA only.
* GPU only: side streams, CUDA-graph capture and replay, no host sync, 64-bit offsets, CPU / CUDA mismatches.

Run on a CUDA machine: ``python -m pytest -q -m gpu tests/test_permute.py`` (add ``-m "gpu and not slow"`` to skip
the sweep and the > 2^31-element test); ``python -m pytest -q tests/test_permute.py`` anywhere runs the CPU cases.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES, ON_CUDA, assert_exact, device_cases, make_probs, make_routing, needs_cuda

import moe_raw
from moe_raw import reference as R

CPU = torch.device("cpu")
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
EPS32 = torch.finfo(F32).eps
_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64", None: "none"}


def _case_id(case) -> str:
    dtype, T, H, E, K, kind, pdtype = case
    return f"{_NAMES[dtype]}-T{T}-H{H}-E{E}-K{K}-{kind}-p{_NAMES[pdtype]}"


# (dtype, T, H, E, K, routing kind, probs dtype). Every value of the design's grid appears: dtype {fp32, fp16,
# bf16}, T {1, 7, 1027}, H {8, 1000, 2048, 7168} plus odd H {13, 1001} (row bytes not a multiple of 4 or 16: the
# 2- and 4-byte vector paths), E {1, 8, 64, 256}, K {1, 2, 8}, probs {none, fp32, bf16}, with K = E, an empty expert,
# all tokens on one expert and unrouted tokens ("sparse"). 1027 = 4 * 256 + 3 tokens: several map tiles, ragged tail.
PERMUTE_CASES = [
    (F32, 1, 8, 1, 1, "topk", None),
    (F16, 1, 13, 8, 2, "topk", F32),
    (BF16, 1, 7168, 256, 8, "topk", BF16),
    (F32, 1, 1001, 64, 8, "topk", BF16),
    (F16, 1, 2048, 8, 1, "one_expert", BF16),
    (BF16, 1, 1000, 64, 2, "sparse", None),
    (F32, 1, 8, 256, 8, "sparse", F32),
    (F32, 7, 1000, 8, 8, "topk", F32),  # K = E
    (F16, 7, 1001, 64, 2, "sparse", BF16),
    (BF16, 7, 8, 256, 1, "topk", None),
    (BF16, 7, 2048, 1, 1, "topk", F32),  # E = 1
    (F32, 7, 13, 64, 8, "empty_expert", None),
    (BF16, 7, 1000, 8, 1, "one_expert", None),
    (F32, 7, 2048, 256, 2, "empty_expert", F32),
    (F16, 7, 7168, 256, 8, "sparse", F32),
    (F32, 7, 7168, 8, 2, "balanced", BF16),
    (F16, 7, 8, 1, 1, "one_expert", F32),
    (BF16, 7, 13, 8, 2, "topk", BF16),
    (F16, 1027, 8, 8, 2, "topk", None),
    (BF16, 1027, 13, 8, 8, "topk", F32),  # K = E
    (F32, 1027, 1000, 64, 8, "topk", BF16),
    (F16, 1027, 1001, 256, 8, "topk", F32),
    (BF16, 1027, 2048, 64, 2, "empty_expert", BF16),
    (BF16, 1027, 7168, 256, 8, "topk", BF16),  # DeepSeek-V3's E, K, H
    (F32, 1027, 2048, 8, 1, "one_expert", F32),
    (F16, 1027, 7168, 8, 2, "sparse", None),
    (BF16, 1027, 1001, 1, 1, "topk", None),  # E = 1
    (F32, 1027, 13, 256, 1, "sparse", BF16),
    (F16, 1027, 2048, 256, 1, "one_expert", BF16),
    (F32, 1027, 7168, 64, 2, "topk", None),
    (BF16, 1027, 8, 64, 8, "sparse", F32),
    (F16, 1027, 1000, 8, 2, "empty_expert", F32),
    (BF16, 1027, 1000, 256, 2, "topk", None),
    (BF16, 1027, 2048, 8, 8, "balanced", None),
    (F32, 1027, 1001, 8, 8, "sparse", F32),
    (F16, 1027, 13, 64, 1, "topk", None),
    (F32, 1027, 8, 256, 8, "empty_expert", BF16),
    (BF16, 1027, 7168, 64, 1, "sparse", F32),
    (F32, 1027, 1000, 1, 1, "topk", BF16),
    (F16, 1027, 2048, 64, 8, "topk", BF16),
    # Off-grid E: a 16-expert tail after a full 32-expert group, and a group count that is not a power of 2.
    (BF16, 1027, 1000, 48, 8, "topk", F32),
    (F32, 300, 13, 96, 2, "sparse", None),
]

UNPERMUTE_CASES = [
    (F32, 1, 8, 1, 1, "topk", None),
    (BF16, 1, 7168, 256, 8, "topk", BF16),
    (F16, 7, 13, 8, 2, "sparse", F32),
    (F32, 7, 1000, 8, 8, "topk", F32),  # K = E
    (BF16, 7, 1001, 64, 2, "empty_expert", None),
    (F16, 7, 2048, 1, 1, "topk", BF16),  # E = 1
    (F32, 7, 7168, 256, 8, "sparse", None),
    (BF16, 1027, 8, 8, 2, "topk", F32),
    (F32, 1027, 13, 64, 8, "sparse", None),
    (F16, 1027, 1000, 256, 8, "topk", F32),
    (BF16, 1027, 1001, 8, 1, "one_expert", BF16),
    (F32, 1027, 2048, 64, 2, "empty_expert", BF16),
    (BF16, 1027, 7168, 256, 8, "topk", F32),
    (F16, 1027, 7168, 8, 2, "balanced", None),
    (BF16, 1027, 2048, 64, 8, "topk", None),
    (F32, 1027, 1001, 256, 1, "topk", F32),
    (F16, 1027, 8, 64, 1, "sparse", BF16),
    (BF16, 1027, 13, 1, 1, "topk", F32),
]

GRAD_CASES = [
    (BF16, 1027, 1000, 64, 8, "topk", F32),
    (F16, 7, 13, 8, 2, "sparse", BF16),
    (F32, 1027, 2048, 256, 8, "empty_expert", F32),
    (BF16, 1027, 7168, 8, 2, "topk", BF16),
    (F32, 1, 8, 1, 1, "topk", F32),
    (F16, 1027, 1001, 64, 1, "one_expert", F32),
    (BF16, 7, 2048, 8, 8, "topk", BF16),  # K = E
    (F32, 1027, 13, 8, 2, "sparse", BF16),
]


# The CPU runs the cases of a list whose reference is cheap there, by a cost of T H max(E, 8) (the fp64 unpermute is
# O(E T H) on the CPU: up to 70 s a case at T=1027, H=7168, E=256 on 2 cores); CUDA runs every case. Permute alone
# (no unpermute) affords the larger FORWARD_BUDGET: every case up to H = 1001.
_CPU_BUDGET = 2_100_000
_FORWARD_BUDGET = 1027 * 1001 * 256


def _cases(cases, cpu_extra=(), budget=_CPU_BUDGET):
    """(device, case) params: every case on CUDA; on the CPU the ones within ``budget`` and ``cpu_extra`` (smaller
    stand-ins for the large ones)."""
    cpu = [c for c in cases if c[1] * c[2] * max(c[3], 8) <= budget]
    return device_cases(cpu + list(cpu_extra), cases, ids=_case_id)


def _shape(device, cuda_shape, cpu_shape):
    """A test's sizes: the original ones on CUDA, smaller ones for the same check on the CPU (see the docstring)."""
    return cuda_shape if device == "cuda" else cpu_shape


def _sweep_cases():
    """The full cross product of dtype, T, H, E, K (K <= E); probs and routing kind cycle along it."""
    cases = []
    pcycle = itertools.cycle([None, F32, BF16, F32])
    kcycle = itertools.cycle(["topk", "sparse", "topk"])
    for dtype, T, H, E, K in itertools.product(
        (F32, F16, BF16), (1, 7, 1027), (8, 13, 1000, 1001, 2048, 7168), (1, 8, 64, 256), (1, 2, 8)
    ):
        if K <= E:
            cases.append((dtype, T, H, E, K, next(kcycle), next(pcycle)))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def _randn(shape, dtype, device) -> torch.Tensor:
    """Standard normal data drawn on the CPU (same values on every device), rounded to dtype."""
    return torch.randn(shape).to(dtype).to(device)


def _case(device, dtype, T, H, E, K, kind, pdtype, off_route=0.0):
    rm = make_routing(T, E, K, device, kind)
    x = _randn((T, H), dtype, device)
    p = make_probs(rm, pdtype, off_route) if pdtype is not None else None
    return x, rm, p


def _rdev(device, *sizes) -> torch.device:
    """Where the reference runs: the CPU when a size is 0 (see the module docstring), else the tensors' device."""
    return CPU if min(sizes) == 0 else device


def _to(t, device, dtype=None):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def _poison(device, *tensors_or_nbytes) -> None:
    """On CUDA, fill freed allocator blocks of these byte sizes with 0xFF, so outputs allocated next start as garbage
    (the CPU allocator hands back no such blocks)."""
    if device.type != "cuda":
        return
    sizes = [t if isinstance(t, int) else t.numel() * t.element_size() for t in tensors_or_nbytes if t is not None]
    blocks = [torch.full((max(n, 1),), 0xFF, dtype=torch.uint8, device=device) for n in sizes]
    del blocks


def _close(got, ref64, ref_same, what: str, atol: float) -> None:
    """flash-attention's rule: |kernel - ref64| <= 2 |torch in the same dtype - ref64| + atol (max over entries)."""
    assert got.dtype == ref_same.dtype, f"{what}: dtype {got.dtype} != {ref_same.dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel() == 0:
        return
    ref64 = ref64.to(got.device, F64)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got.double() - ref64).abs().max().item()
    err_torch = (ref_same.to(got.device).double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + atol, (
        f"{what}: max |kernel - fp64 ref| = {err:.3g} > 2 x torch's {err_torch:.3g} + atol {atol:.3g}"
    )


def _kept(row_map) -> int:
    """Leading permuted rows holding a routed or padding token (row_map[T, 0])."""
    return int(row_map[-1, 0])


def _rows_per_token(idx, num_tokens) -> int:
    return int(torch.bincount(idx.long(), minlength=max(num_tokens, 1)).max()) if idx.numel() else 0


def _grad_like(t, kind="contiguous"):
    """An upstream gradient shaped like t, with the layout `kind` (values random unless kind == "sum")."""
    shape, dtype, dev = tuple(t.shape), t.dtype, t.device
    if kind == "contiguous":
        return _randn(shape, dtype, dev)
    if kind == "sum":  # what out.sum().backward() passes: ones, stride 0 everywhere
        return torch.ones((), dtype=dtype, device=dev).expand(shape)
    if len(shape) == 1:
        n = shape[0]
        if kind == "row_broadcast":
            return _randn((), dtype, dev).expand(n)
        if kind == "transposed":
            return _randn((2 * n,), dtype, dev)[::2]
        if kind == "row_strided":
            return _randn((3 * n + 1,), dtype, dev)[1::3]
    else:
        n, h = shape
        if kind == "row_broadcast":  # stride (0, 1): every row the same
            return _randn((1, h), dtype, dev).expand(n, h)
        if kind == "transposed":  # stride (1, n): column-major
            return _randn((h, n), dtype, dev).T
        if kind == "row_strided":  # stride (h + 3, 1): rows not 16-byte aligned
            return _randn((n, h + 3), dtype, dev)[:, :h]
    raise ValueError(kind)


def _grad(leaf, needed):
    """leaf.grad; zeros where autograd left it None although it was needed (the reference with no rows: its
    output does not depend on the input at all)."""
    if not needed:
        return leaf.grad
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _backward(outputs, grads, kind):
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o is not None and o.requires_grad]
    outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
    if not outputs:  # e.g. the reference with no rows: nothing depends on the inputs
        return
    if kind == "sum":
        torch.autograd.backward([o.sum() for o in outputs])
    else:
        torch.autograd.backward(outputs, grads)


# ----------------------------------------------------------------------------------------------------------------
# Checkers shared by the tests. Each returns what later checks need.


def _check_permute(x, rm, p, n_out=None, dp=False, what=""):
    """permute(fused=False) and permute(fused=True) vs the reference, bit for bit. Returns the kernel's
    (permuted, permuted_probs, sorted_indices, row_map)."""
    T = x.shape[0]
    rdev = _rdev(x.device, T, n_out if n_out is not None else 1, x.shape[1] if T else 1)
    ref_out, ref_pp, ref_idx = R.permute(_to(x, rdev), _to(rm, rdev), _to(p, rdev), n_out, False, dp)
    ref_map, n_rows = R.build_row_map(_to(rm, rdev), n_out, dp)
    assert ref_out.shape[0] == n_rows
    results = {}
    for fused in (False, True):
        tag = f"{what} fused={fused}"
        _poison(x.device, ref_out, ref_pp, ref_map if fused else ref_idx)
        out, pp, index = moe_raw.permute(x, rm, p, n_out, fused, dp)
        assert_exact(out, ref_out, f"{tag} permuted tokens")
        if p is None:
            assert pp is None, f"{tag}: permuted_probs must be None without probs"
        else:
            assert_exact(pp, ref_pp, f"{tag} permuted_probs")
        assert_exact(index, ref_map if fused else ref_idx, f"{tag} {'row map' if fused else 'sorted_indices'}")
        results[fused] = (out, pp, index)
    if x.dtype.is_floating_point and x.element_size() > 1:
        # With a tensor that needs grad, permute runs inside its autograd Function: same outputs.
        got = moe_raw.permute(x.detach().requires_grad_(), rm, p, n_out, True, dp)
        for a, b, name in zip(got, results[True], ("permuted", "permuted_probs", "row map"), strict=True):
            if b is not None:
                assert_exact(a.detach(), b, f"{what} permute under autograd: {name}")
    out, pp, idx = results[False]
    return out, pp, idx, results[True][2]


def _unpermute_paths(y, rm, p, idx, row_map, dp):
    """Every way to call unpermute on rows y: name -> thunk."""
    T, H = rm.shape[0], y.shape[1]
    paths = {
        "fused": lambda: moe_raw.unpermute(y, row_map, (T, H), p, fused=True, drop_and_pad=dp),
        "map": lambda: moe_raw.unpermute(y, idx, (T, H), p, routing_map=rm, drop_and_pad=dp),
    }
    if p is None:
        paths["csr"] = lambda: moe_raw.unpermute(y, idx, (T, H), drop_and_pad=dp)
    return paths


def _check_unpermute(y, rm, p, idx, row_map, dp=False, what=""):
    """Every unpermute path on rows y vs the fp64 reference (2x rule), and the paths against each other bitwise."""
    T, H = rm.shape[0], y.shape[1]
    rdev = _rdev(y.device, T, y.shape[0])
    ref64 = R.unpermute(_to(y, rdev, F64), _to(idx, rdev), (T, H), _to(p, rdev, F64), _to(rm, rdev), False, dp)
    ref_same = R.unpermute(_to(y, rdev), _to(idx, rdev), (T, H), _to(p, rdev), _to(rm, rdev), False, dp)
    terms = max(_rows_per_token(idx, T), 1)
    scale = y.abs().max().item() if y.numel() else 0.0
    atol = 2 * terms * EPS32 * scale
    outs = {}
    for name, run in _unpermute_paths(y, rm, p, idx, row_map, dp).items():
        _poison(y.device, T * H * y.element_size())
        outs[name] = run()
        _close(outs[name], ref64, ref_same, f"{what} unpermute[{name}]", atol)
        if p is None and terms == 1:  # at most one row per token: a pure move
            assert_exact(outs[name], ref64.to(y.dtype), f"{what} unpermute[{name}] (one row per token)")
    for name, out in outs.items():
        assert_exact(out, outs["fused"], f"{what} unpermute[{name}] vs unpermute[fused]")
    # With rows that need grad, unpermute runs inside its autograd Function: same output.
    grad_out = moe_raw.unpermute(y.detach().requires_grad_(), row_map, (T, H), p, fused=True, drop_and_pad=dp)
    assert_exact(grad_out.detach(), outs["fused"], f"{what} unpermute under autograd")
    return outs


def _permute_grads(fn, x, rm, p, n_out, dp, fused, g_out, g_pp, kind="contiguous", need=("x", "p")):
    xl = x.detach().clone().requires_grad_("x" in need)
    pl = None if p is None else p.detach().clone().requires_grad_("p" in need)
    out, pp, _ = fn(xl, rm, pl, n_out, fused, dp)
    _backward([out, pp], [g_out, g_pp], kind)
    return _grad(xl, "x" in need), (_grad(pl, "p" in need) if pl is not None else None)


def _check_permute_backward(x, rm, p, n_out=None, dp=False, kind="contiguous", need=("x", "p"), what=""):
    """Permute's gradients (fused and not) vs reference autograd on fp64 copies."""
    T = x.shape[0]
    out, pp, idx = moe_raw.permute(x, rm, p, n_out, False, dp)
    g_out = _grad_like(out, kind)
    g_pp = _grad_like(pp, kind) if pp is not None else None
    rdev = _rdev(x.device, T, out.shape[0])
    ref = {}
    for name, dt in (("64", F64), ("same", None)):
        ref[name] = _permute_grads(
            R.permute, _to(x, rdev, dt), _to(rm, rdev), _to(p, rdev, dt), n_out, dp, False,
            _to(g_out, rdev, dt), _to(g_pp, rdev, dt), kind, need,
        )  # fmt: skip
    grads = {}
    for fused in (False, True):
        tag = f"{what} permute backward fused={fused} grads={kind}"
        gx, gp = _permute_grads(moe_raw.permute, x, rm, p, n_out, dp, fused, g_out, g_pp, kind, need)
        if "x" in need:
            terms = max(_rows_per_token(idx, T), 1)
            atol = 2 * terms * EPS32 * (g_out.abs().max().item() if g_out.numel() else 0.0)
            _close(gx, ref["64"][0], ref["same"][0], f"{tag} d tokens", atol)
        else:
            assert gx is None
        if p is not None and "p" in need:
            assert_exact(gp, ref["64"][1].to(p.dtype), f"{tag} d probs")  # a pure move of g_pp
            assert (gp[~rm.bool()] == 0).all(), f"{tag}: probs grad must be exactly 0 where the map is 0"
        grads[fused] = (gx, gp)
    for a, b, name in zip(grads[False], grads[True], ("d tokens", "d probs"), strict=True):
        if a is not None:
            assert_exact(b, a, f"{what} permute backward {name}: fused vs unfused")
    return grads[False]


def _unpermute_grads(run, y, p, g, kind, need):
    yl = y.detach().clone().requires_grad_("y" in need)
    pl = None if p is None else p.detach().clone().requires_grad_("p" in need)
    out = run(yl, pl)
    _backward([out], [g], kind)
    return _grad(yl, "y" in need), (_grad(pl, "p" in need) if pl is not None else None)


def _check_unpermute_backward(y, rm, p, idx, row_map, dp=False, kind="contiguous", need=("y", "p"), what=""):
    """unpermute's gradients on every path vs reference autograd on fp64 copies."""
    T, H = rm.shape[0], y.shape[1]
    N = y.shape[0]
    g = _grad_like(torch.empty((T, H), dtype=y.dtype, device=y.device), kind)
    rdev = _rdev(y.device, T, N)
    ref = {}
    for name, dt in (("64", F64), ("same", None)):
        ref[name] = _unpermute_grads(
            lambda yl, pl: R.unpermute(yl, _to(idx, rdev), (T, H), pl, _to(rm, rdev), False, dp),
            _to(y, rdev, dt), _to(p, rdev, dt), _to(g, rdev, dt), kind, need,
        )  # fmt: skip
    kept = _kept(row_map)
    paths = {
        "fused": lambda yl, pl: moe_raw.unpermute(yl, row_map, (T, H), pl, fused=True, drop_and_pad=dp),
        "map": lambda yl, pl: moe_raw.unpermute(yl, idx, (T, H), pl, routing_map=rm, drop_and_pad=dp),
    }
    if p is None:
        paths["csr"] = lambda yl, pl: moe_raw.unpermute(yl, idx, (T, H), drop_and_pad=dp)
    g_scale = g.abs().max().item() if g.numel() else 0.0
    results = {}
    for path, run in paths.items():
        tag = f"{what} unpermute[{path}] backward grads={kind}"
        gy, gp = _unpermute_grads(run, y, p, g, kind, need)
        if "y" in need:
            # Spare rows (num_out_tokens above the routed count) are in no token's row list: their gradient is 0,
            # except where the index is all there is (csr: the seed's scatter_add sums them into token 0, index 0,
            # so they take token 0's gradient).
            if p is None:
                assert_exact(gy[:kept], ref["64"][0][:kept].to(y.dtype), f"{tag} d rows (a copy of the token's grad)")
                if path == "csr":
                    spare = g[0].to(y.dtype).expand(N - kept, H) if T else gy.new_zeros((N - kept, H))
                    assert_exact(gy[kept:], spare, f"{tag} spare d rows (token 0's grad)")
                else:
                    assert (gy[kept:] == 0).all(), f"{tag}: spare rows' gradient must be 0"
            else:
                _close(gy, ref["64"][0], ref["same"][0], f"{tag} d rows", 2 * EPS32 * g_scale)
                assert (gy[kept:] == 0).all(), f"{tag}: spare rows' gradient must be 0"
        if p is not None and "p" in need:
            # dprobs[t, e] = dot(g[t], y[row]): a length-H fp32 reduction; atol bounds its rounding error.
            dot_scale = (
                (g.double().abs().index_select(0, idx.long()) * y.double().abs()).sum(1).max().item() if N else 0
            )
            _close(gp, ref["64"][1], ref["same"][1], f"{tag} d probs", 16 * EPS32 * dot_scale)
            assert (gp[~rm.bool()] == 0).all(), f"{tag}: probs grad must be exactly 0 where the map is 0"
            dropped = rm.bool() & (row_map[:T] == -1)
            assert (gp[dropped] == 0).all(), f"{tag}: probs grad must be exactly 0 for dropped pairs"
        results[path] = (gy, gp)
    if p is not None and "y" in need:
        assert_exact(results["map"][0], results["fused"][0], f"{what} unpermute backward d rows: map vs fused")
    if p is not None and "p" in need:
        assert_exact(results["map"][1], results["fused"][1], f"{what} unpermute backward d probs: map vs fused")
    return results


def _check_round_trip(x, rm, p, n_out=None, dp=False, what="", grads=True):
    """permute exact; unpermute of random expert rows on every path; both backward passes."""
    out, pp, idx, row_map = _check_permute(x, rm, p, n_out, dp, what)
    y = _randn(tuple(out.shape), x.dtype, x.device)
    y[_kept(row_map) :] = 0  # spare rows as permute leaves them
    _check_unpermute(y, rm, p, idx, row_map, dp, what)
    if grads:
        _check_permute_backward(x, rm, p, n_out, dp, what=what)
        _check_unpermute_backward(y, rm, p, idx, row_map, dp, what=what)
        if p is not None:
            _check_unpermute_backward(y, rm, None, idx, row_map, dp, what=what + " (no probs)")
    return out, pp, idx, row_map


# ----------------------------------------------------------------------------------------------------------------
# Forward.


@pytest.mark.parametrize("device,case", _cases(PERMUTE_CASES, budget=_FORWARD_BUDGET))
def test_permute_forward_bit_exact(device, case):
    for trial in range(2):  # fresh map and data: a row left unwritten would still hold trial 0's values
        x, rm, p = _case(device, *case)
        _check_permute(x, rm, p, what=f"{_case_id(case)} trial {trial}")


# The sweeps are CUDA only: hundreds of cases up to H = 7168, hours of fp64 reference on the CPU.
@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c), marks=ON_CUDA) for c in _sweep_cases()])
def test_permute_forward_sweep(case):
    x, rm, p = _case("cuda", *case)
    _check_permute(x, rm, p, what=_case_id(case))
    _check_permute(x, rm, p, n_out=int(rm.sum()) + 5, what=_case_id(case) + " spare rows")


@pytest.mark.parametrize("device,case", _cases(UNPERMUTE_CASES, [(BF16, 259, 40, 32, 8, "topk", F32)]))
def test_unpermute_forward(device, case):
    dtype, T, H, E, K, kind, pdtype = case
    x, rm, p = _case(device, *case)
    _, _, idx = moe_raw.permute(x, rm)
    _, _, row_map = moe_raw.permute(x, rm, fused=True)
    assert_exact(row_map, R.build_row_map(rm)[0], "row map")
    y = _randn((idx.numel(), H), dtype, device)  # the experts' output
    _check_unpermute(y, rm, p, idx, row_map, what=_case_id(case))
    if p is not None:
        _check_unpermute(y, rm, None, idx, row_map, what=_case_id(case) + " no probs")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=_case_id(c), marks=ON_CUDA)
        for c in _sweep_cases()
        if c[1] == 1027 and c[2] in (13, 1000, 7168)
    ],
)
def test_round_trip_sweep(case):
    x, rm, p = _case("cuda", *case)
    _check_round_trip(x, rm, p, what=_case_id(case))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_arbitrary_sorted_indices(device, dtype, index_dtype):
    """fused=False without routing_map: any token id list (repeats, unused tokens), as the seed's scatter_add."""
    T, H, N = _shape(device, (1027, 1000, 3000), (300, 64, 900))
    idx = torch.randint(0, T - 100, (N,)).to(index_dtype).to(device)  # the last 100 tokens get no row
    y = _randn((N, H), dtype, device)
    out = moe_raw.unpermute(y, idx, (T, H))
    ref64 = R.unpermute(y.double(), idx.long(), (T, H))
    ref_same = R.unpermute(y, idx.long(), (T, H))
    atol = 2 * _rows_per_token(idx, T) * EPS32 * y.abs().max().item()
    _close(out, ref64, ref_same, "unpermute(csr)", atol)
    assert (out[T - 100 :] == 0).all()
    g = _randn((T, H), dtype, device)
    yl = y.clone().requires_grad_()
    moe_raw.unpermute(yl, idx, (T, H)).backward(g)
    assert_exact(yl.grad, g[idx.long()], "d rows")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_row_map_reused_across_calls(device):
    """A fused map made by one permute call (other tokens, dtype and H) serves another call's rows."""
    T, E, K, H = _shape(device, (1027, 64, 8, 1000), (259, 16, 4, 40))
    rm = make_routing(T, E, K, device, "sparse")
    p = make_probs(rm, F32)
    _, _, map_a = moe_raw.permute(_randn((T, 64), F32, device), rm, fused=True)
    x = _randn((T, H), BF16, device)
    perm, _, map_b = moe_raw.permute(x, rm, p, fused=True)
    assert_exact(map_a, map_b, "row map of another call")
    y = _randn(tuple(perm.shape), BF16, device)
    out_a = moe_raw.unpermute(y, map_a, (T, H), p, fused=True)
    out_b = moe_raw.unpermute(y, map_b, (T, H), p, fused=True)
    assert_exact(out_a, out_b, "unpermute with the other call's map")
    _, _, idx = moe_raw.permute(x, rm)
    _check_unpermute(y, rm, p, idx, map_a, what="map of another call")


# ----------------------------------------------------------------------------------------------------------------
# num_out_tokens and drop_and_pad.

NUM_OUT_CASES = [
    (BF16, 1027, 1000, 64, 8, "topk", F32),
    (F16, 7, 13, 8, 2, "sparse", BF16),
    (F32, 1027, 2048, 256, 2, "empty_expert", None),
]


@pytest.mark.parametrize("mode", ["equal", "smaller", "larger", "zero"])
@pytest.mark.parametrize(
    "device,case",
    _cases(NUM_OUT_CASES, [(BF16, 259, 40, 16, 8, "topk", F32), (F32, 131, 24, 32, 2, "empty_expert", None)]),
)
def test_num_out_tokens(device, case, mode):
    dtype, T, H, E, K, kind, pdtype = case
    x, rm, p = _case(device, *case)
    routed = int(rm.sum())
    n_out = {"equal": routed, "smaller": routed * 2 // 3, "larger": routed + 45, "zero": 0}[mode]
    out, pp, idx, row_map = _check_round_trip(x, rm, p, n_out, what=f"{_case_id(case)} N={n_out}")
    assert out.shape == (n_out, H)
    kept = min(routed, n_out)
    assert _kept(row_map) == kept
    assert int((row_map[:T] >= 0).sum()) == kept, "routed pairs past num_out_tokens must be marked -1"
    if mode == "equal":  # bit-identical to num_out_tokens=None
        out0, pp0, idx0 = moe_raw.permute(x, rm, p)
        assert_exact(out, out0, "permuted (N given vs None)")
        assert_exact(idx, idx0, "sorted_indices (N given vs None)")
        if p is not None:
            assert_exact(pp, pp0, "permuted_probs (N given vs None)")
        assert_exact(row_map, moe_raw.permute(x, rm, p, fused=True)[2], "row map (N given vs None)")
    if mode == "larger":  # spare rows: zero, prob 0, index 0
        assert (out[kept:] == 0).all() and (idx[kept:] == 0).all()
        if p is not None:
            assert (pp[kept:] == 0).all()
    if p is not None and n_out > kept:
        # Rows the map does not name are never read: NaN there must not reach any output (fused and map paths).
        y = _randn((n_out, H), dtype, device)
        y_nan = y.clone()
        y[kept:] = 0
        y_nan[kept:] = float("nan")
        for name, run in _unpermute_paths(y, rm, p, idx, row_map, False).items():
            clean = run()
            dirty = _unpermute_paths(y_nan, rm, p, idx, row_map, False)[name]()
            assert_exact(dirty, clean, f"unpermute[{name}] with NaN in the spare rows")
        dirty_np = moe_raw.unpermute(y_nan, row_map, (T, H), fused=True)
        assert_exact(
            dirty_np, moe_raw.unpermute(y, row_map, (T, H), fused=True), "fused unpermute, no probs, NaN spare rows"
        )


def _capacity_for(mode, counts, T, E):
    median = int(counts.float().median())
    if mode == "less":
        return max(1, median // 2) * E
    if mode == "equal":
        return int(counts.max()) * E
    if mode == "greater":
        return (int(counts.max()) + 3) * E
    if mode == "over_T":  # capacity = min(N // E, T) = T
        return (T + 5) * E
    if mode == "not_multiple":  # N % E != 0: E * (N // E) rows
        return max(1, median) * E + E - 1
    raise ValueError(mode)


DROP_AND_PAD_CASES = [
    (BF16, 1024, 1000, 8, 2, "balanced", F32),  # every expert has exactly T K / E = 256 tokens
    (F16, 7, 13, 8, 2, "sparse", BF16),
    (F32, 1027, 2048, 64, 8, "topk", None),
    (BF16, 1027, 1001, 64, 2, "empty_expert", BF16),
]
DROP_AND_PAD_CPU = [  # the large cases' stand-ins on the CPU
    (BF16, 256, 40, 8, 2, "balanced", F32),  # 64 tokens an expert
    (F32, 259, 24, 16, 8, "topk", None),
    (BF16, 259, 13, 16, 2, "empty_expert", BF16),
]


@pytest.mark.parametrize("mode", ["less", "equal", "greater", "over_T", "not_multiple"])
@pytest.mark.parametrize("device,case", _cases(DROP_AND_PAD_CASES, DROP_AND_PAD_CPU))
def test_drop_and_pad(device, case, mode):
    dtype, T, H, E, K, kind, pdtype = case
    x, rm, p = _case(device, *case)
    counts = rm.sum(0).cpu()
    n_out = _capacity_for(mode, counts, T, E)
    capacity = min(n_out // E, T)
    out, pp, idx, row_map = _check_round_trip(x, rm, p, n_out, dp=True, what=f"{_case_id(case)} N={n_out}")
    assert out.shape == (E * capacity, H)
    assert _kept(row_map) == E * capacity
    # Per expert: min(count, C) routed rows, the rest padding (prob 0).
    body = row_map[:T].cpu()
    routed_rows = (body >= 0).sum(0)
    padded_rows = (body <= -2).sum(0)
    assert torch.equal(routed_rows, counts.clamp(max=capacity).to(routed_rows.dtype))
    assert torch.equal(routed_rows + padded_rows, torch.full_like(routed_rows, capacity))
    if p is not None:
        routed_flag = torch.zeros(E * capacity, dtype=torch.bool)
        routed_flag[body[body >= 0].long()] = True
        assert (pp.cpu()[~routed_flag] == 0).all(), "padding rows must carry prob 0"


# ----------------------------------------------------------------------------------------------------------------
# Autograd.


@pytest.mark.parametrize(
    "device,case", _cases(GRAD_CASES, [(BF16, 259, 40, 16, 8, "topk", F32), (F32, 131, 24, 32, 8, "empty_expert", F32)])
)
def test_backward_vs_fp64_reference(device, case):
    x, rm, p = _case(device, *case)
    _check_round_trip(x, rm, p, what=_case_id(case))


@pytest.mark.parametrize("kind", ["sum", "row_broadcast", "transposed", "row_strided"])
@pytest.mark.parametrize(
    "device,case",
    _cases(
        [(BF16, 1027, 1000, 64, 8, "topk", F32), (F32, 7, 13, 8, 2, "sparse", F32)],
        [(BF16, 259, 40, 16, 8, "topk", F32)],
    ),
)
def test_backward_noncontiguous_grads(device, case, kind):
    x, rm, p = _case(device, *case)
    _check_permute_backward(x, rm, p, kind=kind, what=_case_id(case))
    _, _, idx = moe_raw.permute(x, rm)
    _, _, row_map = moe_raw.permute(x, rm, fused=True)
    y = _randn((idx.numel(), x.shape[1]), x.dtype, device)
    _check_unpermute_backward(y, rm, p, idx, row_map, kind=kind, what=_case_id(case))
    _check_unpermute_backward(y, rm, None, idx, row_map, kind=kind, what=_case_id(case) + " no probs")


@pytest.mark.parametrize("need", [("x",), ("p",)], ids=["tokens_only", "probs_only"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_one_input_requires_grad(device, need):
    x, rm, p = _case(device, BF16, *_shape(device, (1027, 1000, 64), (259, 40, 16)), 8, "sparse", F32)
    _check_permute_backward(x, rm, p, need=need)
    _, _, idx = moe_raw.permute(x, rm)
    _, _, row_map = moe_raw.permute(x, rm, fused=True)
    y = _randn((idx.numel(), x.shape[1]), x.dtype, device)
    _check_unpermute_backward(y, rm, p, idx, row_map, need=("y",) if need == ("x",) else ("p",))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", ["plain", "dropped", "spare", "drop_and_pad"])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_probs_off_route_never_read(device, layout, fused):
    """NaN in probs wherever the map is 0: no NaN in any output or gradient, and probs.grad is 0 there."""
    T, H, E, K = _shape(device, (1027, 1000, 64, 8), (259, 40, 16, 8))
    rm = make_routing(T, E, K, device, "sparse")
    p_nan = make_probs(rm, F32, off_route=float("nan"))
    x = _randn((T, H), BF16, device)
    routed = int(rm.sum())
    n_out, dp = {"plain": (None, False), "dropped": (routed // 2, False), "spare": (routed + 40, False),
                 "drop_and_pad": (8 * E, True)}[layout]  # fmt: skip
    xl, pl = x.clone().requires_grad_(), p_nan.clone().requires_grad_()
    perm, pp, index = moe_raw.permute(xl, rm, pl, n_out, fused, dp)
    assert not pp.isnan().any(), "permuted_probs read probs off the map"
    h = perm * pp.unsqueeze(1).to(perm.dtype)  # an "expert" that uses the permuted probs
    out = moe_raw.unpermute(h, index, (T, H), pl, None if fused else rm, fused, dp)
    assert not out.isnan().any(), "unpermute read probs off the map"
    g = _randn((T, H), BF16, device)
    out.backward(g)
    assert not xl.grad.isnan().any()
    assert (pl.grad[~rm] == 0).all(), "probs grad must be exactly 0 (and not NaN) where the map is 0"
    assert pl.grad.isfinite().all()
    # Same results as with clean (zero off-route) probs.
    xc, pc = x.clone().requires_grad_(), p_nan.nan_to_num(0.0).requires_grad_()
    perm_c, pp_c, index_c = moe_raw.permute(xc, rm, pc, n_out, fused, dp)
    out_c = moe_raw.unpermute(
        perm_c * pp_c.unsqueeze(1).to(perm_c.dtype), index_c, (T, H), pc, None if fused else rm, fused, dp
    )
    out_c.backward(g)
    assert_exact(out, out_c, "out (NaN vs clean probs)")
    assert_exact(xl.grad, xc.grad, "d tokens (NaN vs clean probs)")
    assert_exact(pl.grad, pc.grad, "d probs (NaN vs clean probs)")


GRADCHECK_LAYOUTS = ["plain", "dropped", "spare", "drop_and_pad"]


def _tiny(device, layout):
    """T=5, E=4, K=2, H=3 in fp64 with one unrouted token."""
    T, E, K, H = 5, 4, 2, 3
    rm = make_routing(T, E, K, device, "topk")
    rm[2] = False
    routed = int(rm.sum())
    n_out, dp = {"plain": (None, False), "dropped": (routed - 3, False), "spare": (routed + 2, False),
                 "drop_and_pad": (2 * E, True)}[layout]  # fmt: skip
    x = _randn((T, H), F64, device).requires_grad_()
    p = make_probs(rm, F64).requires_grad_()
    return T, H, rm, x, p, n_out, dp


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", GRADCHECK_LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_permute(device, layout, fused):
    T, H, rm, x, p, n_out, dp = _tiny(device, layout)

    def f(tokens, probs):
        out, pp, _ = moe_raw.permute(tokens, rm, probs, n_out, fused, dp)
        return out, pp

    assert torch.autograd.gradcheck(f, (x, p))


@pytest.mark.parametrize("with_probs", [True, False])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", GRADCHECK_LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_unpermute(device, layout, fused, with_probs):
    T, H, rm, x, p, n_out, dp = _tiny(device, layout)
    perm, _, index = moe_raw.permute(x.detach(), rm, None, n_out, fused, dp)
    y = _randn(tuple(perm.shape), F64, device).requires_grad_()
    rm_arg = None if fused or not with_probs else rm

    if with_probs:
        assert torch.autograd.gradcheck(
            lambda rows, probs: moe_raw.unpermute(rows, index, (T, H), probs, rm_arg, fused, dp), (y, p)
        )
    else:
        assert torch.autograd.gradcheck(
            lambda rows: moe_raw.unpermute(rows, index, (T, H), None, None, fused, dp), (y,)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_100_runs(device):
    """Forward and backward are bitwise repeatable (no atomics): 100 runs of each path."""
    T, H, E, K = _shape(device, (1027, 2048, 64, 8), (259, 40, 16, 8))
    x, rm, p = _case(device, BF16, T, H, E, K, "topk", F32)
    _, _, idx = moe_raw.permute(x, rm)
    _, _, row_map = moe_raw.permute(x, rm, fused=True)
    y = _randn((idx.numel(), H), BF16, device)
    g = _randn((T, H), BF16, device)
    g_perm, g_pp = _randn((idx.numel(), H), BF16, device), _randn((idx.numel(),), F32, device)

    def unpermute_run(path):
        yl, pl = y.clone().requires_grad_(), p.clone().requires_grad_()
        if path == "fused":
            out = moe_raw.unpermute(yl, row_map, (T, H), pl, fused=True)
        elif path == "map":
            out = moe_raw.unpermute(yl, idx, (T, H), pl, routing_map=rm)
        else:
            pl = None
            out = moe_raw.unpermute(yl, idx, (T, H))
        out.backward(g)
        return out, yl.grad, pl.grad if pl is not None else None

    def permute_run(path):
        xl, pl = x.clone().requires_grad_(), p.clone().requires_grad_()
        out, pp, _ = moe_raw.permute(xl, rm, pl, fused=path == "permute_fused")
        torch.autograd.backward([out, pp], [g_perm, g_pp])
        return out, pp, xl.grad, pl.grad

    for path in ("fused", "map", "csr", "permute", "permute_fused"):
        run = permute_run if path.startswith("permute") else unpermute_run
        first = run(path)
        for i in range(99):
            for j, (a, b) in enumerate(zip(first, run(path), strict=True)):
                if a is not None:
                    assert torch.equal(a, b), f"{path}: run {i + 1} output {j} differs from run 0"


# ----------------------------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("n_out,dp", [(None, False), (0, False), (5, False), (16, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device, n_out, dp):
    T, H, E = 0, 16, 8
    x = torch.zeros((T, H), dtype=BF16, device=device)
    rm = torch.zeros((T, E), dtype=torch.bool, device=device)
    p = torch.zeros((T, E), dtype=F32, device=device)
    n_rows = n_out if (n_out is not None and not dp) else 0
    for fused in (False, True):
        xl, pl = x.clone().requires_grad_(), p.clone().requires_grad_()
        out, pp, index = moe_raw.permute(xl, rm, pl, n_out, fused, dp)
        assert out.shape == (n_rows, H) and pp.shape == (n_rows,)
        assert (out == 0).all() and (pp == 0).all()
        if fused:
            assert_exact(index, R.build_row_map(rm.cpu(), n_out, dp)[0], "row map")
        else:
            assert_exact(index, torch.zeros(n_rows, dtype=torch.int64), "sorted_indices")
        back = moe_raw.unpermute(out, index, (T, H), pl, None if fused else rm, fused, dp)
        assert back.shape == (T, H) and back.dtype == BF16
        _backward([back, pp], [torch.zeros_like(back), torch.ones_like(pp)], "contiguous")
        assert _grad(xl, True).shape == (T, H) and _grad(pl, True).shape == (T, E)
        if not fused:  # the csr path (no routing_map): spare rows have no token to go to
            rows = out.detach().requires_grad_()
            back = moe_raw.unpermute(rows, index, (T, H))
            assert back.shape == (T, H)
            _backward([back], [torch.zeros_like(back)], "contiguous")
            assert_exact(_grad(rows, True), torch.zeros((n_rows, H), dtype=BF16), "csr d rows")


@pytest.mark.parametrize("kind", ["E1", "K_eq_E", "empty_expert", "one_expert", "all_unrouted", "all_unrouted_spare"])
@pytest.mark.parametrize("device", DEVICES)
def test_special_routing_maps(device, kind):
    T, H = _shape(device, (1027, 1000), (259, 24))
    E, K, rkind = {"E1": (1, 1, "topk"), "K_eq_E": (8, 8, "topk"), "empty_expert": (64, 8, "empty_expert"),
                   "one_expert": (8, 1, "one_expert"), "all_unrouted": (8, 0, "topk"),
                   "all_unrouted_spare": (8, 0, "topk")}[kind]  # fmt: skip
    if device == "cpu" and E == 64:
        E = 16  # the CPU's O(E T H) fp64 reference (see the docstring)
    rm = make_routing(T, E, K, device, rkind)
    p = make_probs(rm, F32)
    x = _randn((T, H), BF16, device)
    n_out = 37 if kind == "all_unrouted_spare" else None
    _check_round_trip(x, rm, p, n_out, what=kind)
    if kind == "empty_expert":
        counts = rm.sum(0)
        assert (counts == 0).sum() == 1


_MAP_VALUES = {  # a routed entry's value: nonzero, and for the wide types zero in the low byte(s)
    torch.bool: True,
    torch.uint8: 255,
    torch.int8: -128,
    torch.int16: 256,
    torch.int32: 1 << 16,
    torch.int64: 1 << 32,
}


@pytest.mark.parametrize("map_dtype", list(_MAP_VALUES), ids=lambda d: _NAMES.get(d, str(d).replace("torch.", "")))
@pytest.mark.parametrize("device", DEVICES)
def test_routing_map_dtypes(device, map_dtype):
    T, H, E, K = _shape(device, (1027, 1000, 64, 8), (259, 40, 16, 8))
    x, rm, p = _case(device, BF16, T, H, E, K, "sparse", F32)
    m = torch.zeros((T, E), dtype=map_dtype, device=device)
    m[rm] = _MAP_VALUES[map_dtype]
    if map_dtype not in (torch.bool, torch.uint8):
        odd = rm & (torch.rand(T, E, device=device) < 0.5)
        m[odd] = 1 if map_dtype == torch.int8 else -1  # mixed nonzero values
    base = {fused: moe_raw.permute(x, rm, p, fused=fused) for fused in (False, True)}
    for fused in (False, True):
        got = moe_raw.permute(x, m, p, fused=fused)
        for a, b, name in zip(got, base[fused], ("permuted", "permuted_probs", "index"), strict=True):
            assert_exact(a, b, f"{map_dtype} map vs bool map: {name}")
    _check_round_trip(x, m, p, what=str(map_dtype))


_LAYOUTS = [
    "routing_map_T_view", "routing_map_col_view", "routing_map_misaligned", "probs_T_view", "tokens_row_view",
    "tokens_row_view_odd", "tokens_misaligned", "tokens_col_major", "tokens_row_broadcast",
]  # fmt: skip


def _layout(layout, x, rm, p):
    """Views with the same values as (x, rm, p) but non-contiguous in the named way."""
    T, H = x.shape
    dev = x.device
    if layout == "routing_map_T_view":  # strides (1, T)
        return x, rm.T.contiguous().T, p
    if layout == "routing_map_col_view":  # stride (E + 1, 1): rows not 16-byte aligned
        big = torch.zeros((T, rm.shape[1] + 1), dtype=rm.dtype, device=dev)
        big[:, 1:] = rm
        return x, big[:, 1:], p
    if layout == "routing_map_misaligned":  # stride (E, 1) (E = 64 on CUDA), base address 1 byte past a boundary
        flat = torch.zeros(rm.numel() + 1, dtype=rm.dtype, device=dev)
        v = flat[1:].view(rm.shape)
        v.copy_(rm)
        return x, v, p
    if layout == "probs_T_view":
        return x, rm, p.T.contiguous().T
    if layout == "tokens_row_view":  # stride (H + 8, 1): row starts stay 16-byte aligned for bf16
        big = _randn((T, H + 8), x.dtype, dev)
        big[:, :H] = x
        return big[:, :H], rm, p
    if layout == "tokens_row_view_odd":  # stride (H + 1, 1): 2-byte alignment only
        big = _randn((T, H + 1), x.dtype, dev)
        big[:, :H] = x
        return big[:, :H], rm, p
    if layout == "tokens_misaligned":  # contiguous rows, base address 2 bytes past an alignment boundary
        flat = torch.empty(T * H + 1, dtype=x.dtype, device=dev)
        v = flat[1:].view(T, H)
        v.copy_(x)
        return v, rm, p
    if layout == "tokens_col_major":  # last dim not contiguous: permute copies it
        return x.T.contiguous().T, rm, p
    if layout == "tokens_row_broadcast":  # stride (0, 1)
        return x[3:4].expand(T, H), rm, p
    raise ValueError(layout)


@pytest.mark.parametrize("layout", _LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device, layout):
    T, H, E, K = _shape(device, (1027, 1000, 64, 8), (259, 40, 16, 8))
    x, rm, p = _case(device, BF16, T, H, E, K, "sparse", BF16)
    xv, rmv, pv = _layout(layout, x, rm, p)
    xc, rmc, pc = xv.contiguous(), rmv.contiguous(), pv.contiguous()
    out, pp, idx, row_map = _check_permute(xv, rmv, pv, what=layout)
    y = _randn(tuple(out.shape), BF16, device)
    outs = _check_unpermute(y, rmv, pv, idx, row_map, what=layout)
    assert_exact(
        outs["map"], moe_raw.unpermute(y, idx, (T, H), pc, routing_map=rmc), f"{layout}: unpermute vs contiguous"
    )
    # Gradients reach the strided view exactly as they reach a contiguous copy.
    g_out, g_pp = _randn(tuple(out.shape), BF16, device), _randn(tuple(pp.shape), BF16, device)

    def grads(tokens, routing_map, probs):
        # detach() keeps sizes, strides and offset: the leaves have exactly the layouts under test.
        xl, pl = tokens.detach().requires_grad_(), probs.detach().requires_grad_()
        o, q, _ = moe_raw.permute(xl, routing_map, pl, fused=True)
        torch.autograd.backward([o, q], [g_out, g_pp])
        return xl.grad, pl.grad

    gx_v, gp_v = grads(xv, rmv, pv)
    gx_c, gp_c = grads(xc, rmc, pc)
    assert_exact(gx_v, gx_c, f"{layout}: d tokens vs contiguous")
    assert_exact(gp_v, gp_c, f"{layout}: d probs vs contiguous")


@pytest.mark.parametrize("mode", ["plain", "spare", "drop_and_pad"])
@pytest.mark.parametrize("H", [13, 7168])
@pytest.mark.parametrize(
    "dtype",
    [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize("device", DEVICES)
def test_byte_tokens(device, dtype, H, mode):
    """1-byte tokens (fp8 activations) are a pure byte move, NaN encodings included."""
    T, E, K = 1027, 64, 8
    rm = make_routing(T, E, K, device, "sparse")
    p = make_probs(rm, F32)
    raw = torch.randint(0, 256, (T, H), dtype=torch.uint8).to(device)
    x = raw.view(dtype)
    routed = int(rm.sum())
    n_out, dp = {"plain": (None, False), "spare": (routed + 33, False), "drop_and_pad": (6 * E, True)}[mode]
    ref_out, ref_pp, ref_idx = R.permute(raw, rm, p, n_out, False, dp)
    ref_map = R.build_row_map(rm, n_out, dp)[0]
    for fused in (False, True):
        _poison(rm.device, ref_out, ref_pp)
        out, pp, index = moe_raw.permute(x, rm, p, n_out, fused, dp)
        assert out.dtype == dtype
        assert_exact(out.view(torch.uint8), ref_out, f"{dtype} permuted bytes fused={fused}")
        assert_exact(pp, ref_pp, "permuted_probs")
        assert_exact(index, ref_map if fused else ref_idx, "index")


# ----------------------------------------------------------------------------------------------------------------
# Streams, CUDA graphs, host syncs: CUDA only.

DEV = torch.device("cuda")


@pytest.mark.gpu
@needs_cuda
def test_side_stream(side_stream):
    """permute -> unpermute (+ backward) enqueued on a side stream, on inputs made on that stream."""
    T, H, E, K = 1027, 2048, 64, 8
    with torch.cuda.stream(side_stream):
        torch.cuda._sleep(50_000_000)  # the inputs below become ready only well after the launches are queued
        x = torch.randn(T, H, device=DEV).to(BF16).requires_grad_()
        scores = torch.rand(T, E, device=DEV)
        rm = torch.zeros(T, E, dtype=torch.bool, device=DEV).scatter_(1, scores.topk(K, dim=1).indices, True)
        p = (torch.softmax(scores.masked_fill(~rm, float("-inf")), dim=1)).requires_grad_()
        g = torch.randn(T, H, device=DEV).to(BF16)
        results = {}
        for path in ("fused", "map"):
            xl, pl = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
            perm, pp, index = moe_raw.permute(xl, rm, pl, num_out_tokens=T * K, fused=path == "fused")
            out = moe_raw.unpermute(perm, index, (T, H), pl, None if path == "fused" else rm, path == "fused")
            out.backward(g)
            results[path] = (perm, pp, index, out, xl.grad, pl.grad)
    side_stream.synchronize()
    xc, rmc, pc = x.detach().cpu(), rm.cpu(), p.detach().cpu()
    ref_perm, ref_pp, ref_idx = R.permute(xc, rmc, pc)
    ref_map = R.build_row_map(rmc)[0]
    ref64 = R.unpermute(ref_perm.double(), ref_idx, (T, H), pc.double(), rmc)
    ref_same = R.unpermute(ref_perm, ref_idx, (T, H), pc, rmc)
    for path, (perm, pp, index, out, gx, gp) in results.items():
        assert_exact(perm, ref_perm, f"{path} permuted")
        assert_exact(pp, ref_pp, f"{path} permuted_probs")
        assert_exact(index, ref_map if path == "fused" else ref_idx, f"{path} index")
        _close(out, ref64, ref_same, f"{path} unpermute", 2 * K * EPS32 * ref_perm.abs().max().item())
        assert gx.isfinite().all() and gp.isfinite().all()
    for a, b in zip(results["fused"][3:], results["map"][3:], strict=True):
        assert_exact(a, b, "side stream: fused vs map")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype,H", [(BF16, 7168), (BF16, 2056), (F16, 520), (F32, 1032)], ids=str)
def test_unpermute_backward_instances_same_bits(monkeypatch, dtype, H, K):
    """unpermute_bwd's LONE instance (kernels/permute.cu: a token's lone row two packs a step; the launcher picks it
    where N < 2 T) and QUAD instance (four rows a step, bf16 / fp16; picked where N >= 4 T) give the two-rows-a-step
    instance's d_rows and dprobs bit for bit at any K (forced here), odd pack counts (H 2056 bf16, 520 fp16) and
    spare rows included; and the launcher picks LONE at K 1 only, QUAD at K 9 only."""
    from moe_raw import _cpu
    from moe_raw._kernels import dispatch as D

    T, E = 515, 16
    rm = make_routing(T, E, K, DEV, "topk")
    p = make_probs(rm, F32)
    n_rows = T * K + 5  # five spare rows: zeroed, in no token's list
    rows = _randn((n_rows, H), dtype, DEV)
    g = _randn((T, H), dtype, DEV)
    row_map = _cpu.row_map(rm.cpu(), n_rows, False).to(DEV)
    names = []
    pick = D._unpermute_bwd_name
    monkeypatch.setattr(D, "_unpermute_bwd_name", lambda *a: names.append(pick(*a)) or names[-1])
    auto = D._unpermute_bwd_cuda(g, rows, row_map, n_rows, p, True)
    two_byte = dtype in (BF16, F16)
    assert names[-1].endswith(", true>") == (K == 1), names
    assert names[-1].endswith(", false, 4>") == (K == 9 and two_byte), names
    got = {}
    for suffix in ("", ", true") + ((", false, 4",) if two_byte else ()):
        name = f"moe_raw::unpermute_bwd<{D.CTYPES[dtype]}, 16{suffix}>"
        monkeypatch.setattr(D, "_unpermute_bwd_name", lambda *a, name=name: name)
        got[suffix] = D._unpermute_bwd_cuda(g, rows, row_map, n_rows, p, True)
    for suffix, out in got.items():
        for a, b, what in zip(got[""], out, ("d_rows", "dprobs"), strict=True):
            assert_exact(b, a, f"instance '{suffix}' {what} against the two-rows-a-step instance")
    for a, c, what in zip(got[""], auto, ("d_rows", "dprobs"), strict=True):
        assert_exact(c, a, f"launcher's pick {what}")
    assert (got[", true"][0][T * K :] == 0).all(), "spare rows' gradient must be 0"
    ref = _cpu.unpermute_bwd(g.cpu(), rows.cpu(), row_map.cpu(), n_rows, p.cpu(), True)
    assert_exact(got[""][0].cpu(), ref[0], "d_rows against the CPU twin (g * w rounded once)")
    torch.testing.assert_close(got[""][1].cpu(), ref[1], rtol=1e-5, atol=1e-5 * H)


_GRAPH_PATHS = ["fused", "map", "csr"]


def _graph_inputs(T, H, E, K, kind, with_probs):
    rm = make_routing(T, E, K, DEV, kind)
    return (_randn((T, H), BF16, DEV), rm, make_probs(rm, F32) if with_probs else None, _randn((T, H), BF16, DEV))


def _graph_step(path, T, H, n_out, x, rm, p, g):
    perm, pp, index = moe_raw.permute(x, rm, p, num_out_tokens=n_out, fused=path == "fused")
    h = perm * 2 if pp is None else perm * pp.unsqueeze(1).to(perm.dtype)
    out = moe_raw.unpermute(h, index, (T, H), p, rm if path == "map" else None, path == "fused")
    out.backward(g)
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [256, 600])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
@pytest.mark.parametrize("path", _GRAPH_PATHS)
def test_cuda_graph_capture_and_replay(path, overlap, T, monkeypatch):
    """Capture permute -> unpermute and their backward with num_out_tokens given; replay on new data (more and
    fewer routed pairs than num_out_tokens) == eager. Any host sync during capture raises. overlapped: permute's
    row kernel captured as a programmatic dependent launch (on sm_90; the size threshold lowered to 0), and at T 600
    (three 256-token tiles, 48 tile sums) routing_scan too."""
    if overlap:
        from moe_raw._kernels import dispatch

        monkeypatch.setattr(dispatch, "_OVERLAP_MIN_BYTES", 0)
    H, E, K = 1024, 16, 4
    n_out = T * K - 40  # topk maps overflow it (dropped tail), sparse maps underflow it (spare rows)
    with_probs = path != "csr"
    sx = torch.zeros((T, H), dtype=BF16, device=DEV, requires_grad=True)
    srm = torch.zeros((T, E), dtype=torch.bool, device=DEV)
    sp = torch.zeros((T, E), dtype=F32, device=DEV, requires_grad=True) if with_probs else None
    sg = torch.zeros((T, H), dtype=BF16, device=DEV)

    def load(x, rm, p, g):
        with torch.no_grad():
            sx.copy_(x)
            srm.copy_(rm)
            if sp is not None:
                sp.copy_(p)
            sg.copy_(g)

    load(*_graph_inputs(T, H, E, K, "topk", with_probs))
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # compile and cache everything before capture, as torch.cuda.graph asks
        for _ in range(2):
            sx.grad = None
            if sp is not None:
                sp.grad = None
            _graph_step(path, T, H, n_out, sx, srm, sp, sg)
    torch.cuda.current_stream().wait_stream(warm)
    sx.grad = None
    if sp is not None:
        sp.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out = _graph_step(path, T, H, n_out, sx, srm, sp, sg)
    for kind in ("topk", "sparse", "topk"):
        data = _graph_inputs(T, H, E, K, kind, with_probs)
        load(*data)
        graph.replay()
        torch.cuda.synchronize()
        x, rm, p, g = data
        xl = x.clone().requires_grad_()
        pl = p.clone().requires_grad_() if p is not None else None
        out = _graph_step(path, T, H, n_out, xl, rm, pl, g)
        assert_exact(s_out, out, f"graph replay ({kind}) out")
        assert_exact(sx.grad, xl.grad, f"graph replay ({kind}) d tokens")
        if pl is not None:
            assert_exact(sp.grad, pl.grad, f"graph replay ({kind}) d probs")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group", [1, 8, 32, None])
@pytest.mark.parametrize(
    "T, E, H, K", [(300, 16, 1024, 4), (4096, 256, 7168, 8), (2048, 64, 2048, 6), (999, 8, 64, 2), (1500, 384, 4096, 8)]
)  # E 384: permute_grouped<16, 4>, four experts a thread (kernels/permute.cu KE)
def test_grouped_row_kernel_matches_scatter(T, E, H, K, group, monkeypatch):
    """permute_grouped (sm_90, 16-byte rows: several tokens a block; group None: as the host sizes it) against
    permute_scatter (forced by a zero expert limit): bit-identical rows, probs, row maps and indices for permute
    with and without num_out_tokens, with dropped pairs, and permute_and_pad."""
    from moe_raw._kernels import dispatch

    rm = make_routing(T, E, K, DEV, "sparse")
    x, p = _randn((T, H), BF16, DEV), make_probs(rm, F32)
    routed = int(rm.sum())

    def run():
        return (*moe_raw.permute(x, rm, p, num_out_tokens=T * K, fused=True), *moe_raw.permute(x, rm, p),
                *moe_raw.permute(x, rm, p, num_out_tokens=routed - 3, fused=True),
                *moe_raw.permute_and_pad(x, rm, p, 16))  # fmt: skip

    monkeypatch.setattr(dispatch, "_GROUP_MIN_ROW_BYTES", 0)  # every row size and pair count
    monkeypatch.setattr(dispatch, "_GROUP_MIN_PAIRS", 0)
    if group is not None:
        monkeypatch.setattr(dispatch, "_GROUP_BYTES", group * H * 2)
    grouped = run()
    monkeypatch.setattr(dispatch, "_GROUP_MAX_EXPERTS", 0)
    for i, (a, b) in enumerate(zip(grouped, run(), strict=True)):
        assert_exact(a, b, f"output {i}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["grouped", "scatter"])
@pytest.mark.parametrize("T, E, H, K", [(300, 16, 1024, 4), (4096, 256, 7168, 8), (2048, 64, 2048, 6)])
def test_overlapped_row_kernel_matches_plain(T, E, H, K, kernel, monkeypatch):
    """permute and permute_and_pad, N given or not, with the row kernel (permute_grouped where it applies, or
    permute_scatter, forced by a zero expert limit) launched with overlap where allowed (every size, N given) or
    plainly (no size): bit-identical rows, probs, row maps and indices, on a side stream too (the launch goes on
    torch's current stream)."""
    from moe_raw._kernels import dispatch

    if kernel == "scatter":
        monkeypatch.setattr(dispatch, "_GROUP_MAX_EXPERTS", 0)
    else:  # every row size and pair count
        monkeypatch.setattr(dispatch, "_GROUP_MIN_ROW_BYTES", 0)
        monkeypatch.setattr(dispatch, "_GROUP_MIN_PAIRS", 0)
    rm = make_routing(T, E, K, DEV, "sparse")
    x, p = _randn((T, H), BF16, DEV), make_probs(rm, F32)
    results = {}
    for overlap, threshold in ((True, 0), (False, 1 << 62)):
        monkeypatch.setattr(dispatch, "_OVERLAP_MIN_BYTES", threshold)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = (*moe_raw.permute(x, rm, p, num_out_tokens=T * K, fused=True), *moe_raw.permute(x, rm, p),
                   *moe_raw.permute_and_pad(x, rm, p, 16, num_out_tokens=T * K),
                   *moe_raw.permute_and_pad(x, rm, p, 16))  # fmt: skip
        torch.cuda.current_stream().wait_stream(side)
        results[overlap] = got
    for i, (a, b) in enumerate(zip(results[True], results[False], strict=True)):
        assert_exact(a, b, f"output {i}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", _GRAPH_PATHS)
def test_no_host_sync_with_num_out_tokens(path):
    """With num_out_tokens, permute -> unpermute -> backward never syncs the host (torch's sync debug mode raises
    on any synchronizing torch call); without it permute syncs exactly where documented."""
    T, H, E, K = 256, 1024, 16, 4
    x, rm, p, g = _graph_inputs(T, H, E, K, "sparse", path != "csr")
    _graph_step(path, T, H, T * K, x.clone().requires_grad_(), rm, p, g)  # warm-up: first-use compile
    xl = x.clone().requires_grad_()
    pl = p.clone().requires_grad_() if p is not None else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _graph_step(path, T, H, T * K, xl, rm, pl, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            moe_raw.permute(x, rm, p)  # num_out_tokens=None: the documented device-to-host read
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# The row kernels against each other, bit for bit: permute_small (small maps, one launch, no tables) and
# permute_scatter (after the tables); gather_reduce (a block a token, the default) and gather_warp (a warp a token).
# CUDA only.

# (tokens dtype, T, H, E, K, routing kind, probs dtype, map form, num_out_tokens - T * K, drop_and_pad). The first
# ten have T * E <= 4096 (permute_small unless _SMALL_MAP is lowered), the rest more.
_ROW_KERNEL_CASES = [
    (BF16, 16, 1024, 8, 2, "topk", F32, "bool", 0, False),
    (F32, 1, 13, 1, 1, "topk", None, "bool", 0, False),
    (F16, 7, 1001, 64, 8, "sparse", BF16, "int64", 3, False),  # spare rows
    (BF16, 64, 7168, 64, 8, "topk", BF16, "strided", -100, False),  # dropped tail, 16 KiB stages (sm_90)
    (F32, 256, 2048, 16, 4, "empty_expert", F64, "uint8", 0, False),
    (BF16, 4, 7168, 1024, 8, "topk", F32, "bool", 0, False),  # E = 1024: the scan over experts, 8 a thread
    (F16, 3, 7, 1365, 2, "sparse", F16, "int32", 5, False),  # E not a multiple of the block
    (BF16, 33, 2048, 32, 4, "topk", F32, "bool", -40, True),  # drop_and_pad below capacity
    (F32, 40, 100, 8, 2, "sparse", F32, "transposed", 24, True),  # padding copies of unrouted tokens
    (torch.float8_e4m3fn, 50, 7168, 64, 8, "topk", None, "bool", 0, False),  # 1-byte tokens
    (BF16, 1027, 7168, 256, 8, "topk", F32, "bool", 0, False),  # DeepSeek-V3's E, K, H; a last block of 3 tokens
    (F16, 1027, 1001, 64, 8, "sparse", BF16, "int32", 17, False),  # odd rows (2-byte packs), spare rows
    (F32, 513, 4096, 8, 2, "topk", F32, "transposed", -300, False),  # Mixtral's E, K; dropped tail
    (BF16, 300, 2048, 100, 6, "empty_expert", F32, "bool", -200, True),  # E = 100: 4 rounds of 32 experts a warp
    (torch.float8_e4m3fn, 1000, 7168, 256, 8, "topk", None, "bool", 0, False),
    (F32, 100, 256, 1200, 4, "sparse", F64, "bool", 0, False),  # E 1200: bf16 / fp32 gathers still a warp a token
]


@pytest.mark.parametrize(
    "value, expected", [("1", "block block"), ("0", "warp warp"), (None, "block warp"), ("", "block warp")]
)
def test_block_kernels_switch(value, expected):
    """MOE_RAW_BLOCK_KERNELS at import picks the kernels of the gather (unpermute, permute's backward) and of
    permute_quantized (read once, as the other switches): 1 the block-a-token ones, 0 the warp-a-token ones, unset
    or empty each op's default (the gather a block a token, permute_quantized a warp a token)."""
    env = {k: v for k, v in os.environ.items() if k != "MOE_RAW_BLOCK_KERNELS"}
    if value is not None:
        env["MOE_RAW_BLOCK_KERNELS"] = value
    code = "from moe_raw._kernels import dispatch, quantize; print(dispatch._GATHER_KERNEL, quantize._QUANT_KERNEL)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


@pytest.mark.parametrize("num_experts", [8, 256, 1000, 1500, 3000, 4096])
@pytest.mark.parametrize("dtype", [BF16, F64])
def test_warp_kernels_fit_the_default_shared_memory(dtype, num_experts, monkeypatch):
    """gather_warp keeps a row list per warp, 4x gather_reduce's: it must only be chosen where those fit the 48 KiB
    every block gets (beyond, the block kernel opts in to more). The CUDA launchers run here on CPU tensors with the
    launch captured (no GPU): gather_warp asks for <= 46 KiB, and the large E take gather_reduce."""
    from moe_raw import _launch
    from moe_raw._kernels import dispatch as D

    monkeypatch.setattr(D, "_GATHER_KERNEL", "warp")  # the default is the block kernel
    launches = []
    monkeypatch.setattr(D, "launch", lambda family, name, dev, grid, block, args, shared_mem=0, overlap=False:
                        launches.append((name, shared_mem)))  # fmt: skip
    T, H = 40, 64
    rm = make_routing(T, num_experts, 4)
    p = make_probs(rm, F64 if dtype == F64 else F32)
    x = torch.randn(T, H).to(dtype)
    rows, _, row_map, _ = D._permute_cuda(x, rm, p, T * 4, False, want_indices=False)
    D._gather_cuda(rows, row_map, T, probs=p)
    D._unpermute_bwd_cuda(x, rows, row_map, T * 4, p, True)
    names = [name for name, _ in launches]
    assert any("permute_" in n for n in names) and any("gather_" in n for n in names), names
    for name, shared in launches:
        if "_warp" in name:
            assert shared <= _launch._SHARED_NO_OPT_IN, (name, shared)
    gathers = [n for n in names if "gather_" in n]
    if num_experts >= 3000:  # the warps' lists do not fit: the block kernel
        assert all("gather_reduce" in n for n in gathers), names
    if num_experts <= 256:
        assert all("gather_warp" in n for n in gathers), names


def _map_form(rm, form):
    if form == "strided":  # every other column of a wider map
        wide = torch.zeros(rm.shape[0], 2 * rm.shape[1], dtype=torch.bool, device=rm.device)
        wide[:, ::2] = rm
        return wide[:, ::2]
    if form == "transposed":
        return rm.t().contiguous().t()
    return rm if form == "bool" else rm.to(getattr(torch, form))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", _ROW_KERNEL_CASES, ids=lambda c: f"{str(c[0])[6:]}-T{c[1]}-E{c[3]}-{c[7]}-n{c[8]:+d}")
def test_row_kernels_agree(case, monkeypatch):
    """Every output of permute (fused and unfused), of unpermute's row map rebuild, of permute_and_pad, of unpermute
    (row map and CSR), of permute's backward and unpermute's rows gradient is bit for bit the same whichever row
    kernels ran: permute_small, permute_scatter or permute_grouped; gather_warp or gather_reduce."""
    from moe_raw._kernels import dispatch as D

    dtype, T, H, E, K, kind, pdtype, form, extra, drop_and_pad = case
    rm = _map_form(make_routing(T, E, K, DEV, kind), form)
    p = make_probs(rm.bool(), pdtype) if pdtype is not None else None
    x = _randn((T, H), F32, DEV).to(dtype)
    n_out = T * K + extra

    arithmetic = dtype in (F32, F16, BF16)  # unpermute and gradients: float tokens only
    n_rows = E * min(n_out // E, T) if drop_and_pad else n_out
    g_rows = _randn((n_rows, H), F32, DEV).to(dtype) if arithmetic else None
    g_probs = torch.randn(n_rows, device=DEV).to(p.dtype) if p is not None else None
    g_out = _randn((T, H), F32, DEV).to(dtype) if arithmetic else None

    def run():
        outs = []
        for fused in (False, True):
            outs += moe_raw.permute(x, rm, p, n_out, fused=fused, drop_and_pad=drop_and_pad)
        outs.append(D._row_map_from_routing(rm, n_out, drop_and_pad))
        if not drop_and_pad:
            outs += moe_raw.permute_and_pad(x, rm, p, 16, n_out)
        if arithmetic:  # the gathers: unpermute (row map, and CSR without a map) and permute's backward
            rows, _, row_map = moe_raw.permute(x, rm, p, n_out, fused=True, drop_and_pad=drop_and_pad)
            outs.append(moe_raw.unpermute(rows, row_map, (T, H), p, fused=True, drop_and_pad=drop_and_pad))
            rows, _, index = moe_raw.permute(x, rm, None, n_out, drop_and_pad=drop_and_pad)
            outs.append(moe_raw.unpermute(rows, index, (T, H), drop_and_pad=drop_and_pad))
            xg = x.clone().requires_grad_()
            pg = p.clone().requires_grad_() if p is not None else None
            rows, p_rows, _ = moe_raw.permute(xg, rm, pg, n_out, fused=True, drop_and_pad=drop_and_pad)
            torch.autograd.backward(
                [rows, p_rows] if pg is not None else [rows], [g_rows, g_probs][: 1 + (pg is not None)]
            )
            outs += [xg.grad, pg.grad if pg is not None else None]
            rows = rows.detach().requires_grad_()  # unpermute's backward: d rows exact, d probs close
            pu = p.clone().requires_grad_() if p is not None else None
            moe_raw.unpermute(rows, row_map, (T, H), pu, fused=True, drop_and_pad=drop_and_pad).backward(g_out)
            outs += [rows.grad, pu.grad if pu is not None else None]
        return [t for t in outs if t is not None]

    default = run()
    for small_map, gather, grouped in ((0, "warp", False), (0, "block", False), (0, "warp", True)):
        monkeypatch.setattr(D, "_SMALL_MAP", small_map)
        monkeypatch.setattr(D, "_GATHER_KERNEL", gather)
        if grouped:  # permute_grouped for every row size and pair count where it applies
            monkeypatch.setattr(D, "_GROUP_MIN_ROW_BYTES", 0)
            monkeypatch.setattr(D, "_GROUP_MIN_PAIRS", 0)
        for i, (a, b) in enumerate(zip(run(), default, strict=True)):
            assert_exact(
                a, b, f"output {i}: gather {gather} (small maps {small_map}, grouped {grouped}) vs the default"
            )


# ----------------------------------------------------------------------------------------------------------------
# 64-bit offsets: CUDA only (4.6 GB of rows; the CPU twins index with torch's int64 ops).


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_offsets_past_2_31_elements():
    """T K H > 2^31 elements (4.6 GB of bf16 rows): rows past the 2^31st element land where they belong."""
    T, E, K, H = 65536, 64, 8, 4352
    N = T * K
    assert N * H > 2**31
    row_bytes = H * 2
    need = 3 * N * row_bytes + 6 * T * row_bytes  # permuted (twice at peak) + d rows, plus the [T, H] tensors
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.15:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.randn(T, H, device=DEV).to(BF16)
    scores = torch.rand(T, E, device=DEV)
    rm = torch.zeros(T, E, dtype=torch.bool, device=DEV).scatter_(1, scores.topk(K, dim=1).indices, True)
    perm, _, idx = moe_raw.permute(x, rm, num_out_tokens=N)
    expected_idx = torch.arange(T, device=DEV).unsqueeze(0).expand(E, T).masked_select(rm.T.contiguous())
    assert_exact(idx, expected_idx, "sorted_indices")
    boundary = 2**31 // H  # first row whose elements start past 2^31
    gen = torch.Generator().manual_seed(0)
    sample = torch.cat([
        torch.arange(0, 256), torch.arange(boundary - 256, boundary + 256), torch.arange(N - 512, N),
        torch.randint(0, N, (4096,), generator=gen),
    ]).to(DEV)  # fmt: skip
    assert_exact(perm[sample], x[idx[sample]], "sampled permuted rows")
    _, _, row_map = moe_raw.permute(x, rm, num_out_tokens=N, fused=True)
    assert_exact(row_map, R.build_row_map(rm, N)[0], "row map")
    # Every token has K = 8 rows; with probs 1/8 the fp32 sum of 8 * (x / 8) is x exactly, and without probs 8 x.
    p = rm.to(F32) / K
    assert_exact(moe_raw.unpermute(perm, row_map, (T, H), p, fused=True), x, "unpermute(fused, probs 1/8)")
    assert_exact(moe_raw.unpermute(perm, idx, (T, H)), x * K, "unpermute(csr)")
    perm_l = perm.requires_grad_()
    (d_rows,) = torch.autograd.grad(moe_raw.unpermute(perm_l, row_map, (T, H), p, fused=True), perm_l, x)
    assert_exact(d_rows[sample], x[idx[sample]] / K, "sampled unpermute-backward rows")


# ----------------------------------------------------------------------------------------------------------------
# Validation on CUDA tensors.


@pytest.mark.gpu
@needs_cuda
def test_device_mismatch_raises_value_error():
    T, H, E, K = 7, 16, 8, 2
    x = _randn((T, H), BF16, DEV)
    rm = make_routing(T, E, K, DEV, "topk")
    p = make_probs(rm, F32)
    with pytest.raises(ValueError, match=r"(routing_map.*tokens|tokens.*routing_map)"):
        moe_raw.permute(x, rm.cpu())
    with pytest.raises(ValueError, match=r"(probs.*tokens|tokens.*probs)"):
        moe_raw.permute(x, rm, p.cpu())
    with pytest.raises(ValueError, match=r"(routing_map.*tokens|tokens.*routing_map)"):
        moe_raw.permute(x.cpu(), rm)
    perm, _, idx = moe_raw.permute(x, rm)
    with pytest.raises(ValueError, match="sorted_indices"):
        moe_raw.unpermute(perm, idx.cpu(), (T, H))
    with pytest.raises(ValueError, match="probs"):
        moe_raw.unpermute(perm, idx, (T, H), p.cpu(), routing_map=rm)
    with pytest.raises(ValueError, match="routing_map"):
        moe_raw.unpermute(perm, idx, (T, H), p, routing_map=rm.cpu())
