"""Unpermute's forward, permute's backward and unpermute's backward in one line per run, for same-run A/Bs of kernel
trees (bench/pending/ab.sh), as bench/permute_fwd.py is for permute's forward:

    python -m bench.gather_ab [label]

At every bench shape (bf16): unpermute with probs (fused row map), permute's backward with the permuted-probs
gradient, unpermute's backward with probs (ms, % of the copy bandwidth measured in the same process, by the byte
models of bench/bench_permute.py).
"""

from __future__ import annotations

import sys

import torch

import moe_raw
from moe_raw._kernels import dispatch

from . import common
from .bench_permute import SHAPES, bytes_permute_bwd, bytes_unpermute_bwd, bytes_unpermute_fwd, make_inputs


def main() -> None:
    copy = common.copy_bandwidth_gbs()
    cells = [f"copy {copy:.0f} GB/s"]
    for name, (T, E, H, K) in SHAPES.items():
        x, rm, probs = make_inputs(T, E, H, K)
        n, s = T * K, x.element_size()
        out, pprobs, row_map = moe_raw.permute(x, rm, probs, num_out_tokens=n, fused=True)
        g_perm, g_pp, g_out = torch.randn_like(out), torch.randn_like(pprobs), torch.randn_like(x)
        timed = (
            ("unpermute fwd", lambda: moe_raw.unpermute(out, row_map, (T, H), probs, fused=True),  # noqa: B023
             bytes_unpermute_fwd(T, E, H, K, s)),
            ("permute bwd", lambda: dispatch._gather_cuda(g_perm, row_map, T, g_pprobs=g_pp,  # noqa: B023
                                                          dprobs_dtype=probs.dtype),  # noqa: B023
             bytes_permute_bwd(T, E, H, K, s)),
            ("unpermute bwd", lambda: dispatch._unpermute_bwd_cuda(g_out, out, row_map, n, probs, True),  # noqa: B023
             bytes_unpermute_bwd(T, E, H, K, s)),
        )  # fmt: skip
        parts = []
        for op, fn, nbytes in timed:
            ms = common.do_bench(fn)
            parts.append(f"{op} {ms:.4f} ({100 * nbytes / (ms * 1e-3) / 1e9 / copy:.1f}%)")
        cells.append(f"{name} " + " ".join(parts))
        x = rm = probs = out = pprobs = row_map = g_perm = g_pp = g_out = timed = None
        torch.cuda.empty_cache()
    print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
