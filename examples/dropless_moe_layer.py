"""A dropless MoE layer on moe_raw with no host sync, forward and backward, so that one CUDA graph holds all of it.

    python examples/dropless_moe_layer.py                        # CUDA: eager vs graph replay vs the reference
    python examples/dropless_moe_layer.py --preset deepseek-v3 --tokens 4096 --hidden 7168 --ffn 2048
    python examples/dropless_moe_layer.py --device cpu           # CPU: eager vs the reference (tiny sizes)

The layer (one token-choice MoE block, dropless, no shared expert). T tokens, hidden size H, E experts, K experts a
token, expert FFN width F, N = T * K rows; x and the expert weights in one dtype (bf16 on CUDA), the router in fp32
(Megatron's ``moe_router_dtype="fp32"``):

  1. router      logits = x.float() @ router_weight.T                                              [T, E] fp32
                 moe_raw.topk_routing_with_score_function(logits, K, ...)
                 -> probs [T, E] fp32 (0 off the picks), routing_map [T, E] bool (exactly K per token)
  2. permute     moe_raw.permute(x, routing_map, probs, num_out_tokens=N, fused=True)
                 -> rows [N, H] (expert-major), permuted probs [N] fp32, row map [T + 1, E] int32
  3. offsets     offs = routing_map.sum(0).cumsum(0) as int32                                      [E], on the device
  4. up          h = torch._grouped_mm(rows, w1 [E, H, 2F], offs=offs)                             [N, 2F]
  5. activation  a = moe_raw.weighted_bias_swiglu_impl(h, permuted_probs[:, None])                 [N, F]
                 (silu(gate) * up * prob: the router probs are applied here, as Megatron's experts do)
  6. down        o = torch._grouped_mm(a, w2 [E, F, H], offs=offs)                                 [N, H]
  7. unpermute   y = moe_raw.unpermute(o, row_map, (T, H), fused=True)                             [T, H]
                 (no probs: with the weighted activation Megatron's unpermute gets none)

Why nothing waits for the device: the router gives every token exactly K experts, so N = T * K is known on the host
and permute needs no count back (num_out_tokens given); torch's grouped GEMM takes the expert offsets as a device
tensor; every moe_raw op and every backward is a kernel launch on torch's current stream. So ``capture`` can record
forward and backward (d x, d router_weight, d w1, d w2) into one CUDA graph and ``CapturedStep.replay`` reruns it on
new tokens. On CUDA that needs torch's CUTLASS grouped GEMM (torch 2.10 / 2.11 ``_grouped_mm_cuda``), which runs
bf16 operands and output on sm90 / sm100 cards (H100, H200, B200); any other dtype or card takes its fallback, a loop
that copies ``offs`` to the host (a sync, and no capture). On every device its operands need 16-byte aligned rows
(H and F multiples of 8), and on the CPU it runs fp32 / bf16 / fp16.

``reference_moe`` is the same layer as Megatron's torch code computes it: Megatron's router (the installed
megatron-core's ``topk_routing_with_score_function`` when importable, else ``moe_raw.reference``'s transcription of
Megatron main), ``moe_raw.reference``'s permute / weighted SwiGLU / unpermute (the seed's masked_select permute, eager
SwiGLU autograd, scatter_add unpermute), and either the same grouped GEMM or Megatron's SequentialMLP loop of one
matmul per expert. It reads the routed count on the host (permute without num_out_tokens), as Megatron does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch
import torch.nn.functional as F

import moe_raw
from moe_raw import reference


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Megatron's router settings (the ``moe_router_*`` config fields) for ``topk_routing_with_score_function``.

    expert_bias: the layer keeps an [E] fp32 bias (DeepSeek-V3's aux-loss-free load balancing) that ranks sigmoid /
    sqrtsoftplus scores and gets no gradient; training updates it in place between steps (a captured graph reads the
    new values: it is static memory)."""

    topk: int
    score_function: str = "softmax"
    use_pre_softmax: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    scaling_factor: float | None = None
    expert_bias: bool = False

    def kwargs(self, expert_bias: torch.Tensor | None) -> dict:
        """Keyword arguments of topk_routing_with_score_function after (logits, topk); Megatron's names."""
        return {
            "use_pre_softmax": self.use_pre_softmax,
            "num_groups": self.num_groups,
            "group_topk": self.group_topk,
            "scaling_factor": self.scaling_factor,
            "score_function": self.score_function,
            "expert_bias": expert_bias,
        }


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model's MoE layer: E experts, its router, and its sizes (H, F; T of a typical micro-batch)."""

    num_experts: int
    router: RouterConfig
    hidden: int
    ffn: int
    tokens: int


PRESETS = {
    # DeepSeek-V3: sigmoid scores, expert bias, 8 groups of 32 experts with the best 4 kept, probs scaled by 2.5.
    "deepseek-v3": Preset(
        num_experts=256,
        router=RouterConfig(8, "sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5, expert_bias=True),
        hidden=7168,
        ffn=2048,
        tokens=4096,
    ),
    # Qwen3-30B-A3B: softmax over the top 8 logits (Megatron's moe_router_pre_softmax=False, which is Qwen3's
    # norm_topk_prob=True: softmax over all E, top 8, renormalised).
    "qwen3": Preset(num_experts=128, router=RouterConfig(8), hidden=2048, ffn=768, tokens=16384),
}


# ------------------------------------------------------------------------------------------------------- the layer


def expert_offsets(routing_map: torch.Tensor) -> torch.Tensor:
    """routing_map [T, E] bool -> offs [E] int32: offs[e] = rows of experts 0..e (cumulative tokens per expert), the
    end of expert e's block in permute's expert-major rows. Computed on the device: no host sync."""
    return routing_map.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def grouped_mm(rows: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows [N, in] in expert-major blocks ending at offs [E] int32 (offs[-1] == N) times w [E, in, out] -> [N, out].

    torch._grouped_mm, differentiable w.r.t. rows and w. N = 0 (T = 0, a static shape: no sync to decide it) takes
    a plain matmul instead: torch's grouped GEMM has no empty case in backward."""
    if rows.shape[0] == 0:
        return rows @ w[0]
    return torch._grouped_mm(rows, w, offs=offs)


def loop_mm(rows: torch.Tensor, w: torch.Tensor, counts: list) -> torch.Tensor:
    """Megatron's SequentialMLP way: one matmul per expert over host counts (``counts[e]`` rows for expert e)."""
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(rows.split(counts))])


def dropless_moe(x, router_weight, w1, w2, cfg: RouterConfig, expert_bias=None) -> torch.Tensor:
    """The layer on moe_raw, with no host sync (see the module docstring for the steps).

    Args:
        x: [T, H] tokens (bf16 on CUDA; fp32 / bf16 / fp16 on CPU).
        router_weight: [E, H] fp32 (Megatron's router weight layout; the router runs in its dtype).
        w1: [E, H, 2F] up-projections ([gate | up] halves), x's dtype. w2: [E, F, H] down-projections, x's dtype.
        cfg: the router settings. expert_bias: [E] fp32 or None (used when cfg.expert_bias).

    Returns:
        y [T, H] in x's dtype. Differentiable w.r.t. x, router_weight, w1 and w2.
    """
    num_tokens, hidden = x.shape
    logits = F.linear(x.to(router_weight.dtype), router_weight)  # [T, E] in the router's dtype
    probs, routing_map = moe_raw.topk_routing_with_score_function(logits, cfg.topk, **cfg.kwargs(expert_bias))
    rows, permuted_probs, row_map = moe_raw.permute(
        x, routing_map, probs, num_out_tokens=num_tokens * cfg.topk, fused=True
    )
    offs = expert_offsets(routing_map)
    h = grouped_mm(rows, w1, offs)  # [N, 2F]
    a = moe_raw.weighted_bias_swiglu_impl(h, permuted_probs.unsqueeze(-1))  # [N, F], probs applied
    return moe_raw.unpermute(grouped_mm(a, w2, offs), row_map, (num_tokens, hidden), fused=True)


@functools.cache
def megatron_router():
    """The installed megatron-core's torch router (``moe_utils.topk_routing_with_score_function``), or None (looked
    up once)."""
    try:
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    except ImportError:
        return None
    return topk_routing_with_score_function


def reference_router():
    """(router function, its name): megatron-core's when importable, else moe_raw.reference's transcription of
    Megatron main (torch.topk, as Megatron calls it)."""
    fn = megatron_router()
    if fn is not None:
        return fn, "megatron-core"
    return reference.topk_routing_with_score_function, "moe_raw.reference (Megatron main's transcription)"


def reference_moe(x, router_weight, w1, w2, cfg: RouterConfig, expert_bias=None, *, router=None, experts="grouped_mm"):
    """The same layer as Megatron's torch code runs it (the "seed" path), for checks and timing.

    Args: as ``dropless_moe``, and
        router: a ``topk_routing_with_score_function`` with Megatron's signature (default: ``reference_router()``).
        experts: "grouped_mm" (the layer's grouped GEMM, device offsets) or "loop" (one matmul per expert over the
            counts read on the host: Megatron's SequentialMLP, and a check of the offsets independent of them).

    Returns y [T, H] in x's dtype, differentiable as dropless_moe's. Host syncs: permute's routed count (the seed's
    masked_select) and, with experts="loop", the counts.
    """
    router = router or reference_router()[0]
    num_tokens, hidden = x.shape
    logits = F.linear(x.to(router_weight.dtype), router_weight)
    probs, routing_map = router(logits, cfg.topk, **cfg.kwargs(expert_bias))
    rows, permuted_probs, sorted_indices = reference.permute(x, routing_map, probs)
    if experts == "loop":
        counts = routing_map.sum(0).tolist()
        h = loop_mm(rows, w1, counts)
    elif experts == "grouped_mm":
        offs = expert_offsets(routing_map)
        h = grouped_mm(rows, w1, offs)
    else:
        raise ValueError(f"experts must be 'grouped_mm' or 'loop', got {experts!r}")
    a = reference.weighted_bias_swiglu_impl(h, permuted_probs.unsqueeze(-1))
    o = loop_mm(a, w2, counts) if experts == "loop" else grouped_mm(a, w2, offs)
    return reference.unpermute(o, sorted_indices, (num_tokens, hidden))  # the seed's scatter_add, no probs


class DroplessMoELayer(torch.nn.Module):
    """The layer's weights, ``forward`` = ``dropless_moe`` and ``reference`` = ``reference_moe`` on them.

    Parameters: router_weight [E, H] fp32, w1 [E, H, 2F] and w2 [E, F, H] in ``dtype``; buffer expert_bias [E] fp32
    (or None). Weights are drawn on ``device`` from ``seed``: router rows ~ N(0, 1 / H) (logits of about unit size),
    w1 ~ N(0, 1 / H), w2 ~ N(0, 1 / F), expert_bias ~ 0.05 N(0, 1) (enough to change some picks).
    """

    def __init__(self, hidden, ffn, num_experts, router: RouterConfig, dtype=torch.bfloat16, device=None, seed=0):
        super().__init__()
        if hidden % 8 or ffn % 8:
            raise ValueError(f"the grouped GEMM needs 16-byte aligned rows: H and F multiples of 8, got {hidden} {ffn}")
        gen = torch.Generator(device=device or "cpu").manual_seed(seed)

        def draw(*shape, scale, dt=dtype):
            return torch.randn(*shape, device=device, dtype=dt, generator=gen).mul_(scale)

        self.cfg = router
        self.router_weight = torch.nn.Parameter(draw(num_experts, hidden, scale=hidden**-0.5, dt=torch.float32))
        self.w1 = torch.nn.Parameter(draw(num_experts, hidden, 2 * ffn, scale=hidden**-0.5))
        self.w2 = torch.nn.Parameter(draw(num_experts, ffn, hidden, scale=ffn**-0.5))
        bias = draw(num_experts, scale=0.05, dt=torch.float32) if router.expert_bias else None
        self.register_buffer("expert_bias", bias)

    @classmethod
    def from_preset(cls, name: str, hidden=None, ffn=None, **kw):
        p = PRESETS[name]
        return cls(hidden or p.hidden, ffn or p.ffn, p.num_experts, p.router, **kw)

    @property
    def trainable(self) -> tuple:
        """(router_weight, w1, w2): what train_step differentiates, besides x."""
        return self.router_weight, self.w1, self.w2

    def forward(self, x):
        return dropless_moe(x, self.router_weight, self.w1, self.w2, self.cfg, self.expert_bias)

    def reference(self, x, router=None, experts="grouped_mm"):
        return reference_moe(
            x, self.router_weight, self.w1, self.w2, self.cfg, self.expert_bias, router=router, experts=experts
        )


# ------------------------------------------------------------------------------------- a step, and its CUDA graph


def train_step(layer: DroplessMoELayer, x, gy, reference=False, **reference_kw):
    """One forward and backward of sum(y * gy): (y [T, H], (dx [T, H], d router_weight [E, H], dw1, dw2)), all new
    tensors (torch.autograd.grad: nothing accumulates into .grad). reference=True runs ``layer.reference``."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    y = layer.reference(x, **reference_kw) if reference else layer(x)
    grads = torch.autograd.grad(y, (x, *layer.trainable), gy)
    return y.detach(), grads


@dataclasses.dataclass
class CapturedStep:
    """One captured ``train_step``: static input tensors x [T, H] and gy [T, H], static outputs y and grads
    (dx, d router_weight, dw1, dw2). ``replay`` overwrites the outputs in place: clone what must outlive the next
    replay. The weights are read where they live, so in-place updates to them (an optimizer step, expert_bias) take
    effect at the next replay."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    gy: torch.Tensor
    y: torch.Tensor
    grads: tuple

    def replay(self, x=None, gy=None):
        """Copy new tokens (and output gradient) into the static inputs, replay; returns (y, grads), the static
        tensors. x, gy: [T, H] like the captured ones (T is fixed by the capture)."""
        with torch.no_grad():
            if x is not None:
                self.x.copy_(x)
            if gy is not None:
                self.gy.copy_(gy)
        self.graph.replay()
        return self.y, self.grads


def capture(layer: DroplessMoELayer, x, gy, warmup: int = 3, pool=None) -> CapturedStep:
    """Capture forward + backward of ``layer`` on static copies of x [T, H] and gy [T, H] in one CUDA graph.

    Warm-up runs on a side stream first (it compiles moe_raw's kernels and lets torch settle its allocations), as
    ``torch.cuda.graph`` asks. Any host sync inside the step makes the capture raise. CUDA, bf16 weights (torch's
    grouped GEMM without a host read of the offsets)."""
    if not x.is_cuda:
        raise ValueError("capture needs CUDA tensors")
    if layer.w1.dtype != torch.bfloat16:
        raise ValueError(f"capture needs bf16 expert weights (torch's grouped GEMM reads offs on the host otherwise), "
                         f"got {layer.w1.dtype}")  # fmt: skip
    static_x = x.detach().clone().requires_grad_(True)
    static_gy = gy.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            train_step(layer, static_x, static_gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        y, grads = train_step(layer, static_x, static_gy)
    return CapturedStep(graph, static_x, static_gy, y, grads)


# --------------------------------------------------------------------------------------------------------- demo


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius, in fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _ms(fn, iters: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, help="T (default: the preset's on CUDA, 256 on CPU)")
    ap.add_argument("--hidden", type=int, help="H (default: the preset's on CUDA, 64 on CPU)")
    ap.add_argument("--ffn", type=int, help="F (default: the preset's on CUDA, 32 on CPU)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    p = PRESETS[args.preset]
    T = args.tokens or (p.tokens if cuda else 256)
    H = args.hidden or (p.hidden if cuda else 64)
    Fw = args.ffn or (p.ffn if cuda else 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    layer = DroplessMoELayer(H, Fw, p.num_experts, p.router, dtype=dtype, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(1)
    x, gy, x2 = (torch.randn(T, H, device=args.device, generator=gen).to(dtype) for _ in range(3))
    _, router_name = reference_router()
    print(f"{args.preset}: T={T} E={p.num_experts} K={p.router.topk} H={H} F={Fw} {dtype} on {args.device}; "
          f"reference router: {router_name}")  # fmt: skip

    ours, theirs = train_step(layer, x, gy), train_step(layer, x, gy, reference=True)
    errs = [rel_err(a, b) for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), strict=True)]
    print("rel err vs reference (y, dx, d router_weight, dw1, dw2): " + ", ".join(f"{e:.1e}" for e in errs))
    del ours, theirs
    eager_ms = _ms(lambda: train_step(layer, x, gy), args.iters, cuda)
    ref_ms = _ms(lambda: train_step(layer, x, gy, reference=True), args.iters, cuda)
    print(f"fwd+bwd eager (moe_raw)      {eager_ms:8.3f} ms  {T / eager_ms * 1e3:.3g} tokens/s")
    print(f"fwd+bwd reference (Megatron) {ref_ms:8.3f} ms  {T / ref_ms * 1e3:.3g} tokens/s")
    ok = max(errs) < (3e-2 if dtype == torch.bfloat16 else 1e-4)
    if cuda:
        step = capture(layer, x, gy)
        y, grads = step.replay(x2)
        want_y, want_grads = train_step(layer, x2, gy)
        same = all(torch.equal(a, b) for a, b in zip((y, *grads), (want_y, *want_grads), strict=True))
        print(f"graph replay on new tokens bit-identical to eager: {same}")
        ok &= same
        graph_ms = _ms(step.graph.replay, args.iters, cuda)
        print(f"fwd+bwd CUDA graph replay    {graph_ms:8.3f} ms  {T / graph_ms * 1e3:.3g} tokens/s "
              f"({eager_ms / graph_ms:.2f}x eager, {ref_ms / graph_ms:.2f}x reference)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
