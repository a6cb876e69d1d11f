"""Where the host time of a small permute + unpermute goes (launch-bound regime). python -m bench.profile_host

Also times one launch of an empty 7-argument kernel four ways, to tell the driver's share of a launch from the
wrapper's: moe_raw's launcher, CuPy's launchKernel with moe_raw's packed parameter buffer (no Python around it),
CuPy's launchKernel with a kernelParams pointer array, and cuLaunchKernel through ctypes with the packed buffer.
"""

from __future__ import annotations

import cProfile
import ctypes
import pstats

import numpy as np
import torch

import moe_raw
from moe_raw import _cupy_cache, _launch
from moe_raw._kernels import dispatch

from .common import host_us

_KEEP_ALIVE: list = []  # the host buffers whose addresses the launch variants pass


def launch_variants() -> dict:
    """Empty-kernel launches on torch's current stream of cuda:0: {label: fn}."""
    cupy = _cupy_cache.cupy()
    drv = cupy.cuda.driver
    src = (
        'extern "C" __global__ void noop(long long a, long long b, long long c, long long d, long long e, '
        "long long f, long long g) {}"
    )
    with cupy.cuda.Device(0):
        fn = cupy.RawKernel(src, "noop").kernel  # a cupy Function: .ptr is the CUfunction
    kern = _launch.compiled_kernel(fn.ptr, "qqqqqqq", owner=fn)
    args = (1, 2, 3, 4, 5, 6, 7)
    stream = _launch._raw_stream(0)
    # moe_raw's launch packs the arguments into this thread's parameter buffer (_launch._param_buffer); the raw
    # variants pass that buffer as it is left, so they are timed right after the first entry, which repacks it
    _launch.launch_compiled(kern, 0, 1, 32, args)
    base = _launch._tls.base
    values = np.array(args, dtype=np.int64)
    pointers = np.array([values.ctypes.data + 8 * i for i in range(len(args))], dtype=np.uint64)
    params = pointers.ctypes.data
    _KEEP_ALIVE.extend((fn, values, pointers))
    cu_launch = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    cu_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    cu_launch.restype = ctypes.c_int
    status = cu_launch(fn.ptr, 1, 1, 1, 32, 1, 1, 0, stream, None, base)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernel through ctypes returned {status}")
    return {
        "noop: moe_raw launch_compiled": lambda: _launch.launch_compiled(kern, 0, 1, 32, args),
        "noop: cupy launchKernel, packed buffer": lambda: drv.launchKernel(
            fn.ptr, 1, 1, 1, 32, 1, 1, 0, stream, 0, base
        ),
        "noop: cupy launchKernel, kernelParams": lambda: drv.launchKernel(
            fn.ptr, 1, 1, 1, 32, 1, 1, 0, stream, params, 0
        ),
        "noop: ctypes cuLaunchKernel, packed buffer": lambda: cu_launch(
            fn.ptr, 1, 1, 1, 32, 1, 1, 0, stream, None, base
        ),
    }


def main():
    T, E, H, K = 16, 8, 1024, 2
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(T, E, device="cuda")
    rm = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, scores.topk(K, 1).indices, True)
    probs = torch.softmax(scores, 1) * rm
    N = T * K
    _, ws, ws_buf = dispatch._map_and_workspace(rm)
    out, pp, row_map, _ = dispatch._permute_cuda(x, rm, probs, N, False, want_indices=False)
    dev = x.device
    parts = {
        "torch.empty (1 alloc)": lambda: torch.empty(64, device="cuda"),
        "torch eager op (x.add_(0))": lambda: x.add_(0),
        "_launch.function lookup": lambda: _launch.function("permute", "moe_raw::routing_pack<256>", 0),
        "_launch._raw_stream": lambda: _launch._raw_stream(0),
        "cupy getDevice": lambda: _cupy_cache.cupy().cuda.runtime.getDevice(),
        "_launch.ptr(tensor)": lambda: _launch.ptr(x),
        "launch routing_pack (7 args)": lambda: _launch.launch(
            "permute", "moe_raw::routing_pack<256>", dev, 1, 256, (rm.data_ptr(), 1, E, 1, T, E, ws)
        ),
        "_tables": lambda: dispatch._tables(rm, ws),
        "_permute_cuda": lambda: dispatch._permute_cuda(x, rm, probs, N, False, want_indices=False),
        "_gather_cuda": lambda: dispatch._gather_cuda(out, row_map, T, probs=probs),
        "permute(fused) public": lambda: moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True),
        "unpermute(fused) public": lambda: moe_raw.unpermute(out, row_map, (T, H), probs, fused=True),
    }
    parts.update(launch_variants())
    for name, fn in parts.items():
        print(f"{host_us(fn):8.1f} us  {name}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        o, p2, m = moe_raw.permute(x, rm, probs, num_out_tokens=N, fused=True)
        moe_raw.unpermute(o, m, (T, H), probs, fused=True)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
