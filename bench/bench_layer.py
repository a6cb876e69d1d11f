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

The dropless layer (op "dropless layer fwd+bwd", bench_dropless_shape): examples/dropless_moe_layer.py, the whole
block with its router on moe_raw's kernel (fp32 logits = x @ W_router at the model's router settings) and trainable
experts, so the backward also gives d W_router, d w1 and d w2; nothing in it syncs the host, so one CUDA graph holds
forward and backward. Rows at the shapes of DROPLESS_PRESETS, same run, same weights and tokens:
  moe_raw dropless eager       the layer, eager autograd
  moe_raw dropless CUDA graph  the same step captured once (examples' capture()), replayed (bf16 on CUDA only); its
                               replay on other tokens must equal eager on them bit for bit
  seed dropless                the reference layer: Megatron's torch router (installed megatron-core, else
                               moe_raw.reference's transcription of main), moe_raw.reference's permute / weighted
                               SwiGLU / unpermute (the seed), the same torch grouped GEMM
The graph row's "peak GB" is the memory the captured graph holds (its pool and static outputs). Where the weights
and their gradients would not fit the card, F is scaled down by powers of 2 (the shape and note say so). The example
is loaded from examples/ next to bench/ (a checkout); an installed moe_raw.bench has no examples and skips the rows.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import moe_raw
from moe_raw import reference

from . import common, seed

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


def rel_err(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 26) -> float:
    """||a - b|| / ||b|| in fp64, a chunk of elements at a time (DeepSeek-V3's expert-weight gradients are 15 GB in
    bf16: a whole fp64 copy does not fit beside the layer)."""
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i : i + chunk].double(), b[i : i + chunk].double()
        num += float(((x - y) ** 2).sum())
        den += float((y**2).sum())
    return (num / max(den, 1e-60)) ** 0.5


def compare(inputs: dict) -> float:
    """Largest relative difference between moe_raw's and the seed's (y, dx, dlogits) in one layer."""
    ours = layer_step("moe_raw", inputs)
    theirs = layer_step("seed", inputs)
    return max(rel_err(a, b) for a, b in zip(ours, theirs, strict=True))


def bench_layer_shape(name, T, E, H, K, F, dtype=torch.bfloat16):
    """Rows of the layer case at one shape (CUDA): ms, tokens/s, peak extra memory, max rel error vs the seed."""
    inputs = make_layer(T, E, H, K, F, dtype)
    err = compare(inputs)
    ok = err <= LAYER_RTOL[dtype]
    rows = []
    for provider in ("moe_raw", "seed"):
        fn = lambda p=provider: layer_step(p, inputs)  # noqa: E731
        fn()
        peak = common.peak_gb(fn)
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


# ------------------------------------------------------------------------------ the dropless layer (examples/)

# LAYER_SHAPES name -> the example's router preset (E and K must agree with the shape)
DROPLESS_PRESETS = {"DeepSeek-V3": "deepseek-v3", "Qwen3-30B-A3B": "qwen3"}
DROPLESS_OP = "dropless layer fwd+bwd"


def dropless_module():
    """examples/dropless_moe_layer.py as the module ``dropless_moe_layer``, or None without examples/ (a wheel)."""
    return common.example_module("dropless_moe_layer")


def dropless_bytes(T, E, H, K, F, itemsize=2) -> int:
    """Device memory the dropless rows need at most: the expert weights, their gradients in the graph's static
    outputs, in one eager step and in the step compared with it (4 x 3 E H F), plus a step's activations and their
    gradients (rows, h, a, o and the reference's copies: about 4 N (2H + 3F) elements)."""
    return itemsize * (4 * 3 * E * H * F + 4 * T * K * (2 * H + 3 * F))


def fit_ffn(T, E, H, K, F, free_bytes, itemsize=2) -> int:
    """F, halved (kept a multiple of 8) until dropless_bytes fits in 90% of free_bytes."""
    while F > 8 and dropless_bytes(T, E, H, K, F, itemsize) > 0.9 * free_bytes:
        F = max(8, F // 2 // 8 * 8)
    return F


def _step_rows_equal(a, b) -> bool:
    """(y, grads) pairs equal bit for bit."""
    return all(torch.equal(u, v) for u, v in zip((a[0], *a[1]), (b[0], *b[1]), strict=True))


def bench_dropless_shape(name, T, E, H, K, F, dtype=torch.bfloat16, device="cuda", timer=None):
    """Rows of the dropless layer at one shape: eager, CUDA graph replay (CUDA, bf16), and the seed reference layer.

    Returns (rows, ok): ok when the eager layer's y and gradients (x, W_router, w1, w2) are within LAYER_RTOL of the
    reference's and the graph's replay on new tokens equals eager on them bit for bit. timer(fn) -> ms (default:
    common.do_bench, CUDA); on the CPU pass one (the CPU tests do) and there are no graph or memory figures."""
    dl = dropless_module()
    if dl is None:
        return [], True
    preset = dl.PRESETS[DROPLESS_PRESETS[name]]
    if (preset.num_experts, preset.router.topk) != (E, K):
        raise ValueError(f"{name}: shape E={E} K={K} but preset {DROPLESS_PRESETS[name]!r} routes "
                         f"E={preset.num_experts} K={preset.router.topk}")  # fmt: skip
    cuda = torch.device(device).type == "cuda"
    if timer is None:
        timer = common.do_bench
    F0, notes = F, []
    if cuda:
        torch.cuda.empty_cache()
        F = fit_ffn(T, E, H, K, F, torch.cuda.mem_get_info(device)[0], dtype.itemsize)
        if F != F0:
            notes.append(f"F scaled from {F0} to {F} to fit the card's memory")
    layer = dl.DroplessMoELayer(H, F, E, preset.router, dtype=dtype, device=device, seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    x, gy, x2 = (torch.randn(T, H, device=device, dtype=dtype, generator=gen) for _ in range(3))
    router_name = dl.reference_router()[1]

    ours, theirs = dl.train_step(layer, x, gy), dl.train_step(layer, x, gy, reference=True)
    err = max(rel_err(a, b) for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), strict=True))
    del ours, theirs
    tol = LAYER_RTOL[dtype]
    ok = err <= tol

    def measure(fn):
        if not cuda:
            return timer(fn), float("nan")
        fn()
        peak = common.peak_gb(fn)
        return timer(fn), peak

    shape = f"{name} T={T} E={E} H={H} K={K} F={F}"
    results = {
        "moe_raw dropless eager": measure(functools.partial(dl.train_step, layer, x, gy)),
        "seed dropless": measure(functools.partial(dl.train_step, layer, x, gy, reference=True)),
    }
    graph_note = "CUDA graph: CUDA only"
    if cuda and dtype != torch.bfloat16:
        graph_note = "CUDA graph: bf16 only (torch's grouped GEMM reads offs on the host in other dtypes)"
    elif cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved()
        step = dl.capture(layer, x, gy)
        torch.cuda.empty_cache()  # the warm-up's cache; the graph's pool stays
        held = (torch.cuda.memory_reserved() - reserved) / 1e9
        identical = True
        for tokens in (x2, x):  # replay on new tokens, then on the first ones again: each equals eager on them
            replayed = step.replay(tokens)
            identical &= _step_rows_equal(replayed, dl.train_step(layer, tokens, gy))
        ok &= identical
        graph_note = f"CUDA graph replay {'==' if identical else 'DIFFERS FROM'} eager, bit for bit"
        results["moe_raw dropless CUDA graph"] = (timer(step.graph.replay), held)
        del step
    rows = []
    seed_ms = results["seed dropless"][0]
    for provider, (ms, peak) in results.items():
        row = {"kind": "layer", "shape": shape, "op": DROPLESS_OP, "provider": provider, "ms": ms,
               "tokens_per_s": T / (ms * 1e-3), "peak_mem_GB": peak, "max_rel_err": err}  # fmt: skip
        if provider.startswith("moe_raw"):
            row["speedup_vs_seed"] = seed_ms / ms
        note = [f"router {router_name}" if provider.startswith("seed") else "router moe_raw kernel", *notes]
        if provider.startswith("moe_raw"):
            note.append(f"{row['speedup_vs_seed']:.2f}x faster than seed")
        if provider == "moe_raw dropless eager":
            note.append(f"vs seed {'match' if err <= tol else 'DIFFER'} (max rel err of y, dx, dW_router, dw1, dw2 "
                        f"{err:.1e}, tol {tol:.0e}); {graph_note}")  # fmt: skip
        if provider == "moe_raw dropless CUDA graph":
            note.append("peak GB = memory the graph holds")
        row["note"] = "; ".join(note)
        rows.append(row)
    del layer, x, gy, x2
    if cuda:
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
        if name in DROPLESS_PRESETS:
            drows, dok = bench_dropless_shape(name, *LAYER_SHAPES[name], dtype=DTYPES[args.dtype])
            rows, ok = rows + drows, ok and dok
        rc |= 0 if ok else 1
        for r in rows:
            print(f"| {r['shape']} | {r['provider']} | {r['ms']:.2f} | {r['tokens_per_s']:.3g} | "
                  f"{r['peak_mem_GB']:.2f} | {r['note']} |", flush=True)  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main())
