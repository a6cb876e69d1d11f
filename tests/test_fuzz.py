"""Property-based tests (hypothesis) of every public op, forward and backward, against fp64 oracles (issue #6).

One comparison routine per op family, run on two devices:

* ``cuda`` (GPU profile, ``@pytest.mark.gpu``, skipped without CUDA): moe_raw's kernels over large drawn shapes
  (T <= 5000, H <= 9000, E <= 300, K <= 16; SwiGLU N <= 5000, F <= 4500), with the work of one example bounded
  (rows x H and N x F at a few million elements) so the fp64 CPU oracles stay fast.
* ``cpu`` (CPU profile, runs in CI): the same properties on CPU tensors at small shapes. permute / unpermute then
  run ``moe_raw.reference``, so the oracle that makes this test independent is bench/seed.py (the seed's own
  unfused code), run in fp64; where moe_raw's contract goes beyond the seed (num_out_tokens below / above the routed
  count, spare rows, NaN off-route probs, the fused row map) the seed's result is cut or padded per the contract
  and the row layout is rebuilt from the seed's order. The SwiGLU family runs the Numba kernels under the CUDA
  simulator (``NUMBA_ENABLE_CUDASIM=1``, as CI sets; tiny shapes, few examples).

Oracles, both devices (all on the CPU, fp64):

* permute: ``moe_raw.reference.permute`` on fp64 inputs, itself checked bit for bit against the seed-derived layout;
  moe_raw's permuted rows, permuted probs, sorted_indices / row map must equal it exactly (pure moves), the sizes
  must be the contract's (N = routed count, num_out_tokens, or E * min(num_out_tokens // E, T)).
* unpermute and every gradient: the seed's code on fp64 inputs with autograd (cross-checked against
  ``moe_raw.reference.unpermute`` in fp64 where that loop over experts is cheap). Errors are bounded element by
  element: half an ulp of the output dtype times the value, plus the fp32 accumulation error of the terms summed
  (a multiple of eps32 times the sum of their magnitudes; for dprobs, a dot over H, scaled with sqrt(H) as
  bench/smoke.py does), plus the smallest fp16 subnormal. Pure moves (permute's dprobs, unpermute's d rows without
  probs) are exact; probs gradients are exactly 0 off-route and for dropped pairs.
* SwiGLU family: ``moe_raw.reference`` on fp64 inputs under the rule of tests/test_activations.py: the error is at most
  2x the error of the same-dtype torch reference plus half an ulp (dweights: or moe_raw's stated fp32 reduction
  bound, whichever is larger).

Drawn: shapes incl. T = 0, N = 0 and tile boundaries; token dtype fp32 / fp16 / bf16 / fp64 (and 1-byte fp8 / uint8
/ int8 for permute's forward, a pure byte move); probs dtype fp32 / fp16 / bf16 / fp64 or none, 0 or NaN off-route;
routing maps with unrouted tokens, empty experts, 0..K routes per token, bool or integer maps whose nonzero values
may have a zero low byte (256, 2^16, 2^32); num_out_tokens None / equal / below / above / 0 and drop_and_pad
capacities (any, the largest expert count +-1, above T, N not a multiple of E); fused True / False; every unpermute
path (fused row map, routing_map, bare sorted_indices, int32 indices, the cached or a rebuilt row map); strided,
misaligned and column-major inputs; broadcast, strided and transposed upstream gradients; NaN in spare rows.

Profiles (tests/conftest.py, ``MOE_RAW_HYPOTHESIS_PROFILE``): ci (default; derandomized), dev, gpu, gpu-long, with
40 / 10 / 150 / 1000 examples per GPU test and per simulator test, and 10x that for the CPU dispatch test (~10 ms
an example; ci: about 15 s for this file on 2 cores). The simulator test serializes the simulator's shared-array
allocation (``_simulator_shared_memory_lock``: a race in numba-cuda's simulator, not in moe_raw).
Run on a CUDA machine: ``MOE_RAW_HYPOTHESIS_PROFILE=gpu python -m pytest -q -m gpu tests/test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from dataclasses import dataclass
from unittest import mock

import pytest
import torch

pytest.importorskip("hypothesis")

from conftest import assert_exact, needs_cuda  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moe_raw  # noqa: E402
from bench import seed as SEED  # noqa: E402
from moe_raw import reference as R  # noqa: E402

S = importlib.import_module("moe_raw.activations")
GC = importlib.import_module("moe_raw._kernels.glu_codegen")
GL = importlib.import_module("moe_raw._kernels.glu_launch")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FLOATS = (F32, F16, BF16, F64)
BYTE_DTYPES = (torch.uint8, torch.int8) + tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)
EPS32 = torch.finfo(F32).eps
EPS64 = torch.finfo(F64).eps
HALF_ULP = {F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8, F64: 2.0**-53}
# Absolute floor of a rounding to the dtype: half the smallest subnormal where values can get that small.
FLOOR = {F32: 2.0**-150, F16: 2.0**-25, BF16: 2.0**-134, F64: 0.0}
U32 = 2.0**-24

HAS_CUDA = torch.cuda.is_available()
needs_sim = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="runs moe_raw's Numba kernels under Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1",
)


def _examples(share: float = 1.0) -> settings:
    """The loaded profile's settings with ``share`` of its max_examples (at least 1)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


@dataclass(frozen=True)
class Limits:
    t_max: int  # tokens
    e_max: int  # experts
    k_max: int  # routes per token
    h_max: int  # hidden
    elems: int  # bound on rows x H (rows = permuted rows or tokens, whichever is more)
    cap_rows: int  # bound on E x capacity with drop_and_pad
    token_dtypes: tuple  # "bytes": one of BYTE_DTYPES
    n_max: int  # SwiGLU rows
    f_max: int  # SwiGLU half width
    swiglu_elems: int  # bound on N x F
    swiglu_dtypes: tuple


GPU_LIMITS = Limits(
    t_max=5000, e_max=300, k_max=16, h_max=9000, elems=3_000_000, cap_rows=100_000,
    token_dtypes=(F32, F16, BF16, F32, F16, BF16, F64, "bytes"),
    n_max=5000, f_max=4500, swiglu_elems=2_000_000, swiglu_dtypes=(F32, F16, BF16, F32, F16, BF16, F64),
)  # fmt: skip
CPU_LIMITS = Limits(
    t_max=600, e_max=64, k_max=8, h_max=160, elems=20_000, cap_rows=2_000,
    token_dtypes=(F32, F16, BF16, F32, F16, BF16, F64, "bytes"),
    n_max=8, f_max=40, swiglu_elems=160, swiglu_dtypes=(F32, F16, BF16) * 3 + (F64,),
)  # fmt: skip

SPECIAL_T = (0, 1, 2, 7, 31, 32, 33, 255, 256, 257, 1027, 4096)
SPECIAL_E = (1, 2, 8, 31, 32, 33, 64, 256, 300)
SPECIAL_H = (1, 2, 7, 8, 13, 64, 1000, 1001, 2048, 7168)
SPECIAL_N = (0, 1, 7, 8, 9, 33, 1027)
SPECIAL_F = (1, 2, 4, 8, 13, 16, 32, 768, 2048)


def _int_or_special(lo: int, hi: int, specials) -> st.SearchStrategy[int]:
    picks = [s for s in specials if lo <= s <= hi]
    return st.one_of(st.sampled_from(picks), st.integers(lo, hi)) if picks else st.integers(lo, hi)


# ----------------------------------------------------------------------------------------------------------------
# Layouts and comparisons


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of t (on t's device) in another memory layout; "row_bcast" / "ones" change the values (grads)."""
    if kind == "contig":
        return t.clone()
    if kind == "ones":
        return torch.ones((), dtype=t.dtype, device=t.device).expand(t.shape)
    if kind == "row_bcast":
        return t[:1].expand(t.shape) if t.shape[0] else t.clone()
    if t.dim() == 1:
        if kind == "col_major":
            return t.clone()
        wider = torch.zeros(2 * t.shape[0] + 1, dtype=t.dtype, device=t.device)[1::2]  # stride 2, offset 1
        return wider.copy_(t)
    n, m = t.shape
    if kind == "col_major":  # stride (1, n): the last dim is not contiguous
        return t.T.contiguous().T
    # Rows of a wider tensor: "pad" keeps 16-byte aligned rows and starts, "pad_odd" misaligns both.
    off = max(1, 16 // t.element_size()) if kind == "pad" else 1
    wider = torch.zeros((n, m + 2 * off + (0 if kind == "pad" else 1)), dtype=t.dtype, device=t.device)
    view = wider[:, off : off + m]
    return view.copy_(t)


def _within(got, ref64, bound, what: str) -> None:
    """|got - ref64| <= bound, element by element (NaN anywhere fails)."""
    assert got is not None, f"{what}: got None"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel() == 0:
        return
    err = (got.detach().cpu().double() - ref64).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} entries off, first at {list(i)}: got {got[i].item():.9g}, "
            f"fp64 oracle {ref64[i].item():.9g}, |err| {err[i].item():.3g} > bound {bound[i].item():.3g} "
            f"(max err {err.max().item():.3g})"
        )


def _rounding_bound(ref64, dtype, acc_eps: float, abs_sum, terms: float) -> torch.Tensor:
    """Rounding of a sum of `terms` products accumulated with unit roundoff acc_eps, then rounded once to dtype."""
    acc = 2 * (terms + 2) * acc_eps * abs_sum
    return HALF_ULP[dtype] * (ref64.abs() + acc) + acc + FLOOR[dtype]


def _poison(device, *nbytes: int) -> None:
    """On CUDA, fill freed allocator blocks of these sizes with 0xFF: outputs allocated next start as garbage."""
    if device.type == "cuda":
        blocks = [torch.full((max(n, 1),), 0xFF, dtype=torch.uint8, device=device) for n in nbytes]
        del blocks


def _autograd(outputs, grad_outputs, inputs):
    """Gradients of inputs (None entries skipped; zeros where nothing depends on an input)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o is not None and o.requires_grad]
    live = [x for x in inputs if x is not None and x.requires_grad]
    got = [None] * len(live)
    if pairs and live:
        got = torch.autograd.grad([o for o, _ in pairs], live, [g for _, g in pairs], allow_unused=True)
    got = iter(got)
    out = []
    for x in inputs:
        if x is None or not x.requires_grad:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(x) if g is None else g)
    return out


# ----------------------------------------------------------------------------------------------------------------
# permute / unpermute: drawn cases


@dataclass(frozen=True)
class DispatchCase:
    T: int
    E: int
    K: int
    H: int
    dtype: torch.dtype
    pdtype: torch.dtype | None
    seed: int
    exact_k: bool  # every token routed to K experts (else 0..K each)
    n_empty: int  # experts that get no token
    unrouted: float  # share of tokens with no route at all
    same_row: bool  # every token routed like token 0 (a row-broadcast, stride-0 routing map)
    map_dtype: torch.dtype
    map_layout: str
    x_layout: str
    p_layout: str
    nan_off_route: bool
    scale: float
    mode: str  # none / equal / below / above / zero / drop_and_pad
    frac: float  # "below": num_out_tokens = floor(frac * routed)
    extra: int  # "above": routed + extra
    cap_rule: str  # drop_and_pad capacity: "any" (cap), "max" / "max-1" / "max+1" (largest expert count)
    cap: int
    cap_rem: int  # num_out_tokens = capacity * E + cap_rem
    cap_max: int
    fused: bool
    need: tuple  # which of permute's inputs need grad: "x", "p"
    g_layout: str
    path: str  # unpermute: fused / map / csr
    uprobs: bool  # unpermute with probs
    index_i32: bool
    fresh_map: bool  # pass a copy of the routing map (unpermute rebuilds the row map instead of reusing it)
    y_layout: str
    nan_spare: bool
    uneed: tuple  # which of unpermute's inputs need grad: "y", "p"


MODES = ("none", "equal", "below", "above", "zero", "drop_and_pad")
MAP_DTYPES = (torch.bool, torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
X_LAYOUTS = ("contig", "contig", "pad", "pad_odd", "col_major")
G_LAYOUTS = ("contig", "contig", "pad_odd", "col_major", "row_bcast", "ones")


@st.composite
def dispatch_cases(draw, lim: Limits) -> DispatchCase:
    E = draw(_int_or_special(1, lim.e_max, SPECIAL_E))
    K = draw(st.integers(1, min(E, lim.k_max)))
    mode = draw(st.sampled_from(MODES))
    dp = mode == "drop_and_pad"
    # Permuted rows x H stays under lim.elems: draw T first and bound H, or H first and bound T.
    if draw(st.booleans()):
        T = draw(_int_or_special(0, lim.t_max, SPECIAL_T))
        rows = E * min(T, lim.cap_rows // E) if dp else T * K + 64
        H = draw(_int_or_special(1, min(lim.h_max, max(1, lim.elems // max(rows, T, 1))), SPECIAL_H))
    else:
        H = draw(_int_or_special(1, lim.h_max, SPECIAL_H))
        per = lim.elems // H
        T = draw(_int_or_special(0, min(lim.t_max, per if dp else max(0, (per - 64) // K)), SPECIAL_T))
    if dp:  # capacity up to T + 3 (above T: clipped to T), within the row budgets
        cap_max = min(T + 3, lim.cap_rows // E, lim.elems // (H * E))
        cap_rule = draw(st.sampled_from(("any", "any", "max", "max-1", "max+1")))
        cap = draw(st.integers(0, cap_max))
        cap_rem = draw(st.integers(0, E - 1))
    else:
        cap_max, cap_rule, cap, cap_rem = 0, "any", 0, 0
    dtype = draw(st.sampled_from(lim.token_dtypes))
    if dtype == "bytes":  # 1-byte tokens (fp8 activations): permute moves bytes, forward only
        dtype = draw(st.sampled_from(BYTE_DTYPES))
    differentiable = dtype in FLOATS
    pdtype = draw(st.sampled_from((None, F32, F32, BF16, F16, F64)))
    fused = draw(st.booleans())
    path = "fused" if fused else draw(st.sampled_from(("map", "map", "csr")))
    return DispatchCase(
        T=T, E=E, K=K, H=H, dtype=dtype, pdtype=pdtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        exact_k=draw(st.booleans()),
        n_empty=draw(st.integers(0, E - K)),
        unrouted=draw(st.sampled_from((0.0, 0.0, 0.1, 0.5, 1.0))),
        same_row=draw(st.integers(0, 9)) == 0,
        map_dtype=draw(st.sampled_from(MAP_DTYPES)),
        map_layout=draw(st.sampled_from(("contig", "contig", "pad_odd", "col_major"))),
        x_layout=draw(st.sampled_from(X_LAYOUTS)),
        p_layout=draw(st.sampled_from(("contig", "contig", "pad_odd", "col_major"))),
        nan_off_route=draw(st.booleans()),
        scale=draw(st.sampled_from((1.0, 1.0, 2.0**-10, 16.0))),
        mode=mode,
        frac=draw(st.floats(0.0, 1.0, exclude_max=True)),
        extra=draw(st.integers(1, 64)),
        cap_rule=cap_rule, cap=cap, cap_rem=cap_rem, cap_max=cap_max, fused=fused,
        need=draw(st.sampled_from((("x", "p"), ("x", "p"), ("x",), ("p",), ()))) if differentiable else (),
        g_layout=draw(st.sampled_from(G_LAYOUTS)),
        path=path,
        uprobs=pdtype is not None and path != "csr" and draw(st.booleans()),
        index_i32=path != "fused" and draw(st.integers(0, 3)) == 0,
        fresh_map=draw(st.booleans()),
        y_layout=draw(st.sampled_from(X_LAYOUTS)),
        nan_spare=path != "csr" and draw(st.booleans()),
        uneed=draw(st.sampled_from((("y", "p"), ("y", "p"), ("y",), ("p",), ()))),
    )  # fmt: skip


def _routing_bool(c: DispatchCase, gen: torch.Generator) -> torch.Tensor:
    """[T, E] bool: K (or 0..K) distinct random experts per token among the E - n_empty live ones; some tokens
    unrouted; optionally every token routed like token 0."""
    T, E, K = c.T, c.E, c.K
    scores = torch.rand(T, E, generator=gen)
    if c.n_empty:
        scores[:, torch.randperm(E, generator=gen)[: c.n_empty]] = -1.0  # never among a token's top K
    choice = scores.topk(K, dim=1).indices
    k_t = torch.full((T,), K) if c.exact_k else torch.randint(0, K + 1, (T,), generator=gen)
    k_t[torch.rand(T, generator=gen) < c.unrouted] = 0
    rm = torch.zeros(T, E, dtype=torch.bool)
    rm.scatter_(1, choice, torch.arange(K).unsqueeze(0) < k_t.unsqueeze(1))
    if c.same_row and T:
        rm = rm[:1].expand(T, E).clone()
    return rm


# Nonzero map values per dtype ("nonzero = routed"); some have a zero low byte.
_MAP_VALUES = {
    torch.uint8: (1, 255), torch.int8: (1, -1, 127), torch.int16: (1, -1, 256),
    torch.int32: (1, -1, 65536), torch.int64: (1, -1, 2**32),
}  # fmt: skip


def _typed_map(rm: torch.Tensor, dtype, gen) -> torch.Tensor:
    if dtype == torch.bool:
        return rm.clone()
    values = torch.tensor(_MAP_VALUES[dtype], dtype=dtype)
    pick = values[torch.randint(0, len(values), rm.shape, generator=gen)]
    return torch.where(rm, pick, torch.zeros((), dtype=dtype))


def _num_out(c: DispatchCase, rm: torch.Tensor) -> int | None:
    routed = int(rm.sum())
    if c.mode == "none":
        return None
    if c.mode == "equal":
        return routed
    if c.mode == "below":
        return math.floor(c.frac * routed)
    if c.mode == "above":
        return routed + c.extra
    if c.mode == "zero":
        return 0
    counts = rm.sum(0)
    top = int(counts.max()) if counts.numel() else 0
    cap = {"any": c.cap, "max": top, "max-1": top - 1, "max+1": top + 1}[c.cap_rule]
    return min(max(cap, 0), c.cap_max) * c.E + c.cap_rem


@dataclass
class SeedLayout:
    """The permuted row layout from bench/seed.py's order (plus the contract's cut / spare rows)."""

    n_rows: int
    kept: int  # leading rows holding a routed or padding token
    idx: torch.Tensor  # [n_rows] token of each row (0 for spare rows)
    exp: torch.Tensor  # [n_rows] expert of each row (-1 for spare rows)
    routed: torch.Tensor  # [n_rows] the row holds a routed pair (not padding, not spare)
    row_map: torch.Tensor  # [T + 1, E] int32, moe_raw's fused format
    rm_kept: torch.Tensor  # [T, E] the routed pairs that got a row


def _seed_layout(rm: torch.Tensor, n_out: int | None, dp: bool) -> SeedLayout:
    T, E = rm.shape
    no_data = torch.zeros(T, 0)
    if dp:
        _, _, idx = SEED.permute(no_data, rm, None, n_out, drop_and_pad=True)
        n_rows = kept = idx.numel()
        exp = torch.arange(E).repeat_interleave(n_rows // E)
        routed = rm[idx, exp] if n_rows else torch.zeros(0, dtype=torch.bool)
    else:
        _, _, idx = SEED.permute(no_data, rm)
        exp = torch.arange(E).unsqueeze(1).expand(E, T).masked_select(rm.T.contiguous())
        n_rows = idx.numel() if n_out is None else n_out
        kept = min(idx.numel(), n_rows)
        spare = n_rows - kept
        idx = torch.cat([idx[:kept], torch.zeros(spare, dtype=torch.int64)])
        exp = torch.cat([exp[:kept], torch.full((spare,), -1, dtype=torch.int64)])
        routed = torch.arange(n_rows) < kept
    row_map = torch.full((T + 1, E), -1, dtype=torch.int32)
    row_map[T] = 0
    r = torch.arange(kept)
    row_map[idx[:kept], exp[:kept]] = torch.where(routed[:kept], r, -2 - r).to(torch.int32)
    row_map[T, 0] = kept
    rm_kept = torch.zeros(T, E, dtype=torch.bool)
    live = routed[:kept]
    rm_kept[idx[:kept][live], exp[:kept][live]] = True
    return SeedLayout(n_rows, kept, idx, exp, routed, row_map, rm_kept)


def _seed_permute64(x64, p64, rm, n_out, dp, lay: SeedLayout):
    """The seed's permute on fp64 inputs, cut to num_out_tokens rows (spare rows zero, prob 0). Differentiable."""
    out, pp, _ = SEED.permute(x64, rm, p64, n_out, drop_and_pad=dp)
    if not dp:
        spare = lay.n_rows - lay.kept
        out = torch.cat([out[: lay.kept], out.new_zeros((spare, x64.shape[1]))])
        if pp is not None:
            pp = torch.cat([pp[: lay.kept], pp.new_zeros(spare)])
    return out, pp


def _seed_unpermute64(y64, p64, rm, dp, lay: SeedLayout, path: str, T: int, H: int):
    """The seed's unpermute on fp64 rows y64 [n_rows, H] as moe_raw's contract reads them: the fused and
    routing_map paths skip spare rows (and, with probs, padding rows and dropped pairs); the bare-index path is the
    seed's scatter_add of every row. Differentiable."""
    if T == 0:
        return y64.new_zeros((0, H))
    if path == "csr":
        return SEED.unpermute(y64, lay.idx, (T, H))
    rows, idx = y64[: lay.kept], lay.idx[: lay.kept]
    if p64 is None:
        return SEED.unpermute(rows, idx, (T, H))
    if dp:
        return SEED.unpermute(y64, lay.idx, (T, H), p64, rm, drop_and_pad=True)
    return SEED.unpermute(rows, idx, (T, H), p64, lay.rm_kept)


def _max_rows_per_token(idx: torch.Tensor, T: int) -> int:
    return int(torch.bincount(idx, minlength=max(T, 1)).max()) if idx.numel() else 0


def check_dispatch(c: DispatchCase, device: torch.device) -> None:
    """permute (forward + backward) and unpermute (forward + backward) of one drawn case on `device`."""
    gen = torch.Generator().manual_seed(c.seed)
    T, E, H, dtype, pdtype = c.T, c.E, c.H, c.dtype, c.pdtype
    rm = _routing_bool(c, gen)
    n_out = _num_out(c, rm)
    dp = c.mode == "drop_and_pad"
    differentiable = dtype in FLOATS

    # Inputs: values made on the CPU, laid out on the device.
    x_cpu = (torch.randn(T, H, generator=gen) * c.scale).to(dtype)
    if not differentiable:
        x_cpu = torch.randint(-128, 128, (T, H), generator=gen).to(torch.int8).view(torch.uint8).view(dtype)
    p_clean = None
    if pdtype is not None:
        logits = torch.randn(T, E, generator=gen).masked_fill(~rm, float("-inf"))
        p_clean = torch.softmax(logits, dim=1).nan_to_num(0.0).masked_fill(~rm, 0.0).to(pdtype)
    p_user = None if p_clean is None else p_clean.masked_fill(~rm, float("nan")) if c.nan_off_route else p_clean
    rm_typed = _typed_map(rm, c.map_dtype, gen)
    if c.same_row and T:
        rm_dev = rm_typed[:1].to(device).expand(T, E)  # stride (0, 1)
    else:
        rm_dev = _layout(rm_typed.to(device), c.map_layout)
    x_dev = _layout(x_cpu.to(device), c.x_layout) if differentiable else x_cpu.to(device)
    p_dev = None if p_user is None else _layout(p_user.to(device), c.p_layout)

    # The oracle: the seed's layout and values (fp64), and moe_raw.reference in fp64 agreeing with them bit for bit.
    lay = _seed_layout(rm, n_out, dp)
    n_rows = {"none": int(rm.sum()), "drop_and_pad": E * min((n_out or 0) // E, T)}.get(c.mode, n_out)
    assert lay.n_rows == n_rows, "the seed's layout disagrees with the contract's size"
    x64 = (x_cpu if differentiable else x_cpu.view(torch.uint8)).to(F64)  # 1-byte dtypes: their bytes
    p64 = None if p_clean is None else p_clean.to(F64)
    out64, pp64 = _seed_permute64(x64, p64, rm, n_out, dp, lay)
    ref_out, ref_pp, ref_idx = R.permute(x64, rm_typed, p64, n_out, False, dp)
    ref_map = R.permute(x64, rm_typed, p64, n_out, True, dp)[2]
    assert_exact(ref_out, out64, "oracle: reference permute vs the seed's rows")
    assert_exact(ref_idx, lay.idx, "oracle: reference sorted_indices vs the seed's")
    assert_exact(ref_map, lay.row_map, "oracle: reference row map vs the seed's layout")
    if p64 is not None:
        assert_exact(ref_pp, pp64, "oracle: reference permuted probs vs the seed's")

    # permute forward: pure moves, bit-exact.
    _poison(device, n_rows * H * x_dev.element_size(), n_rows * 8, (T + 1) * E * 4)
    out, pp, index = moe_raw.permute(x_dev, rm_dev, p_dev, n_out, c.fused, dp)
    assert_exact(out, ref_out.to(dtype) if differentiable else ref_out.to(torch.uint8).view(dtype), "permuted tokens")
    assert out.shape == (n_rows, H)
    if p_dev is None:
        assert pp is None, "permuted_probs must be None without probs"
    else:
        assert_exact(pp, ref_pp.to(pdtype), "permuted probs")
    if c.fused:
        assert_exact(index, lay.row_map, "row map")
        assert int(index[T, 0]) == lay.kept
    else:
        assert_exact(index, lay.idx, "sorted_indices")
    if not differentiable:
        return

    # permute backward: d tokens sums each token's rows (routed and padding) in fp32; d probs is a pure move.
    xl = x_dev.detach().requires_grad_("x" in c.need)
    pl = None if p_dev is None else p_dev.detach().requires_grad_("p" in c.need)
    if c.need:
        out_g, pp_g, index_g = moe_raw.permute(xl, rm_dev, pl, n_out, c.fused, dp)
        assert_exact(out_g.detach(), out, "permuted tokens under autograd")
        assert_exact(index_g, index, "index under autograd")
        g_out = _layout(torch.randn(n_rows, H, generator=gen).to(dtype).to(device), c.g_layout)
        g_pp = None if pl is None else _layout(torch.randn(n_rows, generator=gen).to(pdtype).to(device), c.g_layout)
        dx, dpr = _autograd([out_g, pp_g], [g_out, g_pp], [xl, pl])
        x64g = x64.clone().requires_grad_("x" in c.need)
        p64g = None if p64 is None else p64.clone().requires_grad_("p" in c.need)
        o64, q64 = _seed_permute64(x64g, p64g, rm, n_out, dp, lay)
        g_out64 = g_out.cpu().double()
        g_pp64 = None if g_pp is None else g_pp.cpu().double()
        dx64, dp64 = _autograd([o64, q64], [g_out64, g_pp64], [x64g, p64g])
        if "x" in c.need:
            rows = lay.idx[: lay.kept]
            abs_sum = torch.zeros(T, H, dtype=F64).index_add_(0, rows, g_out64[: lay.kept].abs())
            acc = EPS64 if dtype == F64 else EPS32
            bound = _rounding_bound(dx64, dtype, acc, abs_sum, _max_rows_per_token(rows, T))
            assert dx.dtype == dtype
            _within(dx, dx64, bound, "permute backward: d tokens")
        if pl is not None and "p" in c.need:
            # The seed's padding rows read probs off-route; moe_raw's padding rows have prob 0 (no gradient).
            assert_exact(dpr, torch.where(rm, dp64, 0.0).to(pdtype), "permute backward: d probs")

    # unpermute forward: random expert outputs; spare rows NaN where the path must skip them.
    y_cpu = (torch.randn(n_rows, H, generator=gen) * c.scale).to(dtype)
    if c.nan_spare:
        y_cpu[lay.kept :] = float("nan")
    y_dev = _layout(y_cpu.to(device), c.y_layout)
    up_dev = p_dev if c.uprobs else None
    up64 = p64 if c.uprobs else None
    rm_arg = rm_dev.clone() if c.fresh_map else rm_dev
    idx_arg = index.to(torch.int32) if c.index_i32 else index

    def run(yy, pp_):
        if c.path == "fused":
            return moe_raw.unpermute(yy, index, (T, H), pp_, fused=True, drop_and_pad=dp)
        if c.path == "map":
            return moe_raw.unpermute(yy, idx_arg, (T, H), pp_, rm_arg, drop_and_pad=dp)
        return moe_raw.unpermute(yy, idx_arg, (T, H), drop_and_pad=dp)

    y64 = y_cpu.to(F64)
    ref64 = _seed_unpermute64(y64, up64, rm, dp, lay, c.path, T, H)
    # Magnitudes of the summed terms, and how many a token has (an upper bound: every row of the token).
    abs_sum = _seed_unpermute64(
        y64.abs().nan_to_num(0.0), None if up64 is None else up64.abs(), rm, dp, lay, c.path, T, H
    )
    terms = _max_rows_per_token(lay.idx, T)
    if E * max(T, 1) * H <= 4_000_000:  # the reference's fp64 loop over experts, where it is cheap
        ref_r = R.unpermute(y64, lay.row_map if c.fused else lay.idx, (T, H), up64, None if c.path == "csr" else rm,
                            c.fused, dp)  # fmt: skip
        _within(ref_r, ref64, 4 * (terms + 2) * EPS64 * abs_sum + 1e-300, "oracle: reference unpermute vs the seed")
    _poison(device, T * H * y_dev.element_size())
    y_out = run(y_dev, up_dev)
    assert y_out.dtype == dtype and y_out.shape == (T, H)
    if dtype == F64:
        acc = EPS64
    elif device.type == "cpu" and c.path == "csr":  # CPU tensors, no row map: the seed's scatter_add in the dtype
        acc = 2 * HALF_ULP[dtype]
    else:  # fp32 accumulation (README)
        acc = EPS32
    _within(y_out, ref64, _rounding_bound(ref64, dtype, acc, abs_sum, terms), f"unpermute[{c.path}] forward")

    # Invariant: unpermute(permute(x)) without probs is x times the token's row count (routed + padding rows).
    if c.path != "csr":
        rt = run(out, None)
        count = torch.bincount(lay.idx[: lay.kept], minlength=T).to(F64).unsqueeze(1)[:T]
        rt64 = x64 * count
        _within(rt, rt64, _rounding_bound(rt64, dtype, EPS32, rt64.abs(), terms), "unpermute(permute(x))")

    # unpermute backward: d rows = g[token] (* prob); d probs[t, e] = dot(g[t], y[row]) over H, exactly 0 off-route
    # and for dropped pairs.
    if not c.uneed:
        return
    yl = y_dev.detach().requires_grad_("y" in c.uneed)
    upl = None if up_dev is None else up_dev.detach().requires_grad_("p" in c.uneed)
    if not (yl.requires_grad or (upl is not None and upl.requires_grad)):
        return
    g = _layout(torch.randn(T, H, generator=gen).to(dtype).to(device), c.g_layout)
    y_out_g = run(yl, upl)
    assert_exact(y_out_g.detach(), y_out, "unpermute under autograd")
    dy, dup = _autograd([y_out_g], [g], [yl, upl])
    y64g = y64.clone().requires_grad_("y" in c.uneed)
    up64g = None if up64 is None else up64.clone().requires_grad_("p" in c.uneed)
    g64 = g.cpu().double()
    dy64, dup64 = _autograd([_seed_unpermute64(y64g, up64g, rm, dp, lay, c.path, T, H)], [g64], [y64g, up64g])
    if yl.requires_grad:
        assert dy.dtype == dtype
        if up64 is None:
            assert_exact(dy, dy64.to(dtype), f"unpermute[{c.path}] backward: d rows (copies of the tokens' grads)")
        else:
            bound = (HALF_ULP[dtype] + 2 * (EPS64 if dtype == F64 else EPS32)) * dy64.abs() + FLOOR[dtype]
            _within(dy, dy64, bound, f"unpermute[{c.path}] backward: d rows")
    if upl is not None and upl.requires_grad:
        assert dup.dtype == pdtype
        dup64 = torch.where(rm, dup64, 0.0)  # the seed's padding rows read probs off-route
        live = lay.kept
        dot_abs = torch.zeros(T, E, dtype=F64)
        sel = lay.routed[:live]
        tok, ex = lay.idx[:live][sel], lay.exp[:live][sel]
        if tok.numel():
            dot_abs[tok, ex] = (g64.abs()[tok] * y64[:live][sel].abs()).sum(1)
        acc = EPS64 if (dtype == F64 and pdtype == F64) else EPS32
        bound = HALF_ULP[pdtype] * (dup64.abs() + 1e-300) + 2 * (math.sqrt(H) + 8) * acc * dot_abs + FLOOR[pdtype]
        _within(dup, dup64, bound, f"unpermute[{c.path}] backward: d probs")
        off = ~lay.rm_kept
        assert (dup.cpu()[off] == 0).all(), "unpermute d probs must be exactly 0 off-route and for dropped pairs"


@_examples(10.0)  # ~10 ms an example: ci draws 400
@given(case=dispatch_cases(CPU_LIMITS))
def test_dispatch_cpu_vs_seed(case):
    """CPU profile: moe_raw.permute / unpermute on CPU tensors vs the seed's code in fp64 (and the contract)."""
    check_dispatch(case, torch.device("cpu"))


@pytest.mark.gpu
@needs_cuda
@_examples()
@given(case=dispatch_cases(GPU_LIMITS))
def test_dispatch_gpu_vs_fp64(case):
    """GPU profile: moe_raw's permute / unpermute kernels vs the fp64 reference and the seed on the CPU."""
    check_dispatch(case, torch.device("cuda"))


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU family


@dataclass(frozen=True)
class SwigluCase:
    N: int
    F: int
    lead: int  # 0: 2-D [N, 2F]; s > 0: 3-D [s, N / s, 2F] for swiglu, swiglu_back and weighted_bias_swiglu_impl
    dtype: torch.dtype
    gdtype: torch.dtype
    wdtype: torch.dtype
    y_layout: str
    g_layout: str
    w_layout: str
    scale: float
    api: str  # impl / function: the autograd entry point
    fp8: bool
    seed: int


@st.composite
def swiglu_cases(draw, lim: Limits) -> SwigluCase:
    lead = draw(st.sampled_from((0, 0, 1, 2, 3, 4)))
    if lead:
        N = lead * draw(st.integers(1, lim.n_max // lead))
    else:
        N = draw(_int_or_special(0, lim.n_max, SPECIAL_N))
    f_hi = min(lim.f_max, max(1, lim.swiglu_elems // max(N, 1)))
    # Half rows of a multiple of 16 bytes take the 16-byte-vector kernels (if aligned), others the element kernels.
    F = draw(st.one_of(_int_or_special(1, f_hi, SPECIAL_F), st.integers(1, max(1, f_hi // 8)).map(lambda k: 8 * k)))
    F = min(F, f_hi)
    dtype = draw(st.sampled_from(lim.swiglu_dtypes))
    return SwigluCase(
        N=N, F=F, lead=lead, dtype=dtype,
        gdtype=draw(st.sampled_from((dtype, dtype, dtype, F32, F16, BF16, F64))),
        wdtype=draw(st.sampled_from((F32, F32, dtype, dtype, F16, BF16, F64))),
        y_layout=draw(st.sampled_from(("contig", "contig", "pad", "pad_odd", "col_major"))),
        g_layout=draw(st.sampled_from(G_LAYOUTS)),
        w_layout=draw(st.sampled_from(("contig", "contig", "pad_odd", "row_bcast", "ones"))),
        scale=draw(st.sampled_from((2.0, 2.0, 0.5, 4.0))),
        api=draw(st.sampled_from(("impl", "function"))),
        fp8=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _err(x, ref) -> float:
    return (x.detach().cpu().double() - ref).abs().max().item() if x.numel() else 0.0


def _swiglu_close(out, ref64, torch_same, what: str) -> None:
    """conftest.assert_close_2x's rule: |out - ref64| <= 2 |torch in the same dtypes - ref64| + half an ulp."""
    assert out.dtype == torch_same.dtype, f"{what}: dtype {out.dtype} != {torch_same.dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * _err(torch_same, ref64) + (HALF_ULP[out.dtype] + 1e-7) * scale
    assert _err(out, ref64) <= bound, f"{what}: err {_err(out, ref64):.3g} > bound {bound:.3g}"


def _dw_close(dw, dw64, dw_torch, terms64, what: str) -> None:
    """dweights sums F products: the 2x rule, or the worst-case error of moe_raw's fp32 reduction order (F / 32
    terms per lane, then a 5-level tree; plus each product's rounding), whichever is larger (as
    conftest.assert_dw_close)."""
    assert dw.dtype == dw_torch.dtype and dw.shape == dw64.shape, what
    depth = terms64.shape[-1] // 32 + 10
    bound_rows = depth * U32 * terms64.abs().sum(-1, keepdim=True) + HALF_ULP[dw.dtype] * dw64.abs()
    torch_err = _err(dw_torch, dw64)
    err_rows = (dw.detach().cpu().double() - dw64).abs()
    ok = err_rows <= torch.maximum(bound_rows, torch.full_like(bound_rows, 2 * torch_err)) + 1e-30
    assert bool(ok.all()), f"{what}: err {err_rows.max().item():.3g}, torch err {torch_err:.3g}"


from conftest import simulator_shared_memory_lock as _simulator_shared_memory_lock  # noqa: E402


@contextlib.contextmanager
def _kernel_launches(device: torch.device):
    """Count moe_raw's SwiGLU kernel launches; on the CPU, run the kernels under the CUDA simulator (the dispatch
    rule of ``_on_kernels`` without its is_cuda test, as the kernels fixture of tests/conftest.py does)."""
    launches = []
    launch = GL._launch_kernel

    def spy(spec, *args):
        launches.append(spec)
        return launch(spec, *args)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(GL, "_launch_kernel", spy))
        if device.type == "cpu":

            def on_kernels(y, g=None, weights=None):
                return all(t is None or t.dtype in GL._CODE for t in (y, g, weights))

            stack.enter_context(mock.patch.object(GL, "_on_kernels", on_kernels))
            stack.enter_context(_simulator_shared_memory_lock())
            # The simulator's block manager polls its threads holding the GIL: a short switch interval is faster.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)
            stack.callback(sys.setswitchinterval, interval)
        yield launches


def check_swiglu(c: SwigluCase, device: torch.device) -> None:
    """Every SwiGLU op (forward, backward, autograd with and without fp8_input_store) of one drawn case."""
    gen = torch.Generator().manual_seed(c.seed)
    N, F = c.N, c.F
    y_cpu = (torch.randn(N, 2 * F, generator=gen) * c.scale).to(c.dtype)
    g_cpu = torch.randn(N, F, generator=gen).to(c.gdtype)
    w_cpu = torch.rand(N, 1, generator=gen).to(c.wdtype)
    y = _layout(y_cpu.to(device), c.y_layout)
    g = _layout(g_cpu.to(device), c.g_layout)
    w = _layout(w_cpu.to(device), c.w_layout)
    shape3 = (c.lead, N // c.lead) if c.lead else None
    # Oracle inputs: exactly the values the ops read (the layouts above can change them: broadcast grads).
    y64, g64, w64 = y.cpu().double(), g.cpu().double(), w.cpu().double()
    y_t, g_t, w_t = y.cpu(), g.cpu(), w.cpu()  # the same-dtype torch reference
    kernel_dtypes = c.dtype in GL._CODE

    with _kernel_launches(device) as launches:
        # Weights absent: swiglu and swiglu_back (2-D, or 3-D views of the same rows).
        if shape3:  # [s, b, 2F] views of the same rows (a row-strided 2-D tensor views as 3-D without a copy)
            y3 = y.view(*shape3, 2 * F) if y.stride(-1) == 1 else y.reshape(*shape3, 2 * F)
            g3 = g.reshape(*shape3, F)
            _swiglu_close(S.swiglu(y3), R.swiglu(y64).view(*shape3, F), R.swiglu(y_t).view(*shape3, F), "swiglu 3-D")
            dy3_ref = R.swiglu_back(g64, y64).view(*shape3, 2 * F)
            _swiglu_close(S.swiglu_back(g3, y3), dy3_ref, R.swiglu_back(g_t, y_t).view(*shape3, 2 * F), "back 3-D")
        else:
            _swiglu_close(S.swiglu(y), R.swiglu(y64), R.swiglu(y_t), "swiglu")
            _swiglu_close(S.swiglu_back(g, y), R.swiglu_back(g64, y64), R.swiglu_back(g_t, y_t), "swiglu_back")
        ws_ref = R.weighted_swiglu(y64, w64)
        _swiglu_close(S.weighted_swiglu(y, w), ws_ref, R.weighted_swiglu(y_t, w_t), "weighted_swiglu")
        dy, dw = S.weighted_swiglu_back(g, y, w)
        dy_t, dw_t = R.weighted_swiglu_back(g_t, y_t, w_t)
        dy_r, dw_r = R.weighted_swiglu_back(g64, y64, w64)
        _swiglu_close(dy, dy_r, dy_t, "weighted_swiglu_back dy")
        _dw_close(dw, dw_r, dw_t, R.swiglu(y64) * g64, "weighted_swiglu_back dweights")

        # Autograd: weighted_bias_swiglu_impl (2-D or 3-D) or the Function itself, upstream grad in y.dtype.
        gy = g.to(c.dtype)
        wl = w.detach().requires_grad_()
        if c.api == "impl":
            yl = (y3 if shape3 else y).detach().requires_grad_()
            out = S.weighted_bias_swiglu_impl(yl, wl, c.fp8)
            out.backward(gy.reshape(out.shape))
        else:
            yl = y.detach().requires_grad_()
            out = S.WeightedSwiGLUFunction.apply(yl, wl, c.fp8)
            out.backward(gy)
        _swiglu_close(out.reshape(N, F), ws_ref, R.weighted_swiglu(y_t, w_t), f"{c.api} forward")
        y_saved = y_t.to(torch.float8_e4m3fn).to(c.dtype) if c.fp8 else y_t
        gy64 = gy.cpu().double()
        dy_r, dw_r = R.weighted_swiglu_back(gy64, y_saved.double(), w64)
        yr, wr = y_saved.clone().requires_grad_(), w_t.clone().requires_grad_()
        R.WeightedSwiGLUFunction.apply(yr, wr, False).backward(gy.cpu())
        _swiglu_close(yl.grad.reshape(N, 2 * F), dy_r, yr.grad, f"{c.api} d input")
        _dw_close(wl.grad, dw_r, wr.grad, R.swiglu(y_saved.double()) * gy64, f"{c.api} d weights")
    if kernel_dtypes and N:
        assert launches, "no SwiGLU kernel ran"


@pytest.mark.extras
@needs_sim
@_examples(1.0)  # ~0.1 s an example under the simulator
@given(case=swiglu_cases(CPU_LIMITS))
def test_swiglu_family_simulated_kernels(case):
    """CPU profile: the Numba kernels under the CUDA simulator on CPU tensors (tiny shapes) vs the fp64 reference."""
    check_swiglu(case, torch.device("cpu"))


@pytest.mark.gpu
@needs_cuda
@_examples()
@given(case=swiglu_cases(GPU_LIMITS))
def test_swiglu_family_gpu_vs_fp64(case):
    """GPU profile: the SwiGLU kernels vs the fp64 reference on the CPU."""
    check_swiglu(case, torch.device("cuda"))
