"""Benchmark of permute_quantized (issue 19): permute that writes FP8 rows and their scales in one pass, beside
moe_raw.permute followed by a torch quantize pass, eager and under torch.compile, same run, same card.

python -m bench.bench_fp8      (also run by ``python -m bench``, ``--ops fp8``)

Shapes: DeepSeek-V3 (T 4096, E 256, H 7168, K 8) and Qwen3-30B-A3B (T 16384, E 128, H 2048, K 8); every recipe
(rowwise, blockwise, mxfp8) to float8_e4m3fn, router probs given, num_out_tokens = N = T * K (no host sync).

Providers (each op row is one recipe):
  moe_raw              moe_raw.permute_quantized(x, routing_map, probs, num_out_tokens=N, recipe=recipe)
  seed                 moe_raw.permute(x, routing_map, probs, num_out_tokens=N, fused=True), then the recipe's torch
                       quantize pass on the permuted rows (moe_raw.reference_fp8.quantize, eager)
  seed torch.compile   the same permute, then torch.compile(dynamic=False) of that quantize pass (the recipe's
                       reference_fp8.quantize_<recipe>; compiled outside the timing)
All three should give the same bytes (the transcription is the specification): moe_raw's row notes whether its FP8
rows and scales equal the seed's bit for bit in this run, the compiled row whether the compiled pass equals eager.

Byte model (minimum traffic of the outputs, the same for every provider; s = bytes per token element):
  read the tokens T*H*s + write the FP8 rows N*H + write the scales N*S
  + permute's map and probs (bench_permute.bytes_permute_fwd): read the map T*E + probs (read N, write N, fp32)
    + write the row map 4*T*E
  S = scale bytes per row: rowwise 4, blockwise 4 * ceil(H / 128), mxfp8 H / 32 (E8M0 bytes).
The unfused providers also write the permuted rows in the token dtype and read them back: 2*N*H*s bytes more, which
moe_raw's row note gives in GB and as milliseconds at the measured copy bandwidth (the issue's target: faster than
permute + compiled quantize by at least that time, and >= 90% of copy).

Layer rows (``layer_rows``, op "FP8 up-projection"): examples/fp8_expert_layer.py's expert up-projection at
LAYER_SHAPES, FP8 (permute_quantized row-wise, align 16, then torch._scaled_grouped_mm on sm90) against bf16
(permute_and_pad, then torch._grouped_mm), weights quantized once outside the timing; TFLOP/s of the 2 * T * K * H * O
useful flops, and the example's check of the FP8 result against the bf16 one (within the FP8 error bound).
"""

from __future__ import annotations

import math
import sys

import torch

import moe_raw
from moe_raw import reference_fp8 as RF

from . import bench_permute, common

SHAPES = {"DeepSeek-V3": (4096, 256, 7168, 8), "Qwen3-30B-A3B": (16384, 128, 2048, 8)}  # name: (T, E, H, K)
RECIPES = RF.RECIPES
FP8 = torch.float8_e4m3fn
PROVIDERS = ("moe_raw", "seed", "seed torch.compile")
LAYER_SHAPES = {"Qwen3-30B-A3B": (4096, 128, 2048, 1536, 8)}  # name: (T, E, H, O = 2F, K), the example's default
LAYER_OP = "FP8 up-projection"
LAYER_PROVIDERS = ("moe_raw FP8 (permute_quantized + scaled grouped GEMM)", "bf16 (permute_and_pad + grouped GEMM)")


def scale_bytes_per_row(hidden: int, recipe: str) -> int:
    """Bytes of one row's scales: rowwise 4, blockwise 4 * ceil(H / 128), mxfp8 H / 32."""
    if recipe == "rowwise":
        return 4
    if recipe == "blockwise":
        return 4 * math.ceil(hidden / RF.BLOCK)
    return hidden // RF.MX_BLOCK


def bytes_permute_quantized(T, E, H, K, s, recipe, num_out=None) -> int:
    """The module docstring's model: tokens T*H*s + FP8 rows N*H + scales N*S + permute's map, probs and row map."""
    N = T * K if num_out is None else num_out
    fp8_rows = N * H + N * scale_bytes_per_row(H, recipe)
    map_and_probs = bench_permute.bytes_permute_fwd(T, E, H, K, s, num_out=N) - T * H * s - N * H * s
    return T * H * s + fp8_rows + map_and_probs


def bytes_saved(T, H, K, s, num_out=None) -> int:
    """What the fusion does not move: the permuted rows in the token dtype, written by permute and read back by the
    quantize pass (2 * N * H * s)."""
    N = T * K if num_out is None else num_out
    return 2 * N * H * s


def make_inputs(T, E, H, K, dtype=torch.bfloat16, device="cuda", seed=0):
    """Tokens [T, H] (standard normal), a top-K routing map [T, E] and softmax probs masked to it (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=gen)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, scores.topk(K, dim=1).indices, True)
    probs = torch.softmax(scores, dim=1) * routing_map
    x = torch.randn(T, H, generator=gen).to(dtype)
    return x.to(device), routing_map.to(device), probs.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (FP8 codes, fp32 or E8M0 scales), for bit-for-bit comparison (NaN included)."""
    return t.contiguous().view(torch.uint8)


def same_bits(ours, theirs) -> bool:
    """(q, scales) pairs equal bit for bit."""
    return all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ours, theirs, strict=True))


def bench_rows(copy_gbs, dtype=torch.bfloat16, shapes=None, recipes=RECIPES, device="cuda", timer=None,
               compile_fn=None) -> list:  # fmt: skip
    """Rows {shape, op, provider, ms, GB/s, pct_copy, note} of every shape and recipe, the three providers each.

    shapes: {name: (T, E, H, K)} (default SHAPES). timer(fn) -> ms (default common.do_bench, CUDA; the CPU tests pass
    a stub). compile_fn(fn) -> compiled fn (default torch.compile(fn, dynamic=False)); a failure to compile is a row
    note, not a crash."""
    timer = timer or common.do_bench
    compile_fn = compile_fn or (lambda fn: torch.compile(fn, dynamic=False))
    rows = []
    for name, shape in (shapes or SHAPES).items():
        rows += shape_rows(name, *shape, copy_gbs, dtype, recipes, device, timer, compile_fn)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def shape_rows(name, T, E, H, K, copy_gbs, dtype, recipes, device, timer, compile_fn) -> list:
    """``bench_rows`` at one shape."""
    N = T * K
    x, routing_map, probs = make_inputs(T, E, H, K, dtype, device)
    s = x.element_size()
    saved = bytes_saved(T, H, K, s)
    rows = []

    def row(op, provider, ms, nbytes, note=""):
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms and math.isfinite(ms) else float("nan")
        rows.append({"shape": name, "op": op, "provider": provider, "ms": ms, "GB/s": gbs,
                     "pct_copy": 100 * gbs / copy_gbs, "note": note})  # fmt: skip

    def permuted():
        return moe_raw.permute(x, routing_map, probs, num_out_tokens=N, fused=True)

    for recipe in recipes:
        op = f"permute_quantized {recipe}"
        nbytes = bytes_permute_quantized(T, E, H, K, s, recipe)

        def ours(recipe=recipe):
            return moe_raw.permute_quantized(x, routing_map, probs, num_out_tokens=N, recipe=recipe, fp8_dtype=FP8)

        def seed(recipe=recipe):
            rows_, pprobs, row_map = permuted()
            return RF.quantize(rows_, recipe, FP8), pprobs, row_map

        exact = same_bits(ours()[:2], seed()[0])
        note = "bit-exact vs seed" if exact else "DIFFERS from seed (permute + reference_fp8.quantize)"
        note += f"; fusion saves {saved / 1e9:.2f} GB ({saved / (copy_gbs * 1e9) * 1e3:.3f} ms at copy rate)"
        row(op, "moe_raw", timer(ours), nbytes, note)
        row(op, "seed", timer(seed), nbytes, "moe_raw.permute + reference_fp8.quantize (eager)")
        try:
            quantize = compile_fn(getattr(RF, f"quantize_{recipe}"))

            def compiled(quantize=quantize):
                rows_, pprobs, row_map = permuted()
                return quantize(rows_, FP8), pprobs, row_map

            same = same_bits(compiled()[0], seed()[0])  # the first call compiles, outside the timing
            cnote = "moe_raw.permute + torch.compile(quantize); " + (
                "bit-exact vs eager" if same else "DIFFERS from eager"
            )
            row(op, "seed torch.compile", timer(compiled), nbytes, cnote)
        except Exception as e:  # noqa: BLE001 - recorded in the table instead of stopping the benchmark
            row(op, "seed torch.compile", float("nan"), nbytes, f"failed: {type(e).__name__}: {str(e)[:80]}")
    return rows


def layer_rows(shapes=None, device="cuda", timer=None, gemm=None) -> list:
    """Rows of the FP8 expert layer (module docstring) at LAYER_SHAPES; [] without examples/ (an installed wheel).
    timer(fn) -> ms (default common.do_bench); gemm: the example's scaled GEMM (default: torch's where it runs)."""
    ex = common.example_module("fp8_expert_layer")
    if ex is None:
        return []
    rows = []
    for name, shape in (shapes or LAYER_SHAPES).items():
        rows += _layer_shape_rows(ex, name, shape, device, timer or common.do_bench, gemm)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _layer_shape_rows(ex, name, shape, device, timer, gemm) -> list:
    T, E, H, out_dim, K = shape
    x, routing_map, w = ex.make_inputs(T, E, H, out_dim, K, device)
    check = ex.compare(x, routing_map, w, T * K, ex.ALIGN, gemm)
    wq, sb = ex.quantize_weights(w)
    gemm_name = "torch._scaled_grouped_mm" if gemm is None and ex.scaled_grouped_mm_available(device) else "emulated"
    verdict = "within FP8 error" if check["ok"] else "NOT within FP8 error"
    runs = (
        (lambda: ex.fp8_up_projection(x, routing_map, wq, sb, T * K, ex.ALIGN, gemm),
         f"{gemm_name}; rel err vs bf16 {check['rel_err']:.4f} (limit {check['rel_limit']:.4f}): {verdict}"),
        (lambda: ex.bf16_up_projection(x, routing_map, w, T * K, ex.ALIGN), "torch._grouped_mm"),
    )  # fmt: skip
    rows = []
    for provider, (fn, note) in zip(LAYER_PROVIDERS, runs, strict=True):
        ms = timer(fn)
        tflops = 2 * T * K * H * out_dim / (ms * 1e-3) / 1e12
        rows.append({"shape": f"{name} T={T} E={E} H={H} O={out_dim} K={K}", "op": LAYER_OP, "provider": provider,
                     "ms": ms, "GB/s": float("nan"), "pct_copy": float("nan"),
                     "note": f"{tflops:.1f} TFLOP/s (2 T K H O flops); {note}"})  # fmt: skip
    return rows


def check(dtype, device) -> tuple[bool, str]:
    """Self-check: permute_quantized (every recipe, e4m3 and e5m2, probs, with and without align_size) equals
    permute / permute_and_pad followed by reference_fp8.quantize, bit for bit, with the same probs and row map."""
    T, E, H, K = 37, 8, 256, 2
    x, routing_map, probs = make_inputs(T, E, H, K, dtype, device, seed=1)
    bad = []
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for recipe in RECIPES:
            for align in (None, 16):
                q, scales, pprobs, row_map = moe_raw.permute_quantized(
                    x, routing_map, probs, num_out_tokens=T * K, recipe=recipe, fp8_dtype=fp8, align_size=align
                )
                if align is None:
                    rows_, want_probs, want_map = moe_raw.permute(
                        x, routing_map, probs, num_out_tokens=T * K, fused=True
                    )
                else:
                    rows_, want_probs, want_map, _, _ = moe_raw.permute_and_pad(x, routing_map, probs, align, T * K)
                want = RF.quantize(rows_.detach(), recipe, fp8)
                if not (same_bits((q, scales), want) and torch.equal(pprobs, want_probs)
                        and torch.equal(row_map, want_map)):  # fmt: skip
                    bad.append(f"{recipe}/{str(fp8).removeprefix('torch.float8_')}/align {align}")
    detail = f"T={T} E={E} H={H} K={K}: 3 recipes x e4m3/e5m2 x align None/16, bit for bit"
    return not bad, detail + (f"; differ: {', '.join(bad)}" if bad else "")


def main() -> int:
    return common.print_rows_main(bench_rows)


if __name__ == "__main__":
    sys.exit(main())
