"""Bad input to every public op: a TypeError / ValueError naming the argument, raised before anything is launched,
never a CUDA error, and the process stays usable.

* ``BAD`` lists wrong ranks, shapes, dtypes, layouts, devices, sizes and flag types for every public function, as
  builders over one set of valid inputs, so the same cases run on both devices. tests/test_validation.py and
  tests/test_activations_api.py::test_swiglu_validation_errors hold the original CPU cases; ``BAD`` holds new ones
  only, and the GPU part also runs test_validation's permute cases on CUDA tensors.
* CPU part (CI): every case on CPU tensors (the reference path runs the same validation first).
* GPU part (``@pytest.mark.gpu``, skipped without CUDA): every case on CUDA tensors under
  ``torch.cuda.set_sync_debug_mode("error")`` (validation never syncs) with the launcher patched to count launches
  (none happens), then a valid call of every op checked against the reference (the context is healthy).
* Values (``MOE_RAW_DEBUG=1``, read once at import into ``moe_raw._validate.DEBUG``, which the tests set directly):
  an integer routing map holding anything but 0 / 1, sorted_indices outside [0, T), a fused row map's codes outside
  the N rows. With the flag they raise ValueError on both devices and every valid output of permute still passes;
  without it CUDA runs them without a host sync or a CUDA error (out-of-range rows are skipped) and CPU tensors get
  the reference's own behaviour (torch's index error for an out-of-range sorted_indices).
* Tensors on two GPUs: skipped unless ``torch.cuda.device_count() >= 2``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DEVICES, needs_cuda, needs_two_gpus

import moe_raw
from moe_raw import _launch
from moe_raw import _validate as V
from moe_raw import reference as R

T, E, H, K = 6, 4, 8, 2
N, F = 5, 4  # SwiGLU rows and width
HAS_CUDA = torch.cuda.is_available()


def _inputs(dev="cpu") -> SimpleNamespace:
    """Valid inputs of every op on ``dev`` (same values on every device): K = 2 experts per token."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen)
    rm = torch.zeros(T, E, dtype=torch.bool)
    rm[torch.arange(T), torch.arange(T) % E] = True
    rm[torch.arange(T), (torch.arange(T) + 1) % E] = True
    probs = torch.rand(T, E, generator=gen) * rm
    y, g, w = torch.randn(N, 2 * F, generator=gen), torch.randn(N, F, generator=gen), torch.rand(N, 1, generator=gen)
    d = SimpleNamespace(x=x, rm=rm, probs=probs, y=y, g=g, w=w)
    for k, v in vars(d).items():
        setattr(d, k, v.to(dev))
    # num_out_tokens given: no host sync on CUDA
    d.out, _, d.idx = moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K)
    _, _, d.row_map = moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K, fused=True)
    return d


def c(fn, *args, **kwargs):
    return fn, args, kwargs


P, U = moe_raw.permute, moe_raw.unpermute
SW, WSW, SWB, WSWB = moe_raw.swiglu, moe_raw.weighted_swiglu, moe_raw.swiglu_back, moe_raw.weighted_swiglu_back
WBSI, WSF = moe_raw.weighted_bias_swiglu_impl, moe_raw.WeightedSwiGLUFunction.apply
F8 = torch.float8_e4m3fn

# (id, exception, message regex, builder: inputs -> (function, args, kwargs)). Builders run before the checked call
# (some, e.g. to_sparse on CUDA, sync), so only the rejected call itself runs under the sync check.
BAD = [
    # permute
    ("permute-tokens-3d", ValueError, "tokens must be 2-D", lambda d: c(P, d.x[None], d.rm)),
    ("permute-tokens-sparse", TypeError, "tokens must be a dense", lambda d: c(P, d.x.to_sparse(), d.rm)),
    ("permute-tokens-complex", TypeError, "tokens must have dtype", lambda d: c(P, d.x.to(torch.complex64), d.rm)),
    ("permute-tokens-bool", TypeError, "tokens must have dtype", lambda d: c(P, d.x > 0, d.rm)),
    ("permute-map-3d", ValueError, "routing_map must be 2-D", lambda d: c(P, d.x, d.rm[None])),
    ("permute-map-sparse", TypeError, "routing_map must be a dense", lambda d: c(P, d.x, d.rm.to_sparse())),
    ("permute-map-fp16", TypeError, "routing_map must have dtype", lambda d: c(P, d.x, d.rm.half())),
    ("permute-probs-1d", ValueError, "probs must be 2-D", lambda d: c(P, d.x, d.rm, d.probs.flatten())),
    (
        "permute-probs-ET",
        ValueError,
        r"probs must be \[num_tokens, num_experts\]",
        lambda d: c(P, d.x, d.rm, d.probs.T),
    ),
    ("permute-probs-bool", TypeError, "probs must have dtype", lambda d: c(P, d.x, d.rm, d.rm)),
    ("permute-probs-sparse", TypeError, "probs must be a dense", lambda d: c(P, d.x, d.rm, d.probs.to_sparse())),
    ("permute-probs-meta", ValueError, "probs is on meta", lambda d: c(P, d.x, d.rm, d.probs.to("meta"))),
    ("permute-map-meta", ValueError, "routing_map is on meta", lambda d: c(P, d.x, d.rm.to("meta"))),
    (
        "permute-n-out-tensor",
        TypeError,
        "num_out_tokens must be an int, got Tensor",
        lambda d: c(P, d.x, d.rm, num_out_tokens=d.rm.sum()),
    ),
    ("permute-n-out-str", TypeError, "num_out_tokens must be an int", lambda d: c(P, d.x, d.rm, num_out_tokens="12")),
    ("permute-n-out-negative", ValueError, "num_out_tokens must be >= 0", lambda d: c(P, d.x, d.rm, None, -12)),
    ("permute-fused-tensor", TypeError, "fused must be a bool", lambda d: c(P, d.x, d.rm, fused=d.rm.any())),
    ("permute-fused-str", TypeError, "fused must be a bool", lambda d: c(P, d.x, d.rm, fused="yes")),
    ("permute-dap-none", TypeError, "drop_and_pad must be a bool", lambda d: c(P, d.x, d.rm, None, 8, False, None)),
    # unpermute
    ("unpermute-rows-3d", ValueError, "permuted_tokens must be 2-D", lambda d: c(U, d.out[None], d.idx, (T, H))),
    (
        "unpermute-rows-sparse",
        TypeError,
        "permuted_tokens must be a dense",
        lambda d: c(U, d.out.to_sparse(), d.idx, (T, H)),
    ),
    ("unpermute-rows-fp8", TypeError, "permuted_tokens must have dtype", lambda d: c(U, d.out.to(F8), d.idx, (T, H))),
    (
        "unpermute-index-int16",
        TypeError,
        "sorted_indices must have dtype",
        lambda d: c(U, d.out, d.idx.short(), (T, H)),
    ),
    ("unpermute-index-2d", ValueError, "sorted_indices must be 1-D", lambda d: c(U, d.out, d.idx[:, None], (T, H))),
    (
        "unpermute-index-list",
        TypeError,
        "sorted_indices must be a torch.Tensor",
        lambda d: c(U, d.out, [0] * 12, (T, H)),
    ),
    ("unpermute-index-meta", ValueError, "sorted_indices is on meta", lambda d: c(U, d.out, d.idx.to("meta"), (T, H))),
    ("unpermute-shape-float", TypeError, "restore_shape must hold ints", lambda d: c(U, d.out, d.idx, (6.0, H))),
    ("unpermute-shape-bool", TypeError, "restore_shape must hold ints", lambda d: c(U, d.out, d.idx, (True, H))),
    (
        "unpermute-shape-tensor-entry",
        TypeError,
        "restore_shape must hold ints",
        lambda d: c(U, d.out, d.idx, (d.rm.sum(), H)),  # a CUDA 0-d tensor: int() would sync
    ),
    ("unpermute-shape-str", TypeError, "restore_shape must be a .* tuple, got str", lambda d: c(U, d.out, d.idx, "68")),
    (
        "unpermute-shape-tensor",
        TypeError,
        "restore_shape must be a .* tuple, got Tensor",
        lambda d: c(U, d.out, d.idx, torch.tensor([T, H])),
    ),
    ("unpermute-shape-negative", ValueError, "sizes >= 0", lambda d: c(U, d.out, d.idx, (-1, H))),
    (
        "unpermute-rowmap-no-experts",
        ValueError,
        "1 to 4096 expert columns",
        lambda d: c(U, d.out, d.row_map[:, :0], (T, H), fused=True),
    ),
    (
        "unpermute-rowmap-4097-experts",
        ValueError,
        "1 to 4096 expert columns",
        lambda d: c(U, d.out, d.row_map.new_full((T + 1, 4097), -1), (T, H), fused=True),
    ),
    ("unpermute-fused-str", TypeError, "fused must be a bool", lambda d: c(U, d.out, d.idx, (T, H), fused="no")),
    (
        "unpermute-dap-tensor",
        TypeError,
        "drop_and_pad must be a bool",
        lambda d: c(U, d.out, d.idx, (T, H), d.probs, d.rm, drop_and_pad=d.rm.any()),
    ),
    ("unpermute-probs-1d", ValueError, "probs must be 2-D", lambda d: c(U, d.out, d.idx, (T, H), d.probs[0], d.rm)),
    (
        "unpermute-probs-sparse",
        TypeError,
        "probs must be a dense",
        lambda d: c(U, d.out, d.idx, (T, H), d.probs.to_sparse(), d.rm),
    ),
    (
        "unpermute-map-sparse",
        TypeError,
        "routing_map must be a dense",
        lambda d: c(U, d.out, d.idx, (T, H), d.probs, d.rm.to_sparse()),
    ),
    (
        "unpermute-map-vs-rowmap",
        ValueError,
        "routing_map must have 4 columns",
        lambda d: c(U, d.out, d.row_map, (T, H), d.probs, d.rm[:, :2], fused=True),
    ),
    # swiglu
    ("swiglu-y-sparse", TypeError, "y must be a dense", lambda d: c(SW, d.y.to_sparse())),
    ("swiglu-y-fp8", TypeError, "y must be float32", lambda d: c(SW, d.y.to(F8))),
    ("swiglu-y-none", TypeError, "y must be a torch.Tensor", lambda d: c(SW, None)),
    # weighted_swiglu
    ("wswiglu-y-1d", ValueError, "y must be 2-D", lambda d: c(WSW, d.y[0], d.w)),
    ("wswiglu-y-odd", ValueError, "last dim of y must be even", lambda d: c(WSW, d.y[:, :7], d.w)),
    ("wswiglu-w-sparse", TypeError, "weights must be a dense", lambda d: c(WSW, d.y, d.w.to_sparse())),
    ("wswiglu-w-0d", ValueError, r"weights must be \[N, 1\]", lambda d: c(WSW, d.y, d.w[0, 0])),
    ("wswiglu-w-bool", TypeError, "weights must be float32", lambda d: c(WSW, d.y, d.w > 0)),
    # swiglu_back
    ("swiglu_back-g-sparse", TypeError, "g must be a dense", lambda d: c(SWB, d.g.to_sparse(), d.y)),
    ("swiglu_back-g-rank", ValueError, r"g must be \[..., F\]", lambda d: c(SWB, d.g[None], d.y)),
    ("swiglu_back-y-int", TypeError, "y must be float32", lambda d: c(SWB, d.g, d.y.int())),
    ("swiglu_back-y-sparse", TypeError, "y must be a dense", lambda d: c(SWB, d.g, d.y.to_sparse())),
    ("swiglu_back-g-list", TypeError, "g must be a torch.Tensor", lambda d: c(SWB, d.g.tolist(), d.y)),
    # weighted_swiglu_back
    ("wswiglu_back-g-wide", ValueError, r"g must be \[..., F\]", lambda d: c(WSWB, d.y[:, :5], d.y, d.w)),
    ("wswiglu_back-w-1d", ValueError, r"weights must be \[N, 1\]", lambda d: c(WSWB, d.g, d.y, d.w[:, 0])),
    ("wswiglu_back-w-int", TypeError, "weights must be float32", lambda d: c(WSWB, d.g, d.y, d.w.int())),
    ("wswiglu_back-y-3d", ValueError, "y must be 2-D", lambda d: c(WSWB, d.g[None], d.y[None], d.w)),
    ("wswiglu_back-g-meta", ValueError, "g is on meta", lambda d: c(WSWB, d.g.to("meta"), d.y, d.w)),
    # weighted_bias_swiglu_impl / WeightedSwiGLUFunction
    ("wbsi-input-sparse", TypeError, "input must be a dense", lambda d: c(WBSI, d.y.to_sparse(), d.w)),
    ("wbsi-input-odd", ValueError, "last dim of input must be even", lambda d: c(WBSI, d.y[:, :7], d.w)),
    ("wbsi-input-int", TypeError, "input must be float32", lambda d: c(WBSI, d.y.int(), d.w)),
    ("wbsi-input-0d", ValueError, "input must have a last dimension", lambda d: c(WBSI, d.y[0, 0], d.w)),
    ("wbsi-w-1d", ValueError, r"weights must be \[N, 1\]", lambda d: c(WBSI, d.y, d.w[:, 0])),
    ("wbsi-3d-w-rows", ValueError, r"weights must be \[N, 1\] with N = 5", lambda d: c(WBSI, d.y[:, None], d.w[:4])),
    ("wbsi-fp8-none", TypeError, "fp8_input_store must be a bool", lambda d: c(WBSI, d.y, d.w, None)),
    ("WSF-fp8-str", TypeError, "fp8_input_store must be a bool", lambda d: c(WSF, d.y, d.w, "yes")),
    ("WSF-fp8-tensor", TypeError, "fp8_input_store must be a bool", lambda d: c(WSF, d.y, d.w, d.w.any())),
    ("WSF-input-1d", ValueError, "input must be 2-D", lambda d: c(WSF, d.y[0], d.w, False)),
]

# CUDA tensors only: mixed with CPU tensors, and the kernels' limits (checked on metadata: no memory is needed).
BIG_T = 2**19 + 1  # BIG_T * 4096 experts > 2^31 - 1 map entries
BAD_CUDA = [
    (
        "permute-tokens-cpu",
        ValueError,
        "routing_map is on cuda:0 but tokens is on cpu",
        lambda d: c(P, d.x.cpu(), d.rm),
    ),
    ("unpermute-index-cpu", ValueError, "sorted_indices is on cpu", lambda d: c(U, d.out, d.idx.cpu(), (T, H))),
    ("wswiglu-w-cpu", ValueError, "weights is on cpu but y is on cuda", lambda d: c(WSW, d.y, d.w.cpu())),
    ("swiglu_back-g-cpu", ValueError, "g is on cpu but y is on cuda", lambda d: c(SWB, d.g.cpu(), d.y)),
    ("swiglu_back-y-cpu", ValueError, "g is on cuda:0 but y is on cpu", lambda d: c(SWB, d.g, d.y.cpu())),
    ("wswiglu_back-w-cpu", ValueError, "weights is on cpu", lambda d: c(WSWB, d.g, d.y, d.w.cpu())),
    ("wbsi-w-cpu", ValueError, "weights is on cpu", lambda d: c(WBSI, d.y, d.w.cpu())),
    (
        "permute-map-entries-over-2^31",
        ValueError,
        r"T \* E = \d+ routing-map entries exceed",
        lambda d: c(P, d.x[:1].expand(BIG_T, H), d.rm.new_zeros(1, 4096).expand(BIG_T, 4096), num_out_tokens=0),
    ),
]


def _ids(cases):
    return [case[0] for case in cases]


@contextlib.contextmanager
def _no_sync_no_launch(monkeypatch):
    """Inside: any synchronizing CUDA call raises, and every kernel launch through moe_raw's launcher is counted."""
    launches = []
    real = _launch.launch_compiled
    monkeypatch.setattr(_launch, "launch_compiled", lambda *a, **k: launches.append(a) or real(*a, **k))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield launches
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(_launch, "launch_compiled", real)


def _check_valid_calls(dev) -> None:
    """Every op on valid inputs, against the reference on CPU: the process (and its CUDA context) still works."""
    d, ref = _inputs(dev), _inputs("cpu")
    x = d.x.clone().requires_grad_()
    for fused in (False, True):
        out, pp, idx = moe_raw.permute(x, d.rm, d.probs, num_out_tokens=T * K, fused=fused)
        r_out, r_pp, r_idx = R.permute(ref.x, ref.rm, ref.probs, T * K, fused)
        for got, exp in ((out, r_out), (pp, r_pp), (idx, r_idx)):
            assert torch.equal(got.detach().cpu(), exp)
        y = moe_raw.unpermute(out, idx, (T, H), d.probs, None if fused else d.rm, fused=fused)
        r_y = R.unpermute(r_out, r_idx, (T, H), ref.probs, None if fused else ref.rm, fused=fused)
        torch.testing.assert_close(y.detach().cpu(), r_y, rtol=1e-5, atol=1e-6)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        torch.testing.assert_close(dx.cpu(), (ref.probs.sum(1, keepdim=True)).expand(T, H), rtol=1e-5, atol=1e-6)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe_raw.swiglu(d.y).cpu(), R.swiglu(ref.y), **close)
    torch.testing.assert_close(moe_raw.weighted_swiglu(d.y, d.w).cpu(), R.weighted_swiglu(ref.y, ref.w), **close)
    torch.testing.assert_close(moe_raw.swiglu_back(d.g, d.y).cpu(), R.swiglu_back(ref.g, ref.y), **close)
    for got, exp in zip(
        moe_raw.weighted_swiglu_back(d.g, d.y, d.w), R.weighted_swiglu_back(ref.g, ref.y, ref.w), strict=True
    ):
        torch.testing.assert_close(got.cpu(), exp, **close)
    yg = d.y.clone().requires_grad_()
    moe_raw.weighted_bias_swiglu_impl(yg, d.w).sum().backward()
    torch.testing.assert_close(yg.grad.cpu(), R.swiglu_back(torch.ones(N, F) * ref.w, ref.y), **close)


# ----------------------------------------------------------------------------------------------------------------
# CPU part (CI)


@pytest.mark.parametrize("case", BAD, ids=_ids(BAD))
def test_bad_input_cpu(case):
    _, exc, match, build = case
    fn, args, kwargs = build(_inputs("cpu"))
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Signatures seen before (moe_raw._validate.permute_args / unpermute_args skip the checks of a call whose signature
# passed them): a call that differs from a good one in any one thing the checks read still fails, on every device.


def _seen_cases(d, other):
    """(id, good call, bad call differing from it in one thing the checks read). ``other``: another device."""
    p_good = c(P, d.x, d.rm, d.probs, num_out_tokens=1, fused=True)
    u_good = c(U, d.fused_out, d.row_map, (T, H), d.probs, fused=True)
    u_unfused = c(U, d.out, d.idx, (T, H), d.probs, d.rm)
    fp8 = d.x.to(F8)
    out1, _, map1 = moe_raw.permute(d.x[:1], d.rm[:1], d.probs[:1], num_out_tokens=K, fused=True)
    one = (out1, map1)  # one token: restore_shape (1, H)
    narrow = d.fused_out[:, :1]  # hidden 1: restore_shape (T, 1)
    return [
        ("permute-tokens-layout", p_good, c(P, d.x.to_sparse(), d.rm, d.probs, num_out_tokens=1, fused=True)),
        ("permute-tokens-dtype", p_good, c(P, d.x.to(torch.complex64), d.rm, d.probs, num_out_tokens=1, fused=True)),
        ("permute-tokens-rank", p_good, c(P, d.x[None], d.rm, d.probs, num_out_tokens=1, fused=True)),
        ("permute-tokens-device", p_good, c(P, d.x.to(other), d.rm, d.probs, num_out_tokens=1, fused=True)),
        ("permute-map-dtype", p_good, c(P, d.x, d.rm.half(), d.probs, num_out_tokens=1, fused=True)),
        ("permute-map-rows", p_good, c(P, d.x[:-1], d.rm, d.probs[:-1], num_out_tokens=1, fused=True)),
        ("permute-map-layout", p_good, c(P, d.x, d.rm.to_sparse(), d.probs, num_out_tokens=1, fused=True)),
        ("permute-probs-shape", p_good, c(P, d.x, d.rm, d.probs[:, :-1], num_out_tokens=1, fused=True)),
        ("permute-probs-dtype", p_good, c(P, d.x, d.rm, d.probs.to(torch.int32), num_out_tokens=1, fused=True)),
        ("permute-probs-device", p_good, c(P, d.x, d.rm, d.probs.to(other), num_out_tokens=1, fused=True)),
        ("permute-size-bool", p_good, c(P, d.x, d.rm, d.probs, num_out_tokens=True, fused=True)),
        ("permute-flag-str", p_good, c(P, d.x, d.rm, d.probs, num_out_tokens=1, fused="yes")),
        ("permute-flag-float", p_good, c(P, d.x, d.rm, d.probs, num_out_tokens=1, fused=1.0)),  # 1.0 == True
        (
            "permute-drop-float",
            c(P, d.x, d.rm, d.probs, num_out_tokens=E, drop_and_pad=True),
            c(P, d.x, d.rm, d.probs, num_out_tokens=E, drop_and_pad=1.0),
        ),
        (
            "permute-drop-no-size",
            c(P, d.x, d.rm, d.probs, fused=True),
            c(P, d.x, d.rm, d.probs, fused=True, drop_and_pad=True),
        ),
        # 1-byte tokens leave no signature (their gradient check reads grad mode): checked on every call
        (
            "permute-byte-grad",
            c(P, fp8, d.rm, d.probs, num_out_tokens=1),
            c(P, fp8.clone().requires_grad_(), d.rm, d.probs, num_out_tokens=1),
        ),
        ("unpermute-rows-rank", u_good, c(U, d.fused_out[None], d.row_map, (T, H), d.probs, fused=True)),
        ("unpermute-rows-dtype", u_good, c(U, d.fused_out.to(torch.int32), d.row_map, (T, H), d.probs, fused=True)),
        ("unpermute-rows-layout", u_good, c(U, d.fused_out.to_sparse(), d.row_map, (T, H), d.probs, fused=True)),
        ("unpermute-map-dtype", u_good, c(U, d.fused_out, d.row_map.long(), (T, H), d.probs, fused=True)),
        ("unpermute-map-rows", u_good, c(U, d.fused_out, d.row_map[:-1], (T, H), d.probs, fused=True)),
        ("unpermute-map-device", u_good, c(U, d.fused_out, d.row_map.to(other), (T, H), d.probs, fused=True)),
        ("unpermute-shape-hidden", u_good, c(U, d.fused_out, d.row_map, (T, H + 1), d.probs, fused=True)),
        ("unpermute-shape-tokens", u_good, c(U, d.fused_out, d.row_map, (T + 1, H), d.probs, fused=True)),
        ("unpermute-shape-bool", u_good, c(U, d.fused_out, d.row_map, (T, True), d.probs, fused=True)),
        (
            "unpermute-one-token-bool",
            c(U, *one, (1, H), d.probs[:1], fused=True),  # True == 1
            c(U, *one, (True, H), d.probs[:1], fused=True),
        ),
        (
            "unpermute-hidden-one-bool",
            c(U, narrow, d.row_map, (T, 1), d.probs, fused=True),
            c(U, narrow, d.row_map, (T, True), d.probs, fused=True),
        ),
        ("unpermute-shape-float", u_good, c(U, d.fused_out, d.row_map, (float(T), H), d.probs, fused=True)),
        ("unpermute-probs-shape", u_good, c(U, d.fused_out, d.row_map, (T, H), d.probs[:-1], fused=True)),
        ("unpermute-probs-device", u_good, c(U, d.fused_out, d.row_map, (T, H), d.probs.to(other), fused=True)),
        ("unpermute-flag-none", u_good, c(U, d.fused_out, d.row_map, (T, H), d.probs, fused=None)),
        ("unpermute-flag-float", u_good, c(U, d.fused_out, d.row_map, (T, H), d.probs, fused=1.0)),
        ("unpermute-indices-count", u_unfused, c(U, d.out, d.idx[:-1], (T, H), d.probs, d.rm)),
        ("unpermute-indices-dtype", u_unfused, c(U, d.out, d.idx.to(torch.int16), (T, H), d.probs, d.rm)),
        ("unpermute-no-map", u_unfused, c(U, d.out, d.idx, (T, H), d.probs)),
        ("unpermute-map-experts", u_unfused, c(U, d.out, d.idx, (T, H), d.probs, d.rm[:, :-1])),
    ]


def _seen_inputs(dev):
    d = _inputs(dev)
    d.fused_out = moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K, fused=True)[0]
    return d, ("meta" if dev == "cpu" else "cpu")


_SEEN_IDS = [case[0] for case in _seen_cases(*_seen_inputs("cpu"))]


def _raised(call) -> BaseException:
    fn, args, kwargs = call
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("i", range(len(_SEEN_IDS)), ids=_SEEN_IDS)
def test_seen_signature_still_checks_every_argument(dev, i, monkeypatch):
    """Cold (no signature seen) and right after the good call (its signature seen): the same error."""
    d, other = _seen_inputs(dev)
    name, good, bad = _seen_cases(d, other)[i]
    monkeypatch.setattr(V, "_checked", {})
    cold = _raised(bad)
    fn, args, kwargs = good
    fn(*args, **kwargs)
    assert bool(V._checked) != (name == "permute-byte-grad"), "the good call should have left its signature"
    warm = _raised(bad)
    assert (type(warm), str(warm)) == (type(cold), str(cold))


@pytest.mark.parametrize("dev", DEVICES)
def test_seen_signature_skips_the_checks(dev, monkeypatch):
    """A second call with new tensors of the same metadata runs none of the checks and gives the same results; a
    call that changes one thing runs them again. The signatures kept stay bounded."""
    d, _ = _seen_inputs(dev)
    monkeypatch.setattr(V, "_checked", {})
    first = moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K, fused=True)
    y1 = moe_raw.unpermute(first[0], first[2], (T, H), d.probs, fused=True)

    def fail(*args, **kwargs):
        raise AssertionError("a seen signature ran the checks")

    for name in ("permute_inputs", "tensor", "fused_row_map", "restore_shape", "same_device"):
        monkeypatch.setattr(V, name, fail)
    x2, p2 = d.x.clone() * 2, d.probs.clone()
    second = moe_raw.permute(x2, d.rm, p2, num_out_tokens=T * K, fused=True)
    y2 = moe_raw.unpermute(second[0], second[2], torch.Size((T, H)), p2, fused=True)  # a Size is the same shape
    assert torch.equal(second[0], first[0] * 2) and torch.equal(second[2], first[2])
    torch.testing.assert_close(y2, y1 * 2)
    with pytest.raises(AssertionError, match="ran the checks"):
        moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K - 1, fused=True)
    monkeypatch.undo()
    monkeypatch.setattr(V, "_CHECKED_MAX", 4)
    monkeypatch.setattr(V, "_checked", {})
    for n in range(10):
        moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=n, fused=True)
        assert 1 <= len(V._checked) <= 4


def test_weighted_bias_swiglu_impl_zero_width():
    """F = 0 is valid (swiglu accepts it): [N, 0] and [S, B, 0] inputs give [N, 0] / [S, B, 0], no reshape error."""
    w = torch.rand(6, 1)
    assert moe_raw.weighted_bias_swiglu_impl(torch.randn(6, 0), w).shape == (6, 0)
    assert moe_raw.weighted_bias_swiglu_impl(torch.randn(2, 3, 0), w).shape == (2, 3, 0)


def test_restore_shape_accepts_int_like_sequences():
    d = _inputs()
    ref = moe_raw.unpermute(d.out, d.idx, (T, H))
    for shape in (torch.Size([T, H]), [T, H], (np.int64(T), np.int32(H))):
        assert torch.equal(moe_raw.unpermute(d.out, d.idx, shape), ref)


# ----------------------------------------------------------------------------------------------------------------
# GPU part


def _validation_permute_cases(d):
    from test_validation import _permute_cases  # the original CPU cases, built over any device's tensors

    return _permute_cases(d.x, d.rm, d.probs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", BAD + BAD_CUDA, ids=_ids(BAD + BAD_CUDA))
def test_bad_input_cuda(case, monkeypatch):
    _, exc, match, build = case
    fn, args, kwargs = build(_inputs("cuda"))
    with _no_sync_no_launch(monkeypatch) as launches, pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert not launches, f"{len(launches)} kernels launched before the error"
    _check_valid_calls("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("i", range(len(_validation_permute_cases(_inputs()))))  # in test_validation's order
def test_validation_permute_cases_on_cuda(i, monkeypatch):
    d = _inputs("cuda")
    override, exc, match = _validation_permute_cases(d)[i]
    kw = dict(tokens=d.x, routing_map=d.rm, probs=d.probs)
    kw.update(override)
    with _no_sync_no_launch(monkeypatch) as launches, pytest.raises(exc, match=match):
        moe_raw.permute(**kw)
    assert not launches
    _check_valid_calls("cuda")


@pytest.mark.gpu
@needs_cuda
def test_fused_row_map_any_strides():
    """A strided view of a valid row map gives the contiguous map's result (the kernels read a copy); an expanded
    one (stride 0, fewer elements than [T + 1, E]) reads no memory past its storage."""
    d = _inputs("cuda")
    expected = moe_raw.unpermute(d.out, d.row_map, (T, H), d.probs, fused=True)
    transposed = d.row_map.T.contiguous().T  # strides (1, T + 1)
    assert torch.equal(moe_raw.unpermute(d.out, transposed, (T, H), d.probs, fused=True), expected)
    expanded = d.row_map[:1].expand(T + 1, E)
    moe_raw.unpermute(d.out, expanded, (T, H), d.probs, fused=True)
    torch.cuda.synchronize()
    _check_valid_calls("cuda")


@needs_two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize(
    "op",
    ["permute", "unpermute", "unpermute-fused", "weighted_swiglu", "swiglu_back", "weighted_swiglu_back", "wbsi"],
)
def test_tensors_on_two_gpus(op, monkeypatch):
    d0, d1 = _inputs("cuda:0"), _inputs("cuda:1")
    build = {
        "permute": lambda: c(P, d0.x, d0.rm, d1.probs),
        "unpermute": lambda: c(U, d0.out, d0.idx, (T, H), d0.probs, d1.rm),
        "unpermute-fused": lambda: c(U, d1.out, d0.row_map, (T, H), fused=True),
        "weighted_swiglu": lambda: c(WSW, d0.y, d1.w),
        "swiglu_back": lambda: c(SWB, d1.g, d0.y),
        "weighted_swiglu_back": lambda: c(WSWB, d0.g, d0.y, d1.w),
        "wbsi": lambda: c(WBSI, d1.y, d0.w),
    }[op]
    fn, args, kwargs = build()
    with _no_sync_no_launch(monkeypatch) as launches, pytest.raises(ValueError, match="cuda:1.*cuda:0|cuda:0.*cuda:1"):
        fn(*args, **kwargs)
    assert not launches
    _check_valid_calls("cuda:0")
    _check_valid_calls("cuda:1")


# ----------------------------------------------------------------------------------------------------------------
# Values: MOE_RAW_DEBUG


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setattr(V, "DEBUG", True)


def _bad_values(d):
    """(id, message regex, call) with bad values that only a host read can see."""
    map2, map_neg = d.rm.to(torch.int8), d.rm.to(torch.int32)
    map2[2, 3], map_neg[0, 0] = 2, -1
    idx_hi, idx_neg, idx32 = d.idx.clone(), d.idx.clone(), d.idx.int()
    idx_hi[3], idx_neg[0], idx32[-1] = T, -1, T + 5
    rm_hi, rm_pad, rm_kept = d.row_map.clone(), d.row_map.clone(), d.row_map.clone()
    n = T * K
    rm_hi[1, 1], rm_pad[2, 0], rm_kept[T, 0] = n, -2 - n, n + 1
    return [
        ("permute-map-2", r"routing_map must hold only 0 and 1, got 2 at \[2, 3\]", c(P, d.x, map2, d.probs, n)),
        ("permute-map-negative", r"routing_map must hold only 0 and 1, got -1 at \[0, 0\]", c(P, d.x, map_neg)),
        ("unpermute-index-T", r"sorted_indices must be token ids in \[0, 6\).*\[0, 6\]", c(U, d.out, idx_hi, (T, H))),
        ("unpermute-index-negative", r"token ids in \[0, 6\).*\[-1, 5\]", c(U, d.out, idx_neg, (T, H))),
        ("unpermute-index-int32", r"token ids in \[0, 6\).*\[0, 11\]", c(U, d.out, idx32, (T, H))),
        ("unpermute-index-with-map", "sorted_indices must be token ids", c(U, d.out, idx_hi, (T, H), d.probs, d.rm)),
        ("unpermute-map-2", "routing_map must hold only 0 and 1", c(U, d.out, d.idx, (T, H), d.probs, map2)),
        (
            "unpermute-rowmap-row-N",
            r"codes in \[-13, 11\].*got codes in \[-1, 12\]",
            c(U, d.out, rm_hi, (T, H), fused=True),
        ),
        ("unpermute-rowmap-pad-N", r"got codes in \[-14, ", c(U, d.out, rm_pad, (T, H), fused=True)),
        ("unpermute-rowmap-kept", r"row_map\[T, 0\] = 13", c(U, d.out, rm_kept, (T, H), fused=True)),
    ]


_BAD_VALUE_IDS = [case[0] for case in _bad_values(_inputs())]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("i", range(len(_BAD_VALUE_IDS)), ids=_BAD_VALUE_IDS)
def test_bad_values_with_debug_flag(dev, i, debug):
    _, match, (fn, args, kwargs) = _bad_values(_inputs(dev))[i]
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)
    if dev == "cuda":
        _check_valid_calls(dev)


@pytest.mark.parametrize("dev", DEVICES)
def test_debug_flag_accepts_every_valid_output(dev, monkeypatch):
    """Under the flag, permute's own outputs pass unpermute's value checks (spare rows with index 0, dropped routes,
    padding codes, T = 0, 0/1 integer maps), with the same results as without it."""
    d = _inputs(dev)
    routed = T * K
    cases = [
        (d.x, d.rm, dict()),
        (d.x, d.rm.to(torch.uint8), dict(num_out_tokens=routed + 5)),  # spare rows
        (d.x, d.rm.to(torch.int64), dict(num_out_tokens=routed - 5)),  # dropped routes
        (d.x, d.rm, dict(num_out_tokens=2 * E, drop_and_pad=True)),  # padding codes, capacity 2
        (d.x[:0], d.rm[:0], dict(num_out_tokens=3)),  # T = 0 with spare rows of index 0
    ]
    results = {}
    for flag in (False, True):
        monkeypatch.setattr(V, "DEBUG", flag)
        results[flag] = []
        for x, rm, kw in cases:
            probs = d.probs[: x.shape[0]]
            dap = kw.get("drop_and_pad", False)
            for fused in (False, True):
                out, pp, idx = moe_raw.permute(x, rm, probs, fused=fused, **kw)
                back = (
                    moe_raw.unpermute(out, idx, x.shape, probs, None if fused else rm, fused, dap),
                    moe_raw.unpermute(out, idx, x.shape, None, None, fused, dap),
                )
                results[flag].append((out, pp, idx, *back))
    for a, b in zip(results[False], results[True], strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("dev", DEVICES)
def test_without_flag_bad_values_same_on_every_device(monkeypatch, dev):
    """Without the flag the same bad values give the same results on CPU and CUDA, with no error (and on CUDA no
    host sync and no CUDA error): a map value 2 or -1 is routed, out-of-range sorted_indices rows are summed into no
    token and get a zero gradient (the CSR backward would otherwise trip index_select's device-side assert; the CPU
    path used to raise torch's anonymous index error), out-of-range fused codes are skipped."""
    monkeypatch.setattr(V, "DEBUG", False)
    d = _inputs(dev)
    map2 = d.rm.to(torch.int8) * 2
    map2[0] = -d.rm[0].to(torch.int8)
    idx = d.idx.clone()
    idx[0], idx[5] = T, -3  # rows 0 and 5 belong to no token
    row_map = d.row_map.clone()
    routed = row_map[:T] >= 0
    first = routed.nonzero()[0].tolist()
    row_map[first[0], first[1]] = 10**6  # a row past N: skipped
    rows = d.out.clone().requires_grad_()
    g = torch.randn(T, H, device=dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    with _no_sync_no_launch(monkeypatch) if dev == "cuda" else contextlib.nullcontext():
        got_perm = moe_raw.permute(d.x, map2, d.probs, num_out_tokens=T * K)
        y_csr = moe_raw.unpermute(rows, idx, (T, H))
        (d_rows,) = torch.autograd.grad(y_csr, rows, g)
        y_fused = moe_raw.unpermute(d.out, row_map, (T, H), d.probs, fused=True)
    if dev == "cuda":
        torch.cuda.synchronize()
    for a, b in zip(got_perm, moe_raw.permute(d.x, d.rm, d.probs, num_out_tokens=T * K), strict=True):
        assert torch.equal(a, b)
    keep = torch.ones(T * K, dtype=torch.bool, device=dev)
    keep[[0, 5]] = False
    torch.testing.assert_close(y_csr, moe_raw.unpermute(d.out[keep], d.idx[keep], (T, H)))
    expected_d_rows = g[d.idx] * keep[:, None]
    assert torch.equal(d_rows, expected_d_rows)
    cut = d.probs.clone()
    cut[first[0], first[1]] = 0  # the skipped route contributes nothing
    torch.testing.assert_close(y_fused, moe_raw.unpermute(d.out, d.row_map, (T, H), cut, fused=True))
    _check_valid_calls(dev)


@pytest.mark.parametrize("value,expected", [(None, False), ("0", False), ("", False), ("1", True)])
def test_debug_flag_is_read_from_the_environment_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "MOE_RAW_DEBUG"}
    if value is not None:
        env["MOE_RAW_DEBUG"] = value
    code = "import moe_raw._validate as V; print(V.DEBUG)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)
