"""permute / unpermute benchmark: moe_raw vs the seed's torch path, same run, same card.

python -m bench.bench_permute [--quick] [--out bench/results/permute.json]

Byte models (minimum traffic, s = bytes per token element, N = routed rows, bool routing map):
  map build         read routing map T*E bytes (tables are O(T*E/8) and stay in L2)
  permute fwd       read T*H*s + write N*H*s + read map T*E + probs (read N, write N) + write row map 4*T*E
  unpermute fwd     read N*H*s + write T*H*s + read row map 4*T*E + read N probs
  permute bwd       read N*H*s + write T*H*s + read row map 4*T*E (+ N probs-grad reads, T*E dprobs writes)
  unpermute bwd     read T*H*s + write N*H*s + read N*H*s (dprobs needs the rows) + row map + probs
Percentages are of the device copy bandwidth measured in the same run (bytes read + written by dst.copy_(src)).
"""

from __future__ import annotations

import argparse
import sys

import torch

import moe_raw
from moe_raw._kernels import dispatch

from . import common, seed

SHAPES = {  # name: (T, E, H, K)
    "DeepSeek-V3": (4096, 256, 7168, 8),
    "T16k-E128-H4096-K6": (16384, 128, 4096, 6),
    "T16k-E4-H7168-K1": (16384, 4, 7168, 1),
    "Mixtral-8x7B": (16384, 8, 4096, 2),
    "Qwen3-30B-A3B": (16384, 128, 2048, 8),
}


def bytes_map_build(T, E):
    """Row map from the routing map: read the bool map (T*E bytes)."""
    return T * E


def bytes_permute_fwd(T, E, H, K, s, num_out=None, seed_indices=False):
    """permute fwd with probs: read tokens T*H*s + write N*H*s + read map T*E + probs (read N, write N, fp32)
    + write the row map 4*T*E (moe_raw) or the int64 sorted indices 8*N (the seed, seed_indices=True)."""
    N = T * K if num_out is None else num_out
    return T * H * s + N * H * s + T * E + 2 * N * 4 + (8 * N if seed_indices else 4 * T * E)


def bytes_unpermute_fwd(T, E, H, K, s, num_out=None):
    """unpermute fwd with probs: read N*H*s + write T*H*s + read the row map 4*T*E + read N fp32 probs."""
    N = T * K if num_out is None else num_out
    return N * H * s + T * H * s + 4 * T * E + N * 4


def bytes_permute_bwd(T, E, H, K, s, num_out=None):
    """permute bwd: read N*H*s + write T*H*s + row map 4*T*E + read N probs-grads + write T*E fp32 dprobs."""
    N = T * K if num_out is None else num_out
    return N * H * s + T * H * s + 4 * T * E + N * 4 + T * E * 4


def bytes_unpermute_bwd(T, E, H, K, s, num_out=None):
    """unpermute bwd: read T*H*s + write N*H*s + re-read the N*H*s rows (dprobs) + row map + probs + dprobs."""
    N = T * K if num_out is None else num_out
    return T * H * s + 2 * N * H * s + 4 * T * E + N * 4 + T * E * 4


def make_inputs(T, E, H, K, dtype=torch.bfloat16):
    scores = torch.randn(T, E, device="cuda")
    idx = scores.topk(K, dim=1).indices
    rm = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, idx, True)
    probs = torch.softmax(scores, dim=1) * rm
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    return x, rm, probs


def bench_shape(name, T, E, H, K, copy_gbs, dtype=torch.bfloat16):
    x, rm, probs = make_inputs(T, E, H, K, dtype)
    N = T * K
    s = x.element_size()
    rows = []

    def row(op, provider, ms, nbytes, note=""):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            {
                "shape": name,
                "op": op,
                "provider": provider,
                "ms": ms,
                "GB/s": gbs,
                "pct_copy": 100 * gbs / copy_gbs,
                "note": note,
            }
        )

    map_bytes = bytes_map_build(T, E)
    # map build (tables) alone
    _, ws, _ws_buf = dispatch._map_and_workspace(rm)
    ms_map = common.do_bench(lambda: dispatch._tables(rm, ws))
    row("map build", "moe_raw", ms_map, map_bytes)

    # permute forward with probs, num_out_tokens given (no sync), fused index
    f_perm = lambda: moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)  # noqa: E731
    ms = common.do_bench(f_perm)
    row("permute fwd", "moe_raw", ms, bytes_permute_fwd(T, E, H, K, s))
    ms_seed = common.do_bench(lambda: seed.permute(x, rm, probs))
    row("permute fwd", "seed", ms_seed, bytes_permute_fwd(T, E, H, K, s, seed_indices=True))
    rows[-3]["note"] = f"{100 * ms_map / ms:.1f}% of permute fwd"

    out, pprobs, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)
    _, _, sidx = seed.permute(x, rm, probs)
    unp_bytes = bytes_unpermute_fwd(T, E, H, K, s)
    ms = common.do_bench(lambda: moe_raw.unpermute(out, row_map, (T, H), probs, fused=True))
    row("unpermute fwd", "moe_raw", ms, unp_bytes)
    ms = common.do_bench(lambda: seed.unpermute(out, sidx, (T, H), probs, rm))
    row("unpermute fwd", "seed", ms, unp_bytes)
    compiled_fwd_rows(row, x, rm, probs, out, sidx, T, E, H, K, s)

    g_perm = torch.randn_like(out)
    g_pp = torch.randn_like(pprobs)
    g_out = torch.randn_like(x)
    ms = common.do_bench(lambda: dispatch._gather_cuda(g_perm, row_map, T, g_pprobs=g_pp, dprobs_dtype=probs.dtype))
    row("permute bwd", "moe_raw", ms, bytes_permute_bwd(T, E, H, K, s))
    ms = common.do_bench(seed_backward(lambda xi, pi: seed.permute(xi, rm, pi)[:2], x, probs, (g_perm, g_pp)))
    row("permute bwd", "seed", ms, bytes_permute_bwd(T, E, H, K, s), "autograd.grad of the seed's graph")
    ms = common.do_bench(lambda: dispatch._unpermute_bwd_cuda(g_out, out, row_map, N, probs, True))
    row("unpermute bwd", "moe_raw", ms, bytes_unpermute_bwd(T, E, H, K, s))
    seed_unpermute = lambda oi, pi: (seed.unpermute(oi, sidx, (T, H), pi, rm),)  # noqa: E731
    ms = common.do_bench(seed_backward(seed_unpermute, out, probs, (g_out,)))
    row("unpermute bwd", "seed", ms, bytes_unpermute_bwd(T, E, H, K, s), "autograd.grad of the seed's graph")

    # autograd round trip: permute -> unpermute with probs, forward + backward
    def round_trip(mod, **kw):
        xi = x.detach().requires_grad_(True)
        pi = probs.detach().requires_grad_(True)

        fused = kw.get("fused", False)

        def fn():
            o, pp, idx = mod.permute(xi, rm, pi, **kw)
            y = mod.unpermute(o, idx, (T, H), pi, None if fused else rm, fused=fused)
            y.backward(g_out)

        return fn

    ms_ours = common.do_bench(round_trip(moe_raw, num_out_tokens=N))
    ms_fused = common.do_bench(round_trip(moe_raw, num_out_tokens=N, fused=True))
    ms_seed = common.do_bench(round_trip(seed))
    row("round trip fwd+bwd", "moe_raw", ms_ours, 0, f"{ms_seed / ms_ours:.1f}x faster than seed")
    row("round trip fwd+bwd", "moe_raw fused", ms_fused, 0, f"{ms_seed / ms_fused:.1f}x faster than seed")
    row("round trip fwd+bwd", "seed", ms_seed, 0)
    for r in rows[-3:]:
        r["GB/s"] = r["pct_copy"] = float("nan")
    return rows


def seed_backward(fwd, a, b, grads):
    """A callable that runs only the backward of the seed's graph fwd(a, b) (built once, retained): what autograd
    spends on the seed's backward, for its bwd rows."""
    ai, bi = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    outs = fwd(ai, bi)
    return lambda: torch.autograd.grad(outs, (ai, bi), grads, retain_graph=True)


def compiled_fwd_rows(row, x, rm, probs, out, sidx, T, E, H, K, s):
    """torch.compile(seed) rows for permute fwd and unpermute fwd (default mode; the seed's data-dependent shapes
    break the graph, so the compiled function runs in pieces). A failure to compile is a row note, not a crash."""
    for op, fn, args, nbytes in (
        ("permute fwd", seed.permute, (x, rm, probs), bytes_permute_fwd(T, E, H, K, s, seed_indices=True)),
        ("unpermute fwd", seed.unpermute, (out, sidx, (T, H), probs, rm), bytes_unpermute_fwd(T, E, H, K, s)),
    ):
        try:
            compiled = torch.compile(fn)
            compiled(*args)  # compile outside the timing
            row(op, "torch.compile(seed)", common.do_bench(lambda c=compiled, a=args: c(*a)), nbytes)
        except Exception as e:  # noqa: BLE001 - recorded in the table instead of stopping the benchmark
            row(op, "torch.compile(seed)", float("nan"), nbytes, f"failed: {type(e).__name__}: {str(e)[:80]}")


def peak_memory_rows(name, T, E, H, K, dtype=torch.bfloat16):
    """Peak memory above the inputs of permute -> unpermute with probs, forward and backward (autograd), moe_raw
    (fused, num_out_tokens given) against the seed, at one shape."""
    x, rm, probs = make_inputs(T, E, H, K, dtype)
    g = torch.randn_like(x)
    rows = []

    def ours(xi, pi):
        o, _, m = moe_raw.permute(xi, rm, pi, num_out_tokens=T * K, fused=True)
        return moe_raw.unpermute(o, m, (T, H), pi, fused=True)

    def theirs(xi, pi):
        o, _, idx = seed.permute(xi, rm, pi)
        return seed.unpermute(o, idx, (T, H), pi, rm)

    for provider, fwd in (("moe_raw", ours), ("seed", theirs)):
        xi, pi = x.detach().requires_grad_(True), probs.detach().requires_grad_(True)
        fwd(xi, pi).backward(g)  # warm-up: compile, allocator pools
        xi.grad = pi.grad = None
        peak = common.peak_gb(lambda f=fwd, a=xi, b=pi: f(a, b).backward(g))
        rows.append({"kind": "memory", "shape": name, "op": "permute+unpermute fwd+bwd peak memory",
                     "provider": provider, "peak_mem_GB": peak, "note": "above inputs"})  # fmt: skip
    rows[0]["note"] = f"above inputs; {rows[0]['peak_mem_GB'] / rows[1]['peak_mem_GB']:.2f}x the seed's"
    return rows


def _host_fns(T, E, H, K):
    x, rm, probs = make_inputs(T, E, H, K)
    N = T * K

    def ours():
        o, pp, m = moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)
        moe_raw.unpermute(o, m, (T, H), probs, fused=True)

    def ours_unfused():
        o, pp, idx = moe_raw.permute(x, rm, probs, num_out_tokens=N)
        moe_raw.unpermute(o, idx, (T, H), probs, rm)

    def theirs():
        o, pp, idx = seed.permute(x, rm, probs)
        seed.unpermute(o, idx, (T, H), probs, rm)

    return (("moe_raw fused", ours), ("moe_raw unfused", ours_unfused), ("seed", theirs))


def host_time_rows():
    """Host microseconds per permute + unpermute pair at T 16 and 128 (launch-bound), every provider's loops
    interleaved (common.host_us_many)."""
    E, H, K = 8, 1024, 2
    fns = {(T, provider): fn for T in (16, 128) for provider, fn in _host_fns(T, E, H, K)}
    us = common.host_us_many(fns)
    return [
        {"shape": f"T={T} E={E} H={H} K={K}", "op": "permute+unpermute (fwd, no grad)", "provider": provider,
         "us": us[T, provider]}
        for T, provider in fns
    ]  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--out", default=None, help="write a JSON record here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device found: nothing to benchmark")
        return 0
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs()
    write_gbs = common.write_bandwidth_gbs()
    print(f"# {env['gpu']}  torch {env['torch']}  cupy {env['cupy']}  sha {env['git_sha']}")
    print(
        f"# measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write); write-only (memset): "
        f"{write_gbs:.0f} GB/s"
    )
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    rows = []
    for name, (T, E, H, K) in shapes.items():
        print(f"... {name}", file=sys.stderr, flush=True)
        rows += bench_shape(name, T, E, H, K, copy_gbs)
        torch.cuda.empty_cache()
    hrows = host_time_rows()
    print("\n| shape | op | provider | ms | GB/s | % of copy | note |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['op']} | {r['provider']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
            f"{r['pct_copy']:.0f}% | {r['note']} |"
        )
    print("\n| shape | op | provider | host us / call (median of 7 x 200) |\n|---|---|---|---|")
    for r in hrows:
        print(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['us']:.1f} |")
    if args.out:
        common.write_json(
            args.out, {"env": env, "copy_GBps": copy_gbs, "write_GBps": write_gbs, "rows": rows, "host_rows": hrows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
