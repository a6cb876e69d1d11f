"""Where the host time of a small permute + unpermute goes (launch-bound regime). python -m bench.profile_host"""

from __future__ import annotations

import cProfile
import pstats

import torch

import moe_raw
from moe_raw import _cupy_cache, _launch
from moe_raw._kernels import dispatch

from .common import host_us


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
