"""The Python share of the dispatch ops' and SwiGLU's host time, on any machine (no GPU): python -m bench.host_python

The CUDA launchers of permute / unpermute and of the SwiGLU kernels run here on CPU tensors with the driver left
out: ``cuLaunchKernel``, the current-device and current-stream queries are no-ops, each kernel handle a stand-in,
and torch allocates on the CPU. What remains is every line of Python the CUDA path runs (validation, sizing,
allocation calls, argument packing), so two commits can be compared on a CPU-only machine; the driver's launch cost
(~2-6 us a launch) and the CUDA caching allocator's extra over a CPU allocation are not in these figures:
bench.host_times on a GPU gives the whole host time. Each figure: the best of 5 loops of 20000 calls, microseconds
per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit

import torch

import moe_raw
from moe_raw import _launch
from moe_raw._kernels import dispatch as D
from moe_raw._kernels import glu_launch as G
from moe_raw._kernels.glu_codegen import _abi

T, E, H, K = 16, 8, 1024, 2  # bench.host_times' launch-bound shape
N, F = 16, 2048  # bench.bench_swiglu's host-time shape


def stub_driver() -> None:
    """Route permute / unpermute's CPU tensors through their CUDA launchers with the driver calls replaced."""
    torch.cuda.current_device = lambda: 0
    _launch._get_device = lambda: 0
    _launch._raw_stream = lambda index: 0
    _launch._launch_kernel = lambda *args: None

    def function(family, name, index):
        kern = _launch.compiled_kernel(1, _launch.SIGNATURES[family][_launch.base_name(name)])
        _launch._kernels[(family, name, index)] = kern
        return kern

    _launch.function = function

    def permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):  # its CUDA branch
        out, pprobs, row_map, indices = D._permute_cuda(
            tokens, routing_map, probs, num_out_tokens, drop_and_pad, want_indices=not fused
        )
        return out, pprobs, (row_map if fused else indices), row_map

    def gather(rows, row_map, num_tokens, probs=None, g_pprobs=None, dprobs_dtype=None):  # its CUDA branch
        return D._gather_cuda(rows, row_map, num_tokens, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=dprobs_dtype)

    D._permute_forward, D._gather = permute_forward, gather

    # the SwiGLU kernels: CPU tensors (device index -1) take the fast launch on "device 0", whose first use of a spec
    # caches a stand-in handle in Numba's ABI where Numba would compile
    G._on_kernels = lambda *tensors: True
    G._fast_kernel = lambda spec, index: G._compiled.setdefault((spec, index), _launch.compiled_kernel(1, _abi(spec)))
    launch_kernel = G._launch_kernel
    G._launch_kernel = lambda spec, tensors, spans, scalars, n_rows, index: launch_kernel(
        spec, tensors, spans, scalars, n_rows, 0
    )


def cases() -> dict:
    x = torch.randn(T, H, dtype=torch.bfloat16)
    scores = torch.randn(T, E)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, scores.topk(K, 1).indices, True)
    probs = torch.softmax(scores, 1) * routing_map
    n = T * K
    y, w = torch.randn(N, 2 * F).to(torch.bfloat16), torch.rand(N, 1)
    permuted, _, row_map = moe_raw.permute(x, routing_map, probs, num_out_tokens=n, fused=True)

    def pair():
        out, _, rows = moe_raw.permute(x, routing_map, probs, num_out_tokens=n, fused=True)
        return moe_raw.unpermute(out, rows, (T, H), probs, fused=True)

    return {
        "permute(fused, num_out_tokens, probs)": lambda: moe_raw.permute(
            x, routing_map, probs, num_out_tokens=n, fused=True
        ),
        "unpermute(fused, probs)": lambda: moe_raw.unpermute(permuted, row_map, (T, H), probs, fused=True),
        "permute + unpermute": pair,
        "  _permute_cuda (no validation)": lambda: D._permute_cuda(x, routing_map, probs, n, False, want_indices=False),
        "  _gather_cuda (no validation)": lambda: D._gather_cuda(permuted, row_map, T, probs=probs),
        "  one launch (7 arguments)": lambda: _launch.launch(
            "permute", "moe_raw::routing_pack<256>", x.device, 1, 256, (0, 1, E, 1, T, E, 0)
        ),
        "  torch.empty (CPU)": lambda: torch.empty((n, H), dtype=torch.bfloat16),
        f"swiglu (N={N} F={F}, bf16)": lambda: moe_raw.swiglu(y),
        "weighted_swiglu (fp32 weights)": lambda: moe_raw.weighted_swiglu(y, w),
        "  _swiglu_fwd (no validation)": lambda: G._swiglu_fwd(y, None, G._SWIGLU),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_python", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)
    stub_driver()
    rows = {}
    print(f"Python host time of the CUDA path, driver stubbed, T={T} E={E} H={H} K={K} (us per call)")
    for name, fn in cases().items():
        fn()
        rows[name] = min(timeit.repeat(fn, number=args.calls, repeat=5)) / args.calls * 1e6
        print(f"{rows[name]:8.2f}  {name}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
