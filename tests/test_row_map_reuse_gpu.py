"""unpermute(fused=False, routing_map=...) reuses the row map that permute built, but only for the same, unmodified
routing map with the same row count; anything else rebuilds it (GPU). The memo lives beside the code, not on the
user's tensor, and dies with the sorted_indices tensor."""

import gc

import pytest
import torch

import moe_raw
from moe_raw import permutation, reference

if not torch.cuda.is_available():
    pytest.skip("CUDA device needed", allow_module_level=True)

pytestmark = pytest.mark.gpu


def _inputs(T=64, E=8, K=2, H=32):
    scores = torch.rand(T, E, device="cuda")
    rm = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, scores.topk(K, 1).indices, True)
    probs = torch.rand(T, E, device="cuda") * rm
    x = torch.randn(T, H, device="cuda")
    return x, rm, probs


@pytest.mark.parametrize("change", ["none", "in_place", "other_map_same_values", "drop_and_pad"])
def test_reuse_only_when_valid(change):
    x, rm, probs = _inputs()
    T, H = x.shape
    n = int(rm.sum())
    dap = change == "drop_and_pad"
    out, _, idx = moe_raw.permute(x, rm, probs, num_out_tokens=n, drop_and_pad=dap)
    assert not hasattr(idx, "_moe_raw_row_map")  # nothing stored on the user's tensor
    assert permutation._recall_row_map(idx, rm, dap) is not None
    rm_used = rm
    if change == "in_place":
        rm[:, 0] = ~rm[:, 0]  # bumps rm._version: the cached map must not be used
    elif change == "other_map_same_values":
        rm_used = rm.clone()
    y = moe_raw.unpermute(out, idx, (T, H), probs * rm_used, rm_used, drop_and_pad=dap)
    expected = reference.unpermute(
        out.cpu().double(), idx.cpu(), (T, H), (probs * rm_used).cpu().double(), rm_used.cpu(), drop_and_pad=dap
    )
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    if change == "in_place":
        assert permutation._recall_row_map(idx, rm, dap) is None  # a modified map is never reused
    key = id(idx)
    del idx
    gc.collect()
    assert key not in permutation._ROW_MAPS  # the entry (and its row map) went with the tensor
