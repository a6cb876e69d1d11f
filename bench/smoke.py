"""Quick GPU self-check of permute / unpermute against moe_raw.reference (fp64), forward and backward.

python -m bench.smoke   (prints one PASS/FAIL line per case; exit 1 on any FAIL)
"""

from __future__ import annotations

import sys

import torch

import moe_raw
from moe_raw import reference


def _routing(T, E, K, device):
    scores = torch.rand(T, E, device=device)
    idx = scores.topk(K, dim=1).indices
    rm = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, idx, True)
    probs = torch.rand(T, E, device=device) * rm
    return rm, probs


def check(T, E, K, H, dtype, num_out=None, drop_and_pad=False, fused=False, device="cuda"):
    rm, probs = _routing(T, E, K, device)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    p = probs.clone().requires_grad_(True)
    out, pp, idx = moe_raw.permute(x, rm, p, num_out_tokens=num_out, fused=fused, drop_and_pad=drop_and_pad)
    xr = x.detach().cpu().double().requires_grad_(True)
    pr = probs.detach().cpu().double().requires_grad_(True)
    out_r, pp_r, idx_r = reference.permute(xr, rm.cpu(), pr, num_out, fused, drop_and_pad)
    ok = torch.equal(out.detach().cpu().double(), out_r.detach()) and torch.equal(
        pp.detach().cpu().double(), pp_r.detach()
    )
    ok = ok and torch.equal(idx.cpu(), idx_r.cpu())
    y = moe_raw.unpermute(out, idx, (T, H), p, rm, fused=fused, drop_and_pad=drop_and_pad)
    y_r = reference.unpermute(out_r, idx_r, (T, H), pr, rm.cpu(), fused=fused, drop_and_pad=drop_and_pad)
    g = torch.randn_like(y)
    gp = torch.randn_like(pp)
    (y * g).sum().add_((pp * gp).sum()).backward()
    (y_r * g.cpu().double()).sum().add_((pp_r * gp.cpu().double()).sum()).backward()
    ok_y, ok_gx, ok_gp = _close(y, y_r, dtype), _close(x.grad, xr.grad, dtype), _close(p.grad, pr.grad, dtype, H)
    ok_zero = bool((p.grad.detach()[~rm] == 0).all())
    status = "PASS" if (ok and ok_y and ok_gx and ok_gp and ok_zero) else "FAIL"
    print(
        f"{status} T={T} E={E} K={K} H={H} {str(dtype)[6:]} num_out={num_out} dap={drop_and_pad} fused={fused}: "
        f"permute_exact={ok} unpermute={ok_y} dx={ok_gx} dprobs={ok_gp} dprobs_offroute_zero={ok_zero}",
        flush=True,
    )
    return status == "PASS"


def _grads(outs, leaves, seed_=1):
    """Gradients of sum(out * g) w.r.t. leaves for fixed random g (same g for both providers: seeded)."""
    gen = torch.Generator().manual_seed(seed_)
    outs = [o for o in outs if o is not None and o.requires_grad]
    gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, leaves, gs, allow_unused=True)


def _close(a, b, dtype, length=1):
    # An fp32 sum of `length` unit-scale products is off by ~eps * sqrt(length) in absolute terms, whatever its
    # value: dprobs (a dot over H) near 0 needs that much slack (fp32, H = 7168: 8.5e-4).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    return a is not None and torch.allclose(a.detach().cpu().double(), b.detach().cpu().double(), rtol=tol,
                                            atol=tol * length**0.5)  # fmt: skip


def check_sort_chunks(dtype, device="cuda") -> tuple[bool, str]:
    """sort_chunks_by_idxs fwd (bit-exact vs the reference) and bwd (the inverse move), with probs and rows past the
    chunks, int32 and int64 indices."""
    ok = True
    for n_splits, rows, tail, hidden in ((5, 40, 3, 24), (64, 700, 0, 136), (1, 9, 2, 7)):
        sizes = torch.randint(0, 2 * rows // n_splits + 1, (n_splits,))
        sizes[-1] = rows - sizes[:-1].sum().clamp_max(rows)
        sizes = sizes.clamp_min(0)
        order = torch.randperm(n_splits)
        x = torch.randn(int(sizes.sum()) + tail, hidden).to(dtype)
        p = torch.rand(x.shape[0])
        for idx_dtype in (torch.int32, torch.int64):
            xd = x.to(device).requires_grad_(True)
            pd = p.to(device).requires_grad_(True)
            out, pout = moe_raw.sort_chunks_by_idxs(
                xd, sizes.to(idx_dtype).to(device), order.to(idx_dtype).to(device), pd
            )
            xr, pr = x.double().requires_grad_(True), p.double().requires_grad_(True)
            ref, pref = reference.sort_chunks_by_idxs(xr, sizes, order, pr)
            ok &= torch.equal(out.detach().cpu().double(), ref.detach()) and torch.equal(
                pout.detach().cpu().double(), pref.detach()
            )
            got_g, ref_g = _grads((out, pout), (xd, pd)), _grads((ref, pref), (xr, pr))
            ok &= all(_close(a, b, dtype) for a, b in zip(got_g, ref_g, strict=True))
    return bool(ok), "3 shapes x int32/int64 indices: fwd bit-exact, bwd vs fp64"


def check_topk(dtype, device="cuda") -> tuple[bool, str]:
    """permute_topk / unpermute_topk: the mask form's rows and results (bit-exact), and the combine and both grads
    (tokens, topk_probs) against the fp64 reference of the mask form."""
    ok = True
    for T, E, K, H in ((33, 8, 2, 64), (300, 64, 6, 13)):
        idx = torch.rand(T, E).topk(K, dim=1).indices
        idx[torch.rand(T, K) < 0.1] = -1
        tp = torch.rand(T, K)
        rm, dense = moe_raw.topk_to_routing(idx, E, tp)
        x = torch.randn(T, H).to(dtype)
        for fused in (False, True):
            xd, pd = x.to(device).requires_grad_(True), tp.to(device).requires_grad_(True)
            out, pp, index = moe_raw.permute_topk(xd, idx.to(device), E, pd, fused=fused)
            y = moe_raw.unpermute_topk(out, index, (T, H), pd, idx.to(device), E, fused=fused)
            xr, dr = x.double().requires_grad_(True), dense.double().requires_grad_(True)
            out_r, pp_r, index_r = reference.permute(xr, rm, dr, None, fused)
            y_r = reference.unpermute(out_r, index_r, (T, H), dr, None if fused else rm, fused=fused)
            ok &= torch.equal(out.detach().cpu().double(), out_r.detach()) and torch.equal(index.cpu(), index_r)
            ok &= _close(y, y_r, dtype, 1)
            gx, gp = _grads((y, pp), (xd, pd))
            gx_r, gd_r = _grads((y_r, pp_r), (xr, dr))
            gp_r = torch.where(idx >= 0, gd_r.gather(1, idx.clamp_min(0)), torch.zeros_like(tp, dtype=torch.float64))
            ok &= _close(gx, gx_r, dtype) and _close(gp, gp_r, dtype, H)
    return bool(ok), "2 shapes x fused/unfused, -1 slots: rows bit-exact vs the mask form, combine and grads vs fp64"


def check_permute_and_pad(dtype, device="cuda") -> tuple[bool, str]:
    """permute_and_pad (bit-exact vs the reference, padding rows zero), permute_with_row_map of per-token scales
    (bit-exact), and unpermute of the padded rows with both grads against fp64."""
    ok = True
    for T, E, K, H, align, n_out in ((40, 8, 2, 64, 16, None), (257, 16, 4, 13, 32, 257 * 4), (9, 4, 1, 8, 1, 5)):
        rm, probs = _routing(T, E, K, "cpu")
        x = torch.randn(T, H).to(dtype)
        xd, pd = x.to(device).requires_grad_(True), probs.to(device).requires_grad_(True)
        got = moe_raw.permute_and_pad(xd, rm.to(device), pd, align, n_out)
        xr, pr = x.double().requires_grad_(True), probs.double().requires_grad_(True)
        exp = reference.permute_and_pad(xr, rm, pr, align, n_out)
        ok &= all(torch.equal(a.detach().cpu().double(), b.detach().double()) for a, b in zip(got, exp, strict=True))
        scales = torch.rand(T, max(H // 8, 1))
        ok &= torch.equal(moe_raw.permute_with_row_map(scales.to(device), got[2], got[0].shape[0]).cpu(),
                          reference.permute_with_row_map(scales, exp[2], exp[0].shape[0]))  # fmt: skip
        y = moe_raw.unpermute(got[0], got[2], (T, H), pd, fused=True)
        y_r = reference.unpermute(exp[0], exp[2][: T + 1], (T, H), pr, fused=True)
        ok &= _close(y, y_r, dtype, 1)
        g = _grads((y, got[1]), (xd, pd))
        g_r = _grads((y_r, exp[1]), (xr, pr))
        ok &= _close(g[0], g_r[0], dtype) and _close(g[1], g_r[1], dtype, H)
    return bool(ok), "3 shapes (align 16 / 32 / 1, exact / worst-case sizing): rows, scales exact; combine, grads fp64"


def routing_variants(routed: int) -> tuple[dict, ...]:
    """The check() keyword sets every self-check runs: both index formats, num_out_tokens equal / below / above the
    routed count, and drop_and_pad at full and half capacity."""
    return (
        dict(fused=False),
        dict(fused=True),
        dict(num_out=routed),
        dict(num_out=max(routed - 5, 0)),
        dict(num_out=routed + 37, fused=True),
        dict(num_out=routed, drop_and_pad=True),
        dict(num_out=routed // 2, drop_and_pad=True, fused=True),
    )


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device found: nothing to check on the GPU")
        return 0
    cases = [
        (16, 8, 2, 64, torch.float32),
        (7, 4, 2, 13, torch.float16),
        (1027, 64, 8, 1000, torch.bfloat16),
        (300, 256, 8, 7168, torch.bfloat16),
        (1027, 1, 1, 2048, torch.float32),
    ]
    if device == "cpu":
        cases = [c[:3] + (min(c[3], 64),) + c[4:] for c in cases[:3]]
    ok = True
    for T, E, K, H, dt in cases:
        for kw in routing_variants(T * K):
            ok &= check(T, E, K, H, dt, device=device, **kw)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
