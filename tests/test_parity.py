"""Parity of every public op across devices, generated over ``moe_raw.__all__`` (issue 13).

For each public name a table of cases (empty T = 0 / N = 0 / K = 0, tiny, odd sizes, non-contiguous inputs) is run
once for every subset of its differentiable inputs requiring grad. Each run records the outputs (dtype, shape,
values, whether they require grad) and, through a loss over every float output, the gradient of each input that
required grad. Then:

* always (CI): the CPU run equals the torch reference (``moe_raw.reference``: the seed's semantics) run on the same
  inputs through torch's own autograd: bit for bit for pure moves, else within ``TOL`` of the reference in fp64.
  An empty-batch gradient the reference drops (it returns a fresh tensor) counts as zeros there, and moe_raw must
  give it: every input that requires grad gets a gradient of its own shape and dtype.
* with CUDA (the GPU machine): the CUDA run equals the CPU run: the same outputs (bit for bit for moves), the same
  outputs requiring grad, the same inputs receiving gradients, the same gradient shapes, dtypes and values.
* under the CUDA simulator (CPU CI), the activation kernels run on CPU tensors and must equal the CPU path too.

And in every run: an output requires grad exactly when some input does (integer outputs never).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_probs, make_routing

import moe_raw
from moe_raw import reference as R
from moe_raw import reference_fp8 as RF

HAS_CUDA = torch.cuda.is_available()
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# Arithmetic results, by the case's working dtype (its least precise float input), relative to max(1, |expected|):
# CUDA vs CPU: both compute in fp32 and round once, so about one rounding of the working dtype apart (TOL).
# vs the fp64 reference: flash-attention's rule, |moe_raw - ref64| <= 2 |reference in the same dtype - ref64| + FLOOR
# (the floor covers a same-dtype reference that lands exactly by luck).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@dataclass
class Case:
    """One call of a public op. ``make()`` builds CPU inputs (seeded); ``views`` maps an input name to the view
    applied to its leaf (non-contiguous inputs keep their strides while requiring grad); ``call(inputs)`` runs
    moe_raw, ``ref(inputs)`` the torch reference, each returning a tuple of tensors / None."""

    op: str
    name: str
    make: Callable[[], dict]
    call: Callable[[dict], tuple]
    ref: Callable[[dict], tuple] | None  # None: the reference cannot run this case (only devices are compared)
    diff: tuple = ()
    exact: bool = False
    views: dict = field(default_factory=dict)
    kernels: bool = False  # an activation: also run through the Numba kernels under the simulator

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _routing(t, e, k, kind="topk"):
    return make_routing(t, e, k, kind=kind)


def _tokens(t, h, dtype):
    return torch.randn(t, h).to(dtype)


def _padded_view(cols):
    """A view of a [.., cols + 3] leaf: rows strided, last dim contiguous."""
    return lambda x: x[..., :cols]


def _transposed_view(x):
    """The leaf holds x.T (contiguous); the view is x with unit row stride and a column stride (not row-major)."""
    return x.T


def _routed(routing_map) -> int:
    return int(routing_map.sum())


# ---------------------------------------------------------------------------------------------------------------
# Case tables


def _permute_cases():
    cases = []
    # (name, T, E, K, routing kind, num_out_tokens rule, fused, drop_and_pad, probs, dtype, non-contiguous)
    table = [
        ("basic", 7, 4, 2, "topk", "none", False, False, True, torch.bfloat16, False),
        ("fused-strided", 7, 4, 2, "topk", "none", True, False, True, torch.bfloat16, True),
        ("more-rows", 7, 4, 2, "sparse", "more", False, False, True, torch.float32, False),
        ("fewer-rows", 7, 4, 2, "sparse", "fewer", True, False, True, torch.float16, False),
        ("drop-pad", 7, 4, 2, "topk", "cap", False, True, True, torch.bfloat16, False),
        ("drop-pad-fused", 7, 4, 2, "empty_expert", "cap", True, True, True, torch.float32, True),
        ("no-probs", 7, 4, 2, "topk", "none", False, False, False, torch.bfloat16, False),
        ("one-token", 1, 1, 1, "topk", "none", False, False, True, torch.float32, False),
        ("T0", 0, 4, 2, "topk", "none", False, False, True, torch.bfloat16, False),
        ("T0-fused-rows", 0, 4, 2, "topk", "more", True, False, True, torch.float32, False),
        ("T0-drop-pad", 0, 4, 2, "topk", "cap", False, True, True, torch.float32, False),
        ("N0", 7, 4, 2, "topk", "zero", False, False, True, torch.bfloat16, False),
        ("N0-fused", 7, 4, 2, "topk", "zero", True, False, True, torch.float32, False),
        ("K0", 5, 4, 0, "topk", "none", True, False, True, torch.float32, False),
    ]
    for name, t, e, k, kind, rule, fused, dnp, with_probs, dtype, strided in table:
        h = 9  # odd: no vector width divides the row

        def make(t=t, e=e, k=k, kind=kind, rule=rule, with_probs=with_probs, dtype=dtype, strided=strided, h=h):
            rm = _routing(t, e, k, kind)
            n = {"none": None, "more": _routed(rm) + 3, "fewer": max(_routed(rm) - 3, 0), "zero": 0,
                 "cap": t * k}[rule]  # fmt: skip
            x = _tokens(t, h + 3 if strided else h, dtype)
            p = make_probs(rm, torch.float32, off_route=float("nan") if with_probs else 0.0) if with_probs else None
            return {"tokens": x, "routing_map": rm, "probs": p, "num_out_tokens": n}

        def call(i, fused=fused, dnp=dnp):
            return moe_raw.permute(i["tokens"], i["routing_map"], i["probs"], i["num_out_tokens"], fused, dnp)

        def ref(i, fused=fused, dnp=dnp):
            return R.permute(i["tokens"], i["routing_map"], i["probs"], i["num_out_tokens"], fused, dnp)

        diff = ("tokens", "probs") if with_probs else ("tokens",)
        views = {"tokens": _padded_view(h)} if strided else {}
        cases.append(Case("permute", name, make, call, ref, diff, exact=True, views=views))
    return cases


def _unpermute_cases():
    cases = []
    # (name, T, E, K, kind, num_out rule, fused, drop_and_pad, probs, with routing_map, dtype, strided)
    table = [
        ("probs", 7, 4, 2, "topk", "none", False, False, True, True, torch.bfloat16, False),
        ("fused-probs", 7, 4, 2, "sparse", "more", True, False, True, False, torch.float32, True),
        ("fused-no-probs", 7, 4, 3, "topk", "fewer", True, False, False, False, torch.float16, False),
        ("csr", 7, 4, 2, "topk", "none", False, False, False, False, torch.bfloat16, False),
        ("map-no-probs", 7, 4, 2, "sparse", "more", False, False, False, True, torch.float32, False),
        ("drop-pad", 7, 4, 2, "topk", "cap", False, True, True, True, torch.bfloat16, False),
        ("drop-pad-fused", 7, 4, 2, "topk", "cap", True, True, False, False, torch.float32, False),
        ("T0", 0, 4, 2, "topk", "none", False, False, True, True, torch.bfloat16, False),
        ("T0-fused", 0, 4, 2, "topk", "more", True, False, True, False, torch.float32, False),
        ("T0-csr", 0, 4, 2, "topk", "none", False, False, False, False, torch.float32, False),
        ("N0", 7, 4, 2, "topk", "zero", False, False, True, True, torch.bfloat16, False),
        ("N0-fused", 7, 4, 2, "topk", "zero", True, False, True, False, torch.float32, False),
        ("K0", 5, 4, 0, "topk", "none", True, False, True, False, torch.float32, False),
    ]
    for name, t, e, k, kind, rule, fused, dnp, with_probs, with_map, dtype, strided in table:
        h = 9

        def make(t=t, e=e, k=k, kind=kind, rule=rule, fused=fused, dnp=dnp, with_probs=with_probs, dtype=dtype,
                 strided=strided, h=h):  # fmt: skip
            rm = _routing(t, e, k, kind)
            n = {"none": None, "more": _routed(rm) + 3, "fewer": max(_routed(rm) - 3, 0), "zero": 0,
                 "cap": t * k}[rule]  # fmt: skip
            _, _, index = R.permute(torch.zeros(t, 1), rm, None, n, fused, dnp)
            rows = index.shape[0] if not fused else (R.build_row_map(rm, n, dnp)[1])
            p = make_probs(rm, torch.float32, off_route=float("nan")) if with_probs else None
            return {"permuted": _tokens(rows, h + 3 if strided else h, dtype), "index": index, "T": t, "H": h,
                    "probs": p, "routing_map": rm}  # fmt: skip

        def call(i, fused=fused, dnp=dnp, with_map=with_map):
            rm = i["routing_map"] if with_map else None
            return (moe_raw.unpermute(i["permuted"], i["index"], (i["T"], i["H"]), i["probs"], rm, fused, dnp),)

        def ref(i, fused=fused, dnp=dnp, with_map=with_map):
            rm = i["routing_map"] if with_map else None
            return (R.unpermute(i["permuted"], i["index"], (i["T"], i["H"]), i["probs"], rm, fused, dnp),)

        diff = ("permuted", "probs") if with_probs else ("permuted",)
        views = {"permuted": _padded_view(h)} if strided else {}
        cases.append(Case("unpermute", name, make, call, ref, diff, views=views))

    def make_oob():
        return {"permuted": _tokens(4, 5, torch.float32), "index": torch.tensor([0, 5, -1, 2]), "T": 3, "H": 5}

    def call_oob(i):
        return (moe_raw.unpermute(i["permuted"], i["index"], (i["T"], i["H"])),)

    def ref_oob(i):  # the documented behaviour: rows outside [0, T) are summed into no token
        keep = (i["index"] >= 0) & (i["index"] < i["T"])
        return (R.unpermute(i["permuted"][keep], i["index"][keep], (i["T"], i["H"])),)

    cases.append(Case("unpermute", "index-out-of-range", make_oob, call_oob, ref_oob, ("permuted",)))
    return cases


def _sort_chunks_cases():
    cases = []
    for name, sizes, order, with_probs, dtype in [
        ("probs", [2, 0, 3, 1], [2, 0, 3, 1], True, torch.bfloat16),
        ("tail-rows", [1, 2], [1, 0], False, torch.float32),
        ("N0", [0, 0], [1, 0], True, torch.float32),
    ]:
        n = sum(sizes) + (2 if name == "tail-rows" else 0)

        def make(sizes=sizes, order=order, with_probs=with_probs, dtype=dtype, n=n):
            return {"input": _tokens(n, 5, dtype), "split_sizes": torch.tensor(sizes),
                    "sorted_idxs": torch.tensor(order), "probs": torch.rand(n) if with_probs else None}  # fmt: skip

        def call(i):
            return moe_raw.sort_chunks_by_idxs(i["input"], i["split_sizes"], i["sorted_idxs"], i["probs"])

        def ref(i):
            return R.sort_chunks_by_idxs(i["input"], i["split_sizes"].cpu(), i["sorted_idxs"].cpu(), i["probs"])

        diff = ("input", "probs") if with_probs else ("input",)
        cases.append(Case("sort_chunks_by_idxs", name, make, call, ref, diff, exact=True))
    return cases


def _topk(t, e, k, dropped=False):
    idx = torch.rand(t, e).topk(k, dim=1).indices if t and k else torch.zeros(t, k, dtype=torch.int64)
    if dropped and t:
        idx[::3, -1] = -1  # capacity-dropped slots
    return idx, torch.rand(t, k)


def _dense(idx, e, topk_probs):
    """The dense form of top-k routing in torch (the reference for the top-k ops): -1 entries are unrouted."""
    t = idx.shape[0]
    slots = torch.where(idx >= 0, idx, e).long()
    rm = torch.zeros(t, e + 1, dtype=torch.bool, device=idx.device).scatter(1, slots, True)[:, :e]
    probs = None
    if topk_probs is not None:
        probs = torch.zeros(t, e + 1, dtype=topk_probs.dtype, device=idx.device).scatter(1, slots, topk_probs)[:, :e]
    return rm, probs


def _topk_cases():
    cases = []
    for name, t, e, k, dropped in [("basic", 7, 5, 2, True), ("T0", 0, 4, 2, False), ("K0", 4, 4, 0, False)]:

        def make(t=t, e=e, k=k, dropped=dropped):
            idx, p = _topk(t, e, k, dropped)
            return {"topk_indices": idx, "E": e, "topk_probs": p, "tokens": _tokens(t, 9, torch.bfloat16)}

        cases.append(Case(
            "topk_to_routing", name, make,
            lambda i: moe_raw.topk_to_routing(i["topk_indices"], i["E"], i["topk_probs"]),
            lambda i: _dense(i["topk_indices"], i["E"], i["topk_probs"]), ("topk_probs",), exact=True,
        ))  # fmt: skip
        for fused in (False, True):
            cases.append(Case(
                "permute_topk", f"{name}-{'fused' if fused else 'unfused'}", make,
                lambda i, fused=fused: moe_raw.permute_topk(
                    i["tokens"], i["topk_indices"], i["E"], i["topk_probs"], fused=fused
                ),
                lambda i, fused=fused: R.permute(
                    i["tokens"], *_dense(i["topk_indices"], i["E"], i["topk_probs"]), fused=fused
                ),
                ("tokens", "topk_probs"), exact=True,
            ))  # fmt: skip

            def make_un(t=t, e=e, k=k, dropped=dropped, fused=fused):
                idx, p = _topk(t, e, k, dropped)
                rm, _ = _dense(idx, e, None)
                _, _, index = R.permute(torch.zeros(t, 1), rm, fused=fused)
                return {"permuted": _tokens(index.shape[0] if not fused else _routed(rm), 6, torch.float32),
                        "index": index, "T": t, "topk_indices": idx, "E": e, "topk_probs": p}  # fmt: skip

            cases.append(Case(
                "unpermute_topk", f"{name}-{'fused' if fused else 'unfused'}", make_un,
                lambda i, fused=fused: (moe_raw.unpermute_topk(
                    i["permuted"], i["index"], (i["T"], 6), i["topk_probs"], i["topk_indices"], i["E"], fused
                ),),
                lambda i, fused=fused: (R.unpermute(
                    i["permuted"], i["index"], (i["T"], 6), *reversed(_dense(i["topk_indices"], i["E"],
                                                                            i["topk_probs"])), fused=fused,
                ),),
                ("permuted", "topk_probs"),
            ))  # fmt: skip
    return cases


def _padding_cases():
    cases = []
    for name, t, e, k, kind, align, rule, with_probs in [
        ("basic", 7, 4, 2, "topk", 4, "none", True),
        ("capped", 7, 4, 2, "empty_expert", 8, "fewer", False),
        ("T0", 0, 4, 2, "topk", 4, "none", True),
        ("T0-rows", 0, 4, 2, "topk", 4, "more", True),
    ]:

        def make(t=t, e=e, k=k, kind=kind, rule=rule, with_probs=with_probs):
            rm = _routing(t, e, k, kind)
            n = {"none": None, "more": _routed(rm) + 3, "fewer": max(_routed(rm) - 3, 0)}[rule]
            p = make_probs(rm, torch.float32) if with_probs else None
            return {"tokens": _tokens(t, 9, torch.bfloat16), "routing_map": rm, "probs": p, "num_out_tokens": n}

        cases.append(Case(
            "permute_and_pad", name, make,
            lambda i, align=align: moe_raw.permute_and_pad(
                i["tokens"], i["routing_map"], i["probs"], align, i["num_out_tokens"]
            ),
            lambda i, align=align: R.permute_and_pad(
                i["tokens"], i["routing_map"], i["probs"], align, i["num_out_tokens"]
            ),
            ("tokens", "probs") if with_probs else ("tokens",), exact=True,
        ))  # fmt: skip
    for name, t, row_shape, aligned in [
        ("scales", 7, (), False),
        ("blocks", 7, (3,), True),
        ("T0", 0, (3,), False),
        ("empty-rows", 7, (0,), False),
    ]:

        def make(t=t, row_shape=row_shape, aligned=aligned):
            rm = _routing(t, 4, 2)
            if aligned:
                _, _, row_map, _, padded = R.permute_and_pad(torch.zeros(t, 1), rm, None, 4)
                rows = int(padded.sum())
            else:
                row_map, rows = R.build_row_map(rm, _routed(rm) + 2)
            return {"x": torch.randn(t, *row_shape), "row_map": row_map, "rows": rows}

        cases.append(Case(
            "permute_with_row_map", name, make,
            lambda i: (moe_raw.permute_with_row_map(i["x"], i["row_map"], i["rows"]),),
            lambda i: (R.permute_with_row_map(i["x"], i["row_map"], i["rows"]),), ("x",), exact=True,
        ))  # fmt: skip
    return cases


# Gated activations: (public names of forward, weighted forward, backward, weighted backward), keyword constants,
# and the reference's quick_glu constants.
_ACTS = {
    "swiglu": (("swiglu", "weighted_swiglu", "swiglu_back", "weighted_swiglu_back"), {}),
    "geglu": (("geglu", "weighted_geglu", "geglu_back", "weighted_geglu_back"), {}),
    "quick_geglu": (("quick_geglu", "weighted_quick_geglu", "quick_geglu_back", "weighted_quick_geglu_back"),
                    {"linear_offset": 0.5}),
    "clamped_swiglu": (("clamped_swiglu", "weighted_clamped_swiglu", "clamped_swiglu_back",
                        "weighted_clamped_swiglu_back"), {"alpha": 1.5, "limit": 2.0}),
}  # fmt: skip


def _act_inputs(n, f, dtype, lead=None, strided=False):
    shape = (*lead, 2 * f) if lead else (n, 2 * f)
    y = (torch.randn(*shape[:-1], shape[-1] + (4 if strided else 0)) * 3).to(dtype)
    g = torch.randn(*shape[:-1], f).to(dtype)
    w = torch.rand(n, 1)
    return {"y": y, "g": g, "weights": w}


def _activation_cases():
    cases = []
    shapes = [  # (name, N, F, dtype, leading dims, strided)
        ("bf16", 5, 8, torch.bfloat16, None, False),
        ("fp32-odd-strided", 3, 3, torch.float32, None, True),
        ("3d", 6, 4, torch.float16, (2, 3), False),
        ("N0", 0, 4, torch.bfloat16, None, False),
        ("F0", 3, 0, torch.float32, None, False),
    ]
    for names, kw in _ACTS.values():
        fwd, wfwd, bwd, wbwd = names
        for name, n, f, dtype, lead, strided in shapes:
            views = {"y": _padded_view(2 * f)} if strided else {}

            def make(n=n, f=f, dtype=dtype, lead=lead, strided=strided):
                return _act_inputs(n, f, dtype, lead, strided)

            def mk(op, args, wanted, kw=kw, name=name, make=make, views=views):
                return Case(
                    op, name, make,
                    lambda i, op=op: _as_tuple(getattr(moe_raw, op)(*(i[a] for a in args), **kw)),
                    lambda i, op=op: _as_tuple(getattr(R, op)(*(i[a] for a in args), **kw)),
                    wanted, views=views, kernels=True,
                )  # fmt: skip

            cases.append(mk(fwd, ("y",), ("y",)))
            cases.append(mk(bwd, ("g", "y"), ("g", "y")))
            if lead is None:
                cases.append(mk(wfwd, ("y", "weights"), ("y", "weights")))
                cases.append(mk(wbwd, ("g", "y", "weights"), ("g", "y", "weights")))
    # the autograd Functions and the *_impl wrappers (the training entry points)
    for name, n, f, dtype, lead, strided in shapes:

        def make_biased(n=n, f=f, dtype=dtype, lead=lead, strided=strided):
            i = _act_inputs(n, f, dtype, lead, strided)
            i["bias"] = torch.randn(2 * f).to(dtype)
            return i

        views = {"y": _padded_view(2 * f)} if strided else {}
        if lead is None:
            for fp8 in (False, True):
                tag = f"{name}-fp8" if fp8 else name
                for fn in ("WeightedSwiGLUFunction", "WeightedGEGLUFunction"):
                    cases.append(Case(
                        fn, tag, make_biased,
                        lambda i, fp8=fp8, fn=fn: (getattr(moe_raw, fn).apply(i["y"], i["weights"], fp8),),
                        lambda i, fp8=fp8, fn=fn: (getattr(R, fn).apply(i["y"], i["weights"], fp8),),
                        ("y", "weights"), views=views, kernels=True,
                    ))  # fmt: skip
                cases.append(Case(
                    "WeightedQuickGeGLUFunction", tag, make_biased,
                    lambda i, fp8=fp8: (moe_raw.WeightedQuickGeGLUFunction.apply(i["y"], i["weights"], fp8, 0.5),),
                    lambda i, fp8=fp8: (R.WeightedQuickGeGLUFunction.apply(i["y"], i["weights"], fp8, 0.5),),
                    ("y", "weights"), views=views, kernels=True,
                ))  # fmt: skip
        # the seed's *_impl reshape(-1, 2F) cannot take F = 0: those cases compare devices only
        seed_runs = f > 0
        for fn in ("weighted_bias_swiglu_impl", "weighted_bias_geglu_impl"):
            cases.append(Case(
                fn, name, make_biased,
                lambda i, fn=fn: (getattr(moe_raw, fn)(i["y"], i["weights"], False),),
                (lambda i, fn=fn: (getattr(R, fn)(i["y"], i["weights"], False),)) if seed_runs else None,
                ("y", "weights"), views=views, kernels=True,
            ))  # fmt: skip
        cases.append(Case(
            "weighted_bias_quick_geglu_impl", name, make_biased,
            lambda i: (moe_raw.weighted_bias_quick_geglu_impl(i["y"], i["bias"], i["weights"], False, 1.0, 2.0),),
            (lambda i: (R.weighted_bias_quick_geglu_impl(i["y"], i["bias"], i["weights"], False, 1.0, 2.0),))
            if seed_runs else None,
            ("y", "bias", "weights"), views=views, kernels=True,
        ))  # fmt: skip
    return cases


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _dispatcher_cases():
    cases = []
    for name, t, e, k, dnp in [("dropless", 7, 4, 2, False), ("drop-pad", 7, 4, 2, True), ("T0", 0, 4, 2, False)]:

        def make(t=t, e=e, k=k):
            rm = _routing(t, e, k)
            return {"hidden": _tokens(t, 9, torch.float32), "probs": make_probs(rm), "routing_map": rm}

        def call(i, e=e, k=k, dnp=dnp):
            d = moe_raw.MoEAlltoAllDispatcher(e, e, None, drop_and_pad=dnp, capacity_factor=1.0, router_topk=k)
            rows, rows_probs, tpe = d.dispatch(i["hidden"], i["probs"], i["routing_map"])
            return rows, rows_probs, tpe, d.combine(rows * 2 + rows_probs.unsqueeze(1))

        def ref(i, e=e, k=k, dnp=dnp):
            t = i["hidden"].shape[0]
            n = min(-(-t * k * 1 // e), t) * e if dnp else None  # Megatron's capacity, capped at T
            rows, rows_probs, index = R.permute(i["hidden"], i["routing_map"], i["probs"], n, True, dnp)
            tpe = torch.full((e,), n // e) if dnp else i["routing_map"].sum(0)
            out = R.unpermute(rows * 2 + rows_probs.unsqueeze(1), index, (t, 9), i["probs"], fused=True)
            return rows, rows_probs, tpe.to(i["hidden"].device), out

        cases.append(Case("MoEAlltoAllDispatcher", name, make, call, ref, ("hidden", "probs")))
    return cases


def _automodel_extra_cases():
    """NeMo Automodel 0.7's helpers beside the gated activations (bias Quick-GEGLU, quick_gelu, the aux-loss scaler)."""
    cases = []
    shapes = [("bf16", 5, 8, torch.bfloat16), ("fp32-odd", 3, 3, torch.float32), ("N0", 0, 4, torch.float32)]
    for name, n, f, dtype in shapes:

        def make(n=n, f=f, dtype=dtype):
            i = _act_inputs(n, f, dtype)
            i["bias"] = torch.randn(2 * f).to(dtype)
            i["aux"] = torch.rand(())
            return i

        def quick_glu_ref(y, b, w):
            return R.weighted_quick_glu(y + b, w, 1.702, 0.5)

        cases += [
            Case("quick_gelu", name, make, lambda i: (moe_raw.quick_gelu(i["y"]),),
                 lambda i: (R.quick_gelu(i["y"]),), ("y",)),
            Case("weighted_bias_quick_geglu", name, make,
                 lambda i: (moe_raw.weighted_bias_quick_geglu(i["y"], i["bias"], i["weights"], 0.5),),
                 lambda i: (quick_glu_ref(i["y"], i["bias"], i["weights"]),), ("y", "bias", "weights"), kernels=True),
            Case("weighted_bias_quick_geglu_back", name, make,
                 lambda i: moe_raw.weighted_bias_quick_geglu_back(i["g"], i["y"], i["bias"], i["weights"], 0.5),
                 lambda i: (lambda dy, dw: (dy, dy, dw))(
                     *R.weighted_quick_glu_back(i["g"], i["y"] + i["bias"], i["weights"], 1.702, 0.5)),
                 ("g", "y", "bias", "weights"), kernels=True),
            Case("WeightedBiasQuickGeGLUFunction", name, make,
                 lambda i: (moe_raw.WeightedBiasQuickGeGLUFunction.apply(i["y"], i["bias"], i["weights"], False, 0.5),),
                 lambda i: (quick_glu_ref(i["y"], i["bias"], i["weights"]),), ("y", "bias", "weights"), kernels=True),
            # the reference has no aux-loss scaler (its gradient is a constant, not a derivative): devices only here,
            # NeMo Automodel's own class in tests/test_automodel.py
            Case("MoEAuxLossAutoScaler", name, make,
                 lambda i: (moe_raw.MoEAuxLossAutoScaler.apply(i["y"], i["aux"]),), None, ("y", "aux")),
        ]  # fmt: skip
    return cases


def _router_cases():
    """The router (issue 18): random logits (no ties), each score function, groups, bias, both output forms."""
    cases = []
    shapes = [("bf16", 9, 16, torch.bfloat16), ("fp32-strided", 6, 24, torch.float32), ("T0", 0, 8, torch.float32)]
    configs = {
        "softmax": (2, {}),
        "softmax-pre-groups": (4, {"use_pre_softmax": True, "num_groups": 4, "group_topk": 2}),
        "sigmoid-bias-scaled": (3, {"score_function": "sigmoid", "scaling_factor": 2.5}),
        "sqrtsoftplus-K1": (1, {"score_function": "sqrtsoftplus"}),
    }
    for (name, t, e, dtype), (cname, (k, kw)) in itertools.product(shapes, configs.items()):

        def make(t=t, e=e, dtype=dtype, width=2 * e if "strided" in name else e):
            logits = torch.randn(t, width).to(dtype)
            return {"logits": logits, "bias": torch.randn(e) * 0.1, "mask": torch.arange(t) % 3 == 0}

        views = {"logits": (lambda x, e=e: x[:, ::2])} if "strided" in name else {}
        bias = "bias" in cname
        for dense in (False, True):
            cases.append(Case(
                "topk_routing_with_score_function", f"{name}-{cname}-{'topk' if dense else 'map'}", make,
                lambda i, k=k, kw=kw, dense=dense, bias=bias: moe_raw.topk_routing_with_score_function(
                    i["logits"], k, **kw, expert_bias=i["bias"] if bias else None, dense_output=dense),
                lambda i, k=k, kw=kw, dense=dense, bias=bias: R.topk_routing_with_score_function(
                    i["logits"], k, **kw, expert_bias=i["bias"] if bias else None, dense_output=dense),
                ("logits",), views=views,
            ))  # fmt: skip
        function = kw.get("score_function", "softmax")
        cases.append(Case(
            "compute_routing_scores_for_aux_loss", f"{name}-{cname}", make,
            lambda i, k=k, f=function: moe_raw.compute_routing_scores_for_aux_loss(i["logits"], k, f,
                                                                                  padding_mask=i["mask"]),
            lambda i, k=k, f=function: R.compute_routing_scores_for_aux_loss(i["logits"], k, f, i["mask"]),
            ("logits",), views=views,
        ))  # fmt: skip
    for name, t, e, dtype in shapes:

        def make_loss(t=t, e=e, dtype=dtype):
            return {"probs": torch.rand(t, e).to(dtype), "tpe": torch.randint(0, 9, (e,)), "logits": torch.randn(t, e)
                    .to(dtype), "mask": torch.arange(t) % 3 == 0}  # fmt: skip

        cases += [
            Case("switch_load_balancing_loss_func", name, make_loss,
                 lambda i: (moe_raw.switch_load_balancing_loss_func(i["probs"], i["tpe"], 40, 2, i["tpe"].numel(), 0.1,
                                                                    padding_mask=i["mask"]),),
                 lambda i: (R.switch_load_balancing_loss_func(i["probs"], i["tpe"], 40, 2, i["tpe"].numel(), 0.1,
                                                              i["mask"]),), ("probs",)),
            Case("z_loss_func", name, make_loss, lambda i: (moe_raw.z_loss_func(i["logits"], 1e-3, i["mask"]),),
                 lambda i: (R.z_loss_func(i["logits"], 1e-3, i["mask"]),), ("logits",)),
        ]  # fmt: skip
    return cases


def _quantize_cases():
    """permute_quantized and dequantize (issue 19): FP8 rows and scales bit for bit (the reference permutes, then
    quantizes with moe_raw.reference_fp8). The FP8 rows carry no gradient; permuted_probs and float scales do."""
    cases = []
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    rows, cm, sw = "row-major", "column-major", "swizzled"
    # (name, T, E, K, routing kind, num_out_tokens rule, recipe, fp8 dtype, token dtype, align_size, probs, strided,
    #  scale_layout)
    table = [
        ("rowwise", 7, 4, 2, "topk", "none", "rowwise", e4m3, torch.bfloat16, None, True, False, rows),
        ("blockwise-strided", 7, 4, 2, "sparse", "more", "blockwise", e4m3, torch.float32, None, True, True, rows),
        ("mxfp8-e5m2-padded", 7, 4, 2, "empty_expert", "fewer", "mxfp8", e5m2, torch.float16, 4, True, False, rows),
        ("rowwise-e5m2-padded-no-probs", 7, 4, 2, "topk", "none", "rowwise", e5m2, torch.bfloat16, 8, False, False,
         rows),
        ("T0-mxfp8-rows", 0, 4, 2, "topk", "more", "mxfp8", e4m3, torch.float32, None, True, False, rows),
        ("T0-blockwise-padded", 0, 4, 2, "topk", "none", "blockwise", e4m3, torch.bfloat16, 4, True, False, rows),
        ("blockwise-column-major", 7, 4, 2, "topk", "more", "blockwise", e4m3, torch.bfloat16, None, True, True, cm),
        ("mxfp8-swizzled-padded", 7, 4, 2, "empty_expert", "none", "mxfp8", e4m3, torch.bfloat16, 128, True, False, sw),
        ("T0-blockwise-column-major", 0, 4, 2, "topk", "more", "blockwise", e5m2, torch.float32, None, True, False, cm),
        ("T0-mxfp8-swizzled-padded", 0, 4, 2, "topk", "none", "mxfp8", e4m3, torch.float16, 4, False, False, sw),
    ]  # fmt: skip
    for name, t, e, k, kind, rule, recipe, fp8, dtype, align, with_probs, strided, layout in table:
        h = 160  # a partial 1x128 block, five MX blocks

        def make(t=t, e=e, k=k, kind=kind, rule=rule, with_probs=with_probs, dtype=dtype, strided=strided, h=h):
            rm = _routing(t, e, k, kind)
            n = {"none": None, "more": _routed(rm) + 3, "fewer": max(_routed(rm) - 3, 0)}[rule]
            p = make_probs(rm, torch.float32, off_route=float("nan")) if with_probs else None
            return {"tokens": _tokens(t, h + 3 if strided else h, dtype), "routing_map": rm, "probs": p,
                    "num_out_tokens": n, "dtype": dtype}  # fmt: skip

        def call(i, recipe=recipe, fp8=fp8, align=align, layout=layout):
            return moe_raw.permute_quantized(
                i["tokens"], i["routing_map"], i["probs"], i["num_out_tokens"], recipe, fp8, align, layout
            )

        def ref(i, recipe=recipe, fp8=fp8, align=align, layout=layout):
            x = i["tokens"].to(i["dtype"])  # the fp64 reference run widened the tokens: back, exactly
            if align is None:
                rows, pprobs, row_map = R.permute(x, i["routing_map"], i["probs"], i["num_out_tokens"], fused=True)
            else:
                rows, pprobs, row_map, _, _ = R.permute_and_pad(
                    x, i["routing_map"], i["probs"], align, i["num_out_tokens"]
                )
            return (*RF.quantize(rows.detach(), recipe, fp8, layout), pprobs, row_map)

        views = {"tokens": _padded_view(h)} if strided else {}
        diff = ("probs",) if with_probs else ()
        cases.append(Case("permute_quantized", name, make, call, ref, diff, exact=True, views=views))

    # unpermute_grad_quantized: the FP8 row gradient (only devices compared: the op is the reference's composition)
    for name, t, recipe, fp8, dtype, align, with_probs, layout in [
        ("rowwise", 7, "rowwise", e4m3, torch.bfloat16, None, True, rows),
        ("mxfp8-e5m2-padded-no-probs", 7, "mxfp8", e5m2, torch.float16, 8, False, rows),
        ("blockwise-column-major", 7, "blockwise", e4m3, torch.float32, None, True, cm),
        ("T0-blockwise", 0, "blockwise", e4m3, torch.bfloat16, 4, True, rows),
    ]:

        def make(t=t, with_probs=with_probs, dtype=dtype, align=align):
            rm = _routing(t, 4, 2, "topk")
            p = make_probs(rm, torch.float32, off_route=float("nan")) if with_probs else None
            empty = torch.zeros(t, 0)
            if align is None:
                perm, _, row_map = R.permute(empty, rm, p, _routed(rm) + 3, fused=True)
            else:
                perm, _, row_map, _, _ = R.permute_and_pad(empty, rm, p, align)
            return {"grad_output": _tokens(t, 160, dtype), "row_map": row_map, "probs": p, "n": perm.shape[0]}

        def call(i, recipe=recipe, fp8=fp8, layout=layout):
            return moe_raw.unpermute_grad_quantized(
                i["grad_output"], i["row_map"], i["n"], i["probs"], recipe, fp8, layout
            )

        cases.append(Case("unpermute_grad_quantized", name, make, call, None, exact=True))

    for name, n, h, recipe, fp8, strided, layout in [
        ("rowwise", 5, 64, "rowwise", e4m3, False, rows),
        ("blockwise-strided", 5, 160, "blockwise", e5m2, True, rows),
        ("mxfp8", 5, 96, "mxfp8", e4m3, False, rows),
        ("N0", 0, 64, "rowwise", e4m3, False, rows),
        ("blockwise-column-major", 5, 300, "blockwise", e4m3, False, cm),
        ("mxfp8-swizzled", 130, 160, "mxfp8", e5m2, False, sw),
        ("N0-mxfp8-swizzled", 0, 96, "mxfp8", e4m3, False, sw),
    ]:

        def make(n=n, h=h, recipe=recipe, fp8=fp8, strided=strided, layout=layout):
            q, scales = RF.quantize(torch.randn(n, h) * 3, recipe, fp8, layout)
            if strided:  # the scales a view of a wider leaf
                scales = torch.cat([scales, torch.rand(n, 3)], 1)
            if layout == "column-major":  # the leaf is the [G, N_pad] buffer; the view gives the [N, G] scales
                scales = scales.T.contiguous()
            return {"q": q.view(torch.uint8), "scales": scales}  # bytes: the fp64 reference run keeps them

        def call(i, recipe=recipe, fp8=fp8, layout=layout):
            return (moe_raw.dequantize(i["q"].view(fp8), i["scales"], recipe, layout),)

        def ref(i, recipe=recipe, fp8=fp8, layout=layout):
            return (RF.dequantize(i["q"].view(fp8), i["scales"], recipe, layout),)

        views = {"scales": _padded_view(2)} if strided else {}
        if layout == "column-major":
            views = {"scales": lambda x, n=n: x.T[:n]}  # strides (1, N_pad)
        diff = () if recipe == "mxfp8" else ("scales",)
        cases.append(Case("dequantize", name, make, call, ref, diff, exact=True, views=views))
    return cases


CASES = (
    _permute_cases()
    + _unpermute_cases()
    + _sort_chunks_cases()
    + _topk_cases()
    + _padding_cases()
    + _activation_cases()
    + _dispatcher_cases()
    + _automodel_extra_cases()
    + _router_cases()
    + _quantize_cases()
)


# ---------------------------------------------------------------------------------------------------------------
# Running a case


@dataclass
class Run:
    outputs: list  # per output: None, or (tensor on CPU, requires_grad)
    grads: dict  # input name -> gradient on CPU (None: received none)
    dtype: torch.dtype  # the working dtype: the least precise float input


def _subsets(names):
    return [s for r in range(len(names) + 1) for s in itertools.combinations(names, r)]


def _run(case: Case, device: str, wanted, ref: bool = False, dtype=None) -> Run:
    """Run ``case`` (moe_raw, or with ref=True the reference) on ``device`` with the inputs in ``wanted`` requiring
    grad; dtype: float inputs cast to it first (the fp64 reference)."""
    torch.manual_seed(0)
    inputs = case.make()
    leaves, working = {}, torch.float64
    for k, v in list(inputs.items()):
        if not isinstance(v, torch.Tensor):
            continue
        if v.is_floating_point() and torch.finfo(v.dtype).eps > torch.finfo(working).eps:
            working = v.dtype
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.to(device)
        if k in wanted:
            v = v.detach().clone().requires_grad_(True)
            leaves[k] = v
        inputs[k] = case.views[k](v) if k in case.views else v
    outs = case.ref(inputs) if ref else case.call(inputs)
    loss, record = None, []
    for j, o in enumerate(outs):
        if o is None:
            record.append(None)
            continue
        assert isinstance(o, torch.Tensor), f"{case.id}: output {type(o).__name__}"
        record.append((o.detach().cpu(), o.requires_grad))
        if o.requires_grad:
            # the same weights for output j on every run, whichever outputs require grad
            w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1 + j), dtype=torch.float64)
            term = (o.double() * w.to(device)).sum()
            loss = term if loss is None else loss + term
    grads = {k: None for k in leaves}
    if loss is not None and leaves:
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {k: (g.cpu() if g is not None else None) for k, g in zip(leaves, got, strict=True)}
    return Run(record, grads, working)


def _exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    if got.element_size() == 1 and got.dtype not in (torch.bool, torch.uint8, torch.int8):
        got, expected = got.view(torch.uint8), expected.view(torch.uint8)
    assert torch.equal(got, expected), f"{what}: not bit-identical"


def _within(got, expected, what: str, tol: float, same=None) -> None:
    """|got - expected| <= 2 |same - expected| + tol * max(1, |expected|) (same: None, or the reference run in the
    working dtype); NaN where expected is NaN."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if not got.is_floating_point():
        return _exact(got, expected, what)
    if got.numel() == 0:
        return
    g, e = got.double(), expected.double()
    nan = e.isnan()
    assert torch.equal(g.isnan(), nan), f"{what}: NaN in other places"
    g, e = g[~nan], e[~nan]
    err = (g - e).abs().max().item() if g.numel() else 0.0
    bound = tol * max(1.0, e.abs().max().item() if e.numel() else 0.0)
    if same is not None and same.numel():
        s = same.double()[~nan]
        bound += 2 * ((s - e).abs().max().item() if s.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"


def _check_run_invariants(case: Case, run: Run, wanted) -> None:
    """An output requires grad exactly when some input does; every input that requires grad gets a gradient of its
    own shape (the loss reads every float output, so each differentiable input reaches it)."""
    float_outs = [o for o in run.outputs if o is not None and o[0].is_floating_point()]
    for o in run.outputs:
        if o is not None and not o[0].is_floating_point():
            assert not o[1], f"{case.id}: an integer output requires grad"
    if float_outs:
        assert any(rg for _, rg in float_outs) == bool(wanted), (
            f"{case.id} with {wanted} requiring grad: outputs requiring grad {[rg for _, rg in float_outs]}"
        )
    for k in wanted:
        assert run.grads[k] is not None, f"{case.id}: {k} requires grad but received no gradient"


def _compare(got: Run, expected: Run, what: str, exact: bool, tol: float, same: Run | None = None) -> None:
    """got vs expected: outputs (bit for bit when exact, else _within), gradients (_within). same given: expected
    is the fp64 reference and same the reference in the working dtype (flash-attention's rule); an empty batch's
    gradient the reference drops counts as zeros there. same None: two devices, which must also agree on dtypes,
    on which outputs require grad and on which inputs receive gradients."""
    assert len(got.outputs) == len(expected.outputs), f"{what}: {len(got.outputs)} vs {len(expected.outputs)} outputs"
    for j, (a, b) in enumerate(zip(got.outputs, expected.outputs, strict=True)):
        assert (a is None) == (b is None), f"{what}: output {j} is None on one side only"
        if a is None:
            continue
        if same is None:
            assert a[1] == b[1], f"{what}: output {j} requires_grad {a[1]} vs {b[1]}"
        if exact:
            _exact(a[0], b[0] if same is None else same.outputs[j][0], f"{what}: output {j}")
        else:
            ref_same = same.outputs[j][0] if same is not None else None
            _within(a[0], b[0], f"{what}: output {j}", tol, ref_same)
    for k, g in got.grads.items():
        e = expected.grads[k]
        if same is None:
            assert (g is None) == (e is None), f"{what}: gradient of {k}: {g is not None} vs {e is not None}"
        if g is None:
            continue
        if same is None:
            assert g.dtype == e.dtype, f"{what}: gradient of {k} dtype {g.dtype} vs {e.dtype}"
        ref_same = same.grads[k] if same is not None else None
        if e is None:  # the reference drops an empty batch's gradient: it is zero
            e = torch.zeros_like(g)
            ref_same = None
        _within(g, e, f"{what}: gradient of {k}", tol, ref_same)


def _params():
    out = []
    for case in CASES:
        for wanted in _subsets(case.diff):
            out.append(pytest.param(case, wanted, id=f"{case.id}-grad[{','.join(wanted) or 'none'}]"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tests


# Public ops that take no part in autograd: unpermute_grad_quantized runs in a backward pass and returns FP8 codes
# and scales of a gradient (nothing to differentiate).
NOT_DIFFERENTIABLE = {"unpermute_grad_quantized"}


def test_every_public_name_has_cases():
    covered = {c.op for c in CASES}
    missing = sorted(set(moe_raw.__all__) - covered)
    assert not missing, f"public names without parity cases: {missing}"
    for name in set(moe_raw.__all__) - NOT_DIFFERENTIABLE:
        cases = [c for c in CASES if c.op == name]
        assert any(c.diff for c in cases), f"{name}: no differentiable input in any case"
    for name in NOT_DIFFERENTIABLE:  # their outputs must really carry no gradient
        for case in (c for c in CASES if c.op == name):
            inputs = {k: v.requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in case.make().items()}  # fmt: skip
            assert not any(o is not None and o.requires_grad for o in case.call(inputs)), case.id


@pytest.mark.parametrize("case, wanted", _params())
def test_cpu_matches_reference(case, wanted):
    got = _run(case, "cpu", wanted)
    _check_run_invariants(case, got, wanted)
    if case.ref is None:
        pytest.skip(f"{case.id}: the reference cannot run this case (checked against CUDA on the GPU machine)")
    ref64 = _run(case, "cpu", wanted, ref=True, dtype=torch.float64)
    same = _run(case, "cpu", wanted, ref=True)
    _compare(got, ref64, f"{case.id} CPU vs reference", case.exact, FLOOR[got.dtype], same)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA device needed (CPU vs CUDA parity)")
@pytest.mark.parametrize("case, wanted", _params())
def test_cuda_matches_cpu(case, wanted):
    cpu = _run(case, "cpu", wanted)
    cuda = _run(case, "cuda", wanted)
    _check_run_invariants(case, cuda, wanted)
    _compare(cuda, cpu, f"{case.id} CUDA vs CPU", case.exact, TOL[cpu.dtype])


SIM_SHAPES = ("bf16", "fp32-odd-strided")


@pytest.mark.skipif(not SIMULATOR, reason="runs Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize(
    "case, wanted", [p for p in _params() if p.values[0].kernels and p.values[0].name in SIM_SHAPES]
)
def test_simulated_kernels_match_cpu(case, wanted, kernels):
    """The activation kernels (Numba, simulated on CPU tensors) against the CPU path's torch formula."""
    import importlib

    sim = _run(case, "cpu", wanted)
    if not (case.op.endswith("_back") and wanted):  # a differentiable *_back call runs torch ops, not kernels
        assert kernels, f"{case.id}: no kernel launched under the simulator"
    GL = importlib.import_module("moe_raw._kernels.glu_launch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GL, "_on_kernels", lambda *t: False)
        cpu = _run(case, "cpu", wanted)
    _compare(sim, cpu, f"{case.id} simulated kernels vs CPU", False, TOL[cpu.dtype])
