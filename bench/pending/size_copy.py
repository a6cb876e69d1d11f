"""How much of a short kernel's "% of copy" is the size of the call: a device copy of each op's own bytes, timed as
the benchmark times the op, against the 2 GiB copy the benchmark's percentages divide by.

    PYTHONPATH=. python3 bench/pending/size_copy.py

python -m bench divides an op's bytes by its median time (triton's do_bench: L2 flushed, each call timed alone with
CUDA events) and then by the bandwidth of a 2 GiB copy (4 GiB moved, about 1 ms on an H200). An op moving 0.5 GB
(DeepSeek-V3's gathers, 0.13 ms there) pays the same launch, ramp-up and last-wave tail as the copy does, over a
tenth of the bytes. A copy of the op's own bytes (half read, half written: dst.copy_(src) of bytes / 2) timed the same
way says how far from the 2 GiB rate any kernel of that size stays: where that copy itself runs at, say, 95% of the
2 GiB rate, an op at 91% is 96% of what a copy of its size reaches. Prints, per bench shape and op, the op's bytes,
the sized copy's ms and GB/s, and its share of the 2 GiB copy (the ceiling the op's "% of copy" is measured under).
"""

from __future__ import annotations

import torch

from bench import common
from bench.bench_permute import SHAPES, bytes_permute_fwd, bytes_unpermute_bwd, bytes_unpermute_fwd
from bench.bench_swiglu import SHAPES as GLU_SHAPES
from bench.bench_swiglu import bytes_glu_bwd, bytes_swiglu_fwd


def sized_copy_gbs(nbytes: int) -> tuple[float, float]:
    """(ms, GB/s counting read + write) of a device copy moving nbytes in all (nbytes / 2 read, nbytes / 2 written)."""
    half = nbytes // 2
    gbs = common.copy_bandwidth_gbs(half)
    return 2 * half / (gbs * 1e6), gbs


def rows() -> list[tuple[str, str, int]]:
    """(shape, op, bytes) of every bench shape: permute fwd (= permute bwd's bytes within 1%), unpermute fwd, unpermute
    bwd; SwiGLU fwd and bwd."""
    out = []
    for name, (t, e, h, k) in SHAPES.items():
        out.append((name, "permute fwd", bytes_permute_fwd(t, e, h, k, 2)))
        out.append((name, "unpermute fwd", bytes_unpermute_fwd(t, e, h, k, 2)))
        out.append((name, "unpermute bwd", bytes_unpermute_bwd(t, e, h, k, 2)))
    for name, (n, f) in GLU_SHAPES.items():
        out.append((name, "swiglu fwd", bytes_swiglu_fwd(n, f, 2)))
        out.append((name, "swiglu bwd", bytes_glu_bwd(n, f, 2)))
    return out


def main() -> int:
    big = common.copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: 2 GiB copy {big:.0f} GB/s (read + write)\n")
    print("| shape | op | op bytes (MB) | sized copy ms | sized copy GB/s | % of the 2 GiB copy |")
    print("|---|---|---|---|---|---|")
    for shape, op, nbytes in rows():
        ms, gbs = sized_copy_gbs(nbytes)
        print(f"| {shape} | {op} | {nbytes / 1e6:.0f} | {ms:.4f} | {gbs:.0f} | {100 * gbs / big:.1f}% |", flush=True)
    print(f"\n2 GiB copy again: {common.copy_bandwidth_gbs():.0f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
