"""Benchmark of the dispatch extras (issue #7): sort_chunks_by_idxs, top-k index routing, permute_and_pad and
permute_with_row_map, each beside what a user runs without moe_raw, same run, same card.

python -m bench.bench_dispatch      (also run by ``python -m bench``, ``--ops sort_chunks,topk,pad``)

Byte models (s = bytes per token element, N = T * K routed rows):
  sort_chunks_by_idxs   read + write N * H * s (+ probs: 2 * N * 4)
  permute_topk          permute fwd's model (bench_permute.bytes_permute_fwd); the index -> map conversion is extra
  permute_and_pad       permute fwd's model with N + E * (align - 1) rows written (padding rows are written zeros)
  permute_with_row_map  read T * S * 4, write N' * S * 4 (per-1x128-block fp32 scales, S = H / 128)
Baselines: Megatron's unfused sort_chunks_by_idxs (split by sizes.tolist() + cat: two host syncs); the seed's permute
after the indices are scattered into a dense map in torch; moe_raw.permute without padding (the padding's cost).
"""

from __future__ import annotations

import sys

import torch

import moe_raw

from . import bench_permute, common, seed

SHAPE = ("DeepSeek-V3", 4096, 256, 7168, 8)  # name, T, E, H, K
EP = 8  # expert-parallel ranks: sort_chunks regroups EP * (E / EP) chunks
ALIGN = 128


def megatron_sort_chunks(x, split_sizes, sorted_idxs, probs=None):
    """Megatron's unfused path: host lists of the sizes and the order, then split + cat (rows past the sum are cut
    off there). Returns (rows, probs or None)."""
    sizes, order = split_sizes.tolist(), sorted_idxs.tolist()

    def regroup(t):
        chunks = torch.split(t, sizes, dim=0)
        return torch.cat([chunks[i] for i in order], dim=0)

    return regroup(x), (regroup(probs) if probs is not None else None)


def chunk_inputs(n_rows, num_experts, hidden, dtype):
    """sort_chunks_by_idxs' inputs after an expert-parallel all-to-all: rows [N, H] and probs [N] as EP ranks x E / EP
    local experts, multinomial chunk sizes [E], and the order that regroups them local-expert-major."""
    rows = torch.randn(n_rows, hidden, device="cuda").to(dtype)
    probs = torch.rand(n_rows, device="cuda")
    sizes = torch.distributions.Multinomial(n_rows, torch.ones(num_experts)).sample().to(torch.int64).cuda()
    order = torch.arange(num_experts).view(EP, num_experts // EP).t().reshape(-1).cuda()  # rank- -> expert-major
    return rows, probs, sizes, order


def dense_then_seed_permute(x, topk_idx, topk_probs, num_experts):
    """Without moe_raw: scatter the top-k indices into a dense map and probs, then the seed's permute."""
    T = x.shape[0]
    rm = torch.zeros(T, num_experts, dtype=torch.bool, device=x.device).scatter_(1, topk_idx, True)
    probs = torch.zeros(T, num_experts, dtype=topk_probs.dtype, device=x.device).scatter_(1, topk_idx, topk_probs)
    return seed.permute(x, rm, probs)


def bench_rows(copy_gbs, dtype=torch.bfloat16, shape=SHAPE):
    name, T, E, H, K = shape
    N = T * K
    x, rm, probs = bench_permute.make_inputs(T, E, H, K, dtype)
    s = x.element_size()
    rows = []

    def row(op, provider, ms, nbytes, note=""):
        gbs = nbytes / (ms * 1e-3) / 1e9 if nbytes else float("nan")
        rows.append({"shape": name, "op": op, "provider": provider, "ms": ms, "GB/s": gbs,
                     "pct_copy": 100 * gbs / copy_gbs if nbytes else float("nan"), "note": note})  # fmt: skip

    # sort_chunks_by_idxs: the rows after the all-to-all, EP ranks x E / EP local experts, regrouped expert-major
    perm, pperm, sizes, order = chunk_inputs(N, E, H, dtype)
    nbytes = 2 * N * H * s + 2 * N * 4
    ms = common.do_bench(lambda: moe_raw.sort_chunks_by_idxs(perm, sizes, order, pperm))
    row("sort_chunks_by_idxs", "moe_raw", ms, nbytes, f"{E} chunks")
    ms = common.do_bench(lambda: megatron_sort_chunks(perm, sizes, order, pperm))
    row("sort_chunks_by_idxs", "seed (megatron split+cat)", ms, nbytes, "two host syncs")

    # top-k index routing
    topv, topi = torch.softmax(torch.randn(T, E, device="cuda"), -1).topk(K, dim=-1)
    permute_bytes = bench_permute.bytes_permute_fwd(T, E, H, K, s)
    ms = common.do_bench(lambda: moe_raw.permute_topk(x, topi, E, topv, num_out_tokens=N, fused=True))
    row("permute_topk fwd", "moe_raw", ms, permute_bytes, "indices -> map (kernels/topk.cu), then permute")
    ms = common.do_bench(lambda: moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True))
    row("permute_topk fwd", "moe_raw mask form", ms, permute_bytes, "the same permute from a dense map")
    ms = common.do_bench(lambda: dense_then_seed_permute(x, topi, topv, E))
    row("permute_topk fwd", "seed", ms, permute_bytes, "scatter to a dense map + seed permute")

    # permute_and_pad (no host sync: num_out_tokens given, worst-case rows) and the FP8-scale move
    n_max = N + E * (ALIGN - 1)
    pad_bytes = T * H * s + n_max * H * s + T * E + 2 * n_max * 4 + 4 * T * E
    ms = common.do_bench(lambda: moe_raw.permute_and_pad(x, rm, probs, ALIGN, N))
    row(f"permute_and_pad fwd (align {ALIGN})", "moe_raw", ms, pad_bytes, f"{n_max} rows, padding written as zeros")
    ms_plain = common.do_bench(lambda: moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True))
    row(f"permute_and_pad fwd (align {ALIGN})", "moe_raw permute (unpadded)", ms_plain, permute_bytes)
    _, _, row_map, _, _ = moe_raw.permute_and_pad(x, rm, probs, ALIGN, N)
    scales = torch.rand(T, H // 128, device="cuda")
    scale_bytes = T * (H // 128) * 4 + n_max * (H // 128) * 4
    ms = common.do_bench(lambda: moe_raw.permute_with_row_map(scales, row_map, n_max))
    row("permute_with_row_map (fp32 1x128 scales)", "moe_raw", ms, scale_bytes, "launch-bound at this size")
    return rows


def main() -> int:
    return common.print_rows_main(bench_rows)


if __name__ == "__main__":
    sys.exit(main())
