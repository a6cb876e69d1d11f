"""One autograd backward's host time on CUDA beside the router's and the dispatch pair's: python -m bench.autograd_floor

At small sizes a forward + backward is host-bound, and much of its host time is torch's autograd engine: this puts
moe_raw's fwd+bwd next to two floors measured in the same process, a C++ node (``(x * 2).backward``) and a trivial
Python ``autograd.Function`` (what every custom op, moe_raw's and Transformer Engine's alike, pays), with the
engine's device threads on (torch's default: a CUDA backward runs on a worker thread) and off
(``torch.autograd.set_multithreading_enabled(False)``: on the calling thread). Rows: Mixtral's router at T 4096
(bench.bench_router's step), moe_raw and the seed, and bench.host_times' permute + unpermute round trip at T 16.
Each figure: bench.common.host_us three times (median of 7 loops of 200 calls each).
"""

from __future__ import annotations

import torch

import moe_raw
from moe_raw import reference as R

from . import common, host_times
from .bench_router import _args, _fwd_bwd


class _Twice(torch.autograd.Function):
    """y = 2x with a Python backward: the floor of any custom autograd.Function."""

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        return g * 2.0


def main() -> None:
    logits, K, kw = _args("Mixtral", 4096, torch.float32)

    def floor_cpp():
        x = logits.detach().requires_grad_(True)
        (x * 2.0).backward(torch.ones_like(x))
        return x.grad

    def floor_python():
        x = logits.detach().requires_grad_(True)
        _Twice.apply(x).backward(torch.ones_like(x))
        return x.grad

    rows = {
        "permute + unpermute fwd+bwd (autograd), T 16": host_times.cases()["permute + unpermute fwd+bwd (autograd)"],
        "C++ node (x*2).backward": floor_cpp,
        "Python Function (Twice).backward": floor_python,
        "moe_raw router fwd+bwd": lambda: _fwd_bwd(moe_raw.topk_routing_with_score_function, logits, K, kw),
        "seed router fwd+bwd": lambda: _fwd_bwd(R.topk_routing_with_score_function, logits, K, kw),
    }
    print(f"host us per call, {torch.cuda.get_device_name()}")
    for threads in (True, False):
        torch.autograd.set_multithreading_enabled(threads)
        for label, fn in rows.items():
            us = " / ".join(f"{common.host_us(fn):.1f}" for _ in range(3))
            print(f"device threads {'on ' if threads else 'off'} | {label} | host us {us}", flush=True)
    torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
