"""The self-check of ``python -m bench`` / ``moe-raw-bench``: every op, every dtype, small shapes, against the fp64
reference (``moe_raw.reference``); one PASS / FAIL line per check. Runs on CUDA, or on the CPU path without it."""

from __future__ import annotations

import contextlib
import io
import math
import time

import torch

from . import common


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().cpu().double() - ref.detach().cpu().double()).abs().max())


def _swiglu_outputs(ns, check: str, y, g, w):
    """The outputs of one SwiGLU check, computed with namespace ns (moe_raw or moe_raw.reference)."""
    if check == "swiglu":
        return (ns.swiglu(y),)
    if check == "swiglu_back":
        return (ns.swiglu_back(g, y),)
    if check == "weighted_swiglu":
        return (ns.weighted_swiglu(y, w),)
    if check == "weighted_swiglu_back":
        return tuple(ns.weighted_swiglu_back(g, y, w))
    # autograd: weighted_bias_swiglu_impl (WeightedSwiGLUFunction) on a 3-D input, forward + backward
    yi = y.detach().clone().requires_grad_(True)
    wi = w.detach().clone().requires_grad_(True)
    n, f2 = y.shape
    out = ns.weighted_bias_swiglu_impl(yi.view(1, n, f2), wi)
    out.backward(g.view(1, n, f2 // 2))
    return out.detach(), yi.grad, wi.grad


SWIGLU_CHECKS = {  # check name: (op it belongs to for --ops, what it covers)
    "swiglu": ("swiglu", "swiglu fwd"),
    "swiglu_back": ("swiglu", "swiglu_back (swiglu bwd)"),
    "weighted_swiglu": ("weighted_swiglu", "weighted_swiglu fwd"),
    "weighted_swiglu_back": ("weighted_swiglu_back", "weighted_swiglu_back (bwd: dy, dweights)"),
    "autograd": ("weighted_swiglu_back", "WeightedSwiGLUFunction / weighted_bias_swiglu_impl fwd+bwd (autograd)"),
}


def check_swiglu(check: str, dtype, device) -> tuple[bool, str]:
    """Every output within 2x the error of the reference run in the same dtype (both vs fp64), plus a tiny floor."""
    import moe_raw
    from moe_raw import reference

    ours_err = ref_err_max = 0.0
    ok = True
    for n, f in ((67, 96), (5, 7)):  # a vector-friendly width and an odd tail
        y = (torch.randn(n, 2 * f) * 2).to(device=device, dtype=dtype)
        g = torch.randn(n, f).to(device=device, dtype=dtype)
        w = torch.rand(n, 1).to(device=device, dtype=torch.float32)
        ours = _swiglu_outputs(moe_raw, check, y, g, w)
        same = _swiglu_outputs(reference, check, y, g, w)
        exact = _swiglu_outputs(reference, check, *(t.detach().cpu().double() for t in (y, g, w)))
        for o, s, e in zip(ours, same, exact, strict=True):
            if o.shape != e.shape or o.dtype != s.dtype:
                return False, f"got {tuple(o.shape)} {o.dtype}, expected {tuple(e.shape)} {s.dtype}"
            err, ref_err = _max_err(o, e), _max_err(s, e)
            floor = 1e-6 * max(1.0, float(e.abs().max()) if e.numel() else 1.0)
            ok &= bool(math.isfinite(err)) and err <= 2 * ref_err + floor
            ours_err, ref_err_max = max(ours_err, err), max(ref_err_max, ref_err)
    return ok, f"max |err| vs fp64 {ours_err:.1e} (torch in the same dtype: {ref_err_max:.1e}; limit 2x per output)"


SMALL_PERMUTE_CASES = [(16, 8, 2, 64), (7, 4, 2, 13), (257, 64, 8, 136)]  # (T, E, K, H): vector rows, odd tail
# Full runs add larger cases (H = 7168 dprobs dots, one expert); the GPU test suite covers far more.
LARGE_PERMUTE_CASES = [(1027, 64, 8, 1000), (300, 256, 8, 7168), (1027, 1, 1, 2048)]


def check_permute(dtype, device, quick: bool = False) -> tuple[bool, str]:
    """bench.smoke.check over its routing variants (permute exact, unpermute and both grads vs fp64)."""
    from . import smoke

    cases = SMALL_PERMUTE_CASES if device == "cpu" or quick else SMALL_PERMUTE_CASES + LARGE_PERMUTE_CASES
    buf = io.StringIO()
    ok, n = True, 0
    with contextlib.redirect_stdout(buf):
        for T, E, K, H in cases:
            for kw in smoke.routing_variants(T * K):
                ok &= smoke.check(T, E, K, H, dtype, device=device, **kw)
                n += 1
    fails = [ln for ln in buf.getvalue().splitlines() if ln.startswith("FAIL")]
    return ok, f"{n} cases (routing variants, fused / unfused, dropped / padded)" + (
        "; " + " | ".join(fails[:3]) if fails else ""
    )


def _dispatch_checks():
    from . import bench_fp8, smoke

    return (
        ("sort_chunks", "sort_chunks_by_idxs fwd+bwd", smoke.check_sort_chunks),
        ("topk", "permute_topk + unpermute_topk fwd+bwd", smoke.check_topk),
        ("pad", "permute_and_pad + permute_with_row_map + unpermute fwd+bwd", smoke.check_permute_and_pad),
        ("fp8", "permute_quantized == permute + reference_fp8.quantize", bench_fp8.check),
    )


DISPATCH_CHECKS = _dispatch_checks()


def selfcheck(ops, device, quick: bool = False) -> list:
    """Run the checks of `ops` in every dtype on `device`; print one PASS/FAIL line each; return the records.
    quick: the small permute cases only (the slow part of a full self-check is the fp64 CPU reference of the large
    ones)."""
    results = []
    for dname, dtype in common.DTYPES.items():
        todo = []
        if "permute" in ops or "unpermute" in ops:
            todo.append(("permute+unpermute fwd+bwd", lambda dt=dtype: check_permute(dt, device, quick)))
        for op, label, fn in DISPATCH_CHECKS:
            if op in ops:
                todo.append((label, lambda f=fn, dt=dtype: f(dt, device)))
        for check, (op, label) in SWIGLU_CHECKS.items():
            if op in ops or (check == "autograd" and "weighted_swiglu" in ops):
                todo.append((label, lambda c=check, dt=dtype: check_swiglu(c, dt, device)))
        if "router" in ops:
            todo.append(("router fwd+bwd (DeepSeek-V3, Qwen3 settings)", lambda dt=dtype: check_router(dt, device)))
        if "layer" in ops:
            todo.append(("MoE layer fwd+bwd, moe_raw vs seed", lambda dt=dtype: check_layer(dt, device)))
        for label, fn in todo:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                ok, detail = fn()
            except Exception as e:  # noqa: BLE001 - a crash is a FAIL line, not a traceback halfway through
                ok, detail = False, f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            status = "PASS" if ok else "FAIL"
            print(f"{status}  {dname:4}  {label}  [{device}, {seconds:.1f}s]  {detail}", flush=True)
            results.append({"op": label, "dtype": dname, "status": status, "detail": detail, "device": device,
                            "seconds": round(seconds, 3)})  # fmt: skip
    return results


def check_layer(dtype, device) -> tuple[bool, str]:
    from . import bench_layer

    inputs = bench_layer.make_layer(37, 6, 32, 2, 24, dtype=dtype, device=device)
    err = bench_layer.compare(inputs)
    tol = bench_layer.LAYER_RTOL[dtype]
    return err <= tol, f"T=37 E=6 H=32 K=2 F=24: max rel err of y, dx, dlogits {err:.1e} (tol {tol:.0e})"


def check_router(dtype, device) -> tuple[bool, str]:
    """topk_routing_with_score_function at DeepSeek-V3's and Qwen3's settings, T = 257: the map equals the torch
    router's in the same dtype (random logits: no ties), probs and d logits within 2x its error vs fp64."""
    import moe_raw
    from moe_raw import reference

    from . import bench_router

    ok, worst = True, 0.0
    for name in ("DeepSeek-V3", "Qwen3-30B-A3B"):
        num_experts, topk, cfg = bench_router.ROUTERS[name]
        kw = {k: v for k, v in cfg.items() if k != "bias"}
        if cfg.get("bias"):
            kw["expert_bias"] = torch.randn(num_experts, device=device) * 0.01
        # distinct values per row, exact in every dtype (k / 16, |k| <= 128): random bf16 logits would tie
        logits = ((torch.rand(257, num_experts).argsort(-1) - num_experts // 2) / 16).to(device, dtype)

        def run(fn, x, topk=topk, kw=kw):
            x = x.detach().clone().requires_grad_(True)
            probs, routing_map = fn(x, topk, **kw)
            w = torch.linspace(-1, 1, probs.numel(), device=device, dtype=torch.float64).view(probs.shape)
            return probs, routing_map, torch.autograd.grad((probs.double() * w).sum(), x)[0]

        ours, same = (
            run(moe_raw.topk_routing_with_score_function, logits),
            run(reference.topk_routing_with_score_function, logits),
        )
        exact = run(reference.topk_routing_with_score_function, logits.double())
        ok &= bool(torch.equal(ours[1], same[1]))
        for i in (0, 2):
            err, ref_err = _max_err(ours[i], exact[i]), _max_err(same[i], exact[i])
            ok &= err <= 2 * ref_err + 1e-6
            worst = max(worst, err)
    return ok, f"maps equal the torch router's; max |err| vs fp64 {worst:.1e}"
