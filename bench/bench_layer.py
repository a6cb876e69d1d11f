"""End-to-end MoE layer: moe_raw against the seed's functions in the same layer, forward and backward.

python -m bench.bench_layer [--quick] [--dtype bf16]     (also run by ``python -m bench``; ``--ops layer``)

The layer (one token-choice MoE block, no shared expert):
  router logits [T, E] fp32 -> softmax -> top-K -> routing map [T, E] bool + dense probs [T, E] (0 off route)
  -> permute(x [T, H], probs)            (expert-major rows, N = T*K, with the permuted probs [N])
  -> up-projection  h = x_e @ W_up[e]    (grouped matmul, see grouped_matmul)                         [N, 2F]
  -> weighted SwiGLU  a = silu(h_gate) * h_up * prob                                                     [N, F]
  -> down-projection o = a_e @ W_down[e]                                                                 [N, H]
  -> unpermute(o) (scatter-add back to tokens)                                                           [T, H]
and then backward of sum(y * gy): the grads reach x and the router logits (the expert weights are frozen so that
the DeepSeek-V3 shape fits one card; their grads are plain matmuls that neither provider touches).

Providers, in the same layer with the same weights and routing:
  moe_raw  moe_raw.permute(fused=True, num_out_tokens=T*K) / moe_raw.weighted_bias_swiglu_impl /
           moe_raw.unpermute(fused=True)
  seed     bench.seed.permute / moe_raw.reference.weighted_bias_swiglu_impl (the seed's eager autograd function)
           / bench.seed.unpermute
The grouped matmul is torch's own (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``: one launch, expert
offsets on the device) for bf16 on a card that has it; otherwise a Python loop of torch.matmul over experts, which
needs the per-expert counts on the host (read once in make_layer, outside the timing). Both providers use the same
one, so the difference between them is the dispatch (permute, SwiGLU, unpermute) and its autograd.
Reported: layer ms (fwd+bwd, median), tokens/s, peak memory above the inputs and weights
(torch.cuda.max_memory_allocated), and the largest relative error (norm) between the two providers' y, dx, dlogits.
"""

from __future__ import annotations

import argparse
import sys

import torch

import moe_raw
from moe_raw import reference

from . import seed

LAYER_SHAPES = {  # name: (T, E, H, K, F)  -- F is the expert FFN width (W_up is [H, 2F], W_down [F, H])
    "DeepSeek-V3": (4096, 256, 7168, 8, 2048),
    "Mixtral-8x7B": (16384, 8, 4096, 2, 14336),
    "Qwen3-30B-A3B": (16384, 128, 2048, 8, 768),
}
QUICK_LAYER_SHAPE = "Qwen3-30B-A3B"
# Relative (Frobenius) difference allowed between the providers' outputs and grads: both round the same matmuls;
# they differ in where the SwiGLU rounds (moe_raw: once, from fp32; the seed: after every eager op).
LAYER_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_layer(T, E, H, K, F, dtype=torch.bfloat16, device="cuda", seed_=0):
    """Inputs and frozen expert weights of one layer; tokens_per_expert is read once here (a host list, used only by
    the loop fallback of grouped_matmul)."""
    gen = torch.Generator(device=device).manual_seed(seed_)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(T, E, device=device, dtype=torch.float32, generator=gen)
    w_up = torch.randn(E, H, 2 * F, device=device, dtype=dtype, generator=gen).mul_(H**-0.5)
    w_down = torch.randn(E, F, H, device=device, dtype=dtype, generator=gen).mul_(F**-0.5)
    gy = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    idx = logits.softmax(-1).topk(K, dim=-1).indices
    counts = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, idx, True).sum(0).tolist()
    return {"x": x, "logits": logits, "w_up": w_up, "w_down": w_down, "gy": gy, "K": K, "counts": counts}


def _torch_grouped_mm():
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_kind(rows: torch.Tensor) -> str:
    """Which grouped matmul grouped_matmul uses for these rows: "torch grouped_mm" or "loop of matmuls"."""
    if rows.is_cuda and rows.dtype == torch.bfloat16 and _torch_grouped_mm() is not None:
        if torch.cuda.get_device_capability(rows.device) >= (9, 0):
            return "torch grouped_mm"
    return "loop of matmuls"


def grouped_matmul(rows: torch.Tensor, w: torch.Tensor, counts, offsets=None) -> torch.Tensor:
    """rows [N, in] in expert-major order (counts[e] rows for expert e) times w [E, in, out] -> [N, out].
    offsets: int32 [E] cumulative row counts on the device (torch's grouped_mm; no host sync), else the loop."""
    if offsets is not None and grouped_mm_kind(rows) == "torch grouped_mm":
        return _torch_grouped_mm()(rows, w, offs=offsets)
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(rows[start : start + c] @ w[e])
        start += c
    if not outs:
        return rows.new_zeros(rows.shape[0], w.shape[2])
    return torch.cat(outs)


def layer_forward(provider: str, x, logits, w_up, w_down, K, counts):
    T, H = x.shape
    E = logits.shape[1]
    topv, topi = logits.softmax(-1).topk(K, dim=-1)
    rm = torch.zeros(T, E, dtype=torch.bool, device=x.device).scatter_(1, topi, True)
    probs = torch.zeros(T, E, dtype=logits.dtype, device=x.device).scatter(1, topi, topv)
    offsets = rm.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # on the device: no host sync
    if provider == "moe_raw":
        perm, pprobs, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=T * K, fused=True)
        h = grouped_matmul(perm, w_up, counts, offsets)
        a = moe_raw.weighted_bias_swiglu_impl(h, pprobs.unsqueeze(-1))
        return moe_raw.unpermute(grouped_matmul(a, w_down, counts, offsets), row_map, (T, H), fused=True)
    if provider == "seed":
        perm, pprobs, sidx = seed.permute(x, rm, probs)
        h = grouped_matmul(perm, w_up, counts, offsets)
        a = reference.weighted_bias_swiglu_impl(h, pprobs.unsqueeze(-1))
        return seed.unpermute(grouped_matmul(a, w_down, counts, offsets), sidx, (T, H), None, rm)
    raise ValueError(f"unknown provider {provider!r}")


def layer_step(provider: str, inputs: dict):
    """One forward + backward; returns (y, dx, dlogits) (fresh leaves each call)."""
    x = inputs["x"].detach().requires_grad_(True)
    logits = inputs["logits"].detach().requires_grad_(True)
    y = layer_forward(provider, x, logits, inputs["w_up"], inputs["w_down"], inputs["K"], inputs["counts"])
    y.backward(inputs["gy"])
    return y.detach(), x.grad, logits.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(inputs: dict) -> float:
    """Largest relative difference between moe_raw's and the seed's (y, dx, dlogits) in one layer."""
    ours = layer_step("moe_raw", inputs)
    theirs = layer_step("seed", inputs)
    return max(rel_err(a, b) for a, b in zip(ours, theirs, strict=True))


def bench_layer_shape(name, T, E, H, K, F, dtype=torch.bfloat16):
    """Rows of the layer case at one shape (CUDA): ms, tokens/s, peak extra memory, max rel error vs the seed."""
    from . import common

    inputs = make_layer(T, E, H, K, F, dtype)
    err = compare(inputs)
    ok = err <= LAYER_RTOL[dtype]
    rows = []
    for provider in ("moe_raw", "seed"):
        fn = lambda p=provider: layer_step(p, inputs)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        ms = common.do_bench(fn)
        rows.append({"kind": "layer", "shape": f"{name} T={T} E={E} H={H} K={K} F={F}", "op": "moe layer fwd+bwd",
                     "provider": provider, "ms": ms, "tokens_per_s": T / (ms * 1e-3), "peak_mem_GB": peak,
                     "max_rel_err": err, "note": ""})  # fmt: skip
    ours, theirs = rows
    ours["speedup_vs_seed"] = theirs["ms"] / ours["ms"]
    kind = grouped_mm_kind(inputs["x"])
    for r in rows:
        r["note"] = f"experts: {kind}"
    ours["note"] += (f"; {ours['speedup_vs_seed']:.2f}x faster than seed; outputs/grads "
                    f"{'match' if ok else 'DIFFER'} (max rel err {err:.1e}, tol {LAYER_RTOL[dtype]:.0e})")  # fmt: skip
    inputs.clear()  # free the weights before the next shape
    torch.cuda.empty_cache()
    return rows, ok


def main(argv=None):
    from .common import DTYPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"one shape ({QUICK_LAYER_SHAPE})")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    names = [QUICK_LAYER_SHAPE] if args.quick else list(LAYER_SHAPES)
    rc = 0
    print("| shape | provider | ms | tokens/s | peak GB | note |\n|---|---|---|---|---|---|")
    for name in names:
        rows, ok = bench_layer_shape(name, *LAYER_SHAPES[name], dtype=DTYPES[args.dtype])
        rc |= 0 if ok else 1
        for r in rows:
            print(f"| {r['shape']} | {r['provider']} | {r['ms']:.2f} | {r['tokens_per_s']:.3g} | "
                  f"{r['peak_mem_GB']:.2f} | {r['note']} |", flush=True)  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main())
