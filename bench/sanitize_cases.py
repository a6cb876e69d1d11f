"""A small GPU workload that launches every moe_raw kernel on each of its code paths once, for compute-sanitizer
(bench/sanitize.sh, workload C: racecheck, initcheck and synccheck are slow, so the shapes are tiny).

python -m bench.sanitize_cases     prints "case <name>" before each case's results are read back (so a sanitizer
report is attributed to the case above it) and "ok <name>" / "MISMATCH <name>" after; exit 1 on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import moe_raw
from moe_raw import reference


def _routing(T, E, K, gen):
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    rm = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx, True)
    return rm, torch.rand(T, E, generator=gen) * rm


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to run")
        return 0
    gen = torch.Generator().manual_seed(0)
    bad = []

    def expect(name, got, exp):
        print(f"case {name}", flush=True)
        got = [g.detach().cpu() for g in got if g is not None]  # the device-to-host reads initcheck watches
        exp = [e.detach().cpu() for e in exp if e is not None]
        good = len(got) == len(exp) and all(
            g.shape == e.shape and torch.allclose(g.double(), e.double(), rtol=2e-2, atol=2e-2)
            for g, e in zip(got, exp, strict=True)
        )
        print(("ok " if good else "MISMATCH ") + name, flush=True)
        if not good:
            bad.append(name)

    for T, E, K, H, dtype, label in (
        (40, 8, 2, 64, torch.bfloat16, "16-byte rows (sm_90 bulk-copy path)"),
        (300, 16, 3, 13, torch.bfloat16, "2-byte rows (generic path), T > 256 (two-launch map build)"),
        (9, 1, 1, 8, torch.float32, "one expert"),
    ):
        rm, probs = _routing(T, E, K, gen)
        x = torch.randn(T, H, generator=gen).to(dtype)
        xc, rmc, pc = x.cuda().requires_grad_(True), rm.cuda(), probs.cuda().requires_grad_(True)
        for fused in (False, True):
            n_out = T * K + 5  # spare rows: the tail blocks run
            out, pp, index = moe_raw.permute(xc, rmc, pc, num_out_tokens=n_out, fused=fused)
            ref = reference.permute(x, rm, probs, n_out, fused)
            expect(f"permute {label} fused={fused}", (out, pp, index), ref)
            y = moe_raw.unpermute(out, index, (T, H), pc, None if fused else rmc, fused=fused)
            y_ref = reference.unpermute(ref[0], ref[2], (T, H), probs, None if fused else rm, fused=fused)
            expect(f"unpermute {label} fused={fused}", (y,), (y_ref,))
            grads = torch.autograd.grad((y * 1.5).sum() + pp.sum(), (xc, pc))
            expect(f"backward {label} fused={fused} (read back)", grads, grads)  # initcheck: every byte written
        out, _, sidx = moe_raw.permute(x.cuda(), rmc, num_out_tokens=T * K)
        expect(f"unpermute CSR (no routing map) {label}", (moe_raw.unpermute(out, sidx, (T, H)),),
               (reference.unpermute(out.cpu(), sidx.cpu(), (T, H)),))  # fmt: skip
        padded = moe_raw.permute_and_pad(xc, rmc, pc, 16, T * K)
        expect(f"permute_and_pad {label}", padded, reference.permute_and_pad(x, rm, probs, 16, T * K))
        rows = padded[0].detach().clone().requires_grad_(True)
        y = moe_raw.unpermute(rows, padded[2], (T, H), pc, fused=True)
        d_rows = torch.autograd.grad(y.sum(), rows)
        expect(f"unpermute_bwd aligned {label} (read back)", d_rows, d_rows)
        scales = torch.rand(T, 3, generator=gen)
        n_rows = rows.shape[0]
        expect(f"permute_with_row_map {label}", (moe_raw.permute_with_row_map(scales.cuda(), padded[2], n_rows),),
               (reference.permute_with_row_map(scales, padded[2].cpu(), n_rows),))  # fmt: skip
        idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
        expect(f"permute_topk {label}", moe_raw.permute_topk(x.cuda(), idx.cuda(), E, fused=True),
               moe_raw.permute_topk(x, idx, E, fused=True))  # fmt: skip
        tp = torch.rand(T, K, generator=gen).to(x.dtype)
        expect(f"topk_to_routing with probs {label}", moe_raw.topk_to_routing(idx.cuda(), E, tp.cuda()),
               moe_raw.topk_to_routing(idx, E, tp))  # fmt: skip
    sizes, order = torch.tensor([5, 0, 17, 9]), torch.tensor([2, 0, 3, 1])
    x = torch.randn(40, 24, generator=gen)
    xc = x.cuda().requires_grad_(True)
    got = moe_raw.sort_chunks_by_idxs(xc, sizes.cuda(), order.cuda())
    expect("sort_chunks_by_idxs", got, reference.sort_chunks_by_idxs(x, sizes, order))
    expect("sort_chunks_by_idxs backward", torch.autograd.grad(got[0].sum(), xc), (torch.ones(40, 24),))
    for F in (64, 13):  # 16-byte vector path, element path
        y = torch.randn(33, 2 * F, generator=gen).to(torch.bfloat16)
        w = torch.rand(33, 1, generator=gen)
        g = torch.randn(33, F, generator=gen).to(torch.bfloat16)
        expect(f"swiglu F={F}", (moe_raw.swiglu(y.cuda()), moe_raw.weighted_swiglu(y.cuda(), w.cuda())),
               (reference.swiglu(y), reference.weighted_swiglu(y, w)))  # fmt: skip
        expect(f"weighted_swiglu_back F={F}", moe_raw.weighted_swiglu_back(g.cuda(), y.cuda(), w.cuda()),
               reference.weighted_swiglu_back(g.float(), y.float(), w))  # fmt: skip
    torch.cuda.synchronize()
    print("ALL OK" if not bad else f"MISMATCHES: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
