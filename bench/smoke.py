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
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]

    def close(a, b, length=1):
        # An fp32 sum of `length` unit-scale products is off by ~eps * sqrt(length) in absolute terms, whatever
        # its value: dprobs (a dot over H) near 0 needs that much slack (fp32, H = 7168: 8.5e-4).
        return torch.allclose(a.detach().cpu().double(), b.detach(), rtol=tol, atol=tol * length**0.5)

    ok_y, ok_gx, ok_gp = close(y, y_r), close(x.grad, xr.grad), close(p.grad, pr.grad, length=H)
    ok_zero = bool((p.grad.detach()[~rm] == 0).all())
    status = "PASS" if (ok and ok_y and ok_gx and ok_gp and ok_zero) else "FAIL"
    print(
        f"{status} T={T} E={E} K={K} H={H} {str(dtype)[6:]} num_out={num_out} dap={drop_and_pad} fused={fused}: "
        f"permute_exact={ok} unpermute={ok_y} dx={ok_gx} dprobs={ok_gp} dprobs_offroute_zero={ok_zero}",
        flush=True,
    )
    return status == "PASS"


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
