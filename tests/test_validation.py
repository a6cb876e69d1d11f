"""Every validation error of the public ops: type, message naming the argument, and no cast or crash (CPU)."""

import pytest
import torch

import moe_raw

T, E, H = 6, 4, 8


@pytest.fixture
def inputs():
    x = torch.randn(T, H)
    rm = torch.zeros(T, E, dtype=torch.bool)
    rm[torch.arange(T), torch.arange(T) % E] = True
    probs = torch.rand(T, E) * rm
    return x, rm, probs


def _permute_cases(x, rm, probs):
    return [
        (dict(tokens=x.tolist()), TypeError, "tokens must be a torch.Tensor"),
        (dict(tokens=x[0]), ValueError, "tokens must be 2-D"),
        (dict(tokens=x.to(torch.int32)), TypeError, "tokens must have dtype"),
        (dict(routing_map=rm[:-1]), ValueError, "routing_map has 5 rows but there are 6 tokens"),
        (dict(routing_map=rm.float()), TypeError, "routing_map must have dtype"),
        (dict(routing_map=rm[0]), ValueError, "routing_map must be 2-D"),
        (dict(routing_map=rm[:, :0]), ValueError, "at least one expert"),
        (dict(probs=probs[:, :-1]), ValueError, r"probs must be \[num_tokens, num_experts\]"),
        (dict(probs=probs.to(torch.int64)), TypeError, "probs must have dtype"),
        (dict(num_out_tokens=-1), ValueError, "num_out_tokens must be >= 0"),
        (dict(num_out_tokens=3.0), TypeError, "num_out_tokens must be an int"),
        (dict(num_out_tokens=True), TypeError, "num_out_tokens must be an int"),
        (dict(drop_and_pad=True), ValueError, "drop_and_pad=True needs num_out_tokens"),
    ]


@pytest.mark.parametrize("i", range(13))  # one per _permute_cases entry
def test_permute_errors(inputs, i):
    x, rm, probs = inputs
    override, exc, msg = _permute_cases(x, rm, probs)[i]
    kw = dict(tokens=x, routing_map=rm, probs=probs)
    kw.update(override)
    with pytest.raises(exc, match=msg):
        moe_raw.permute(**kw)


def test_permute_float_routing_map_is_a_dtype_error(inputs):
    x, _, probs = inputs
    with pytest.raises(TypeError, match="routing_map must have dtype"):
        moe_raw.permute(x, torch.zeros(T, E, requires_grad=True), probs)


def test_permute_experts_limit(inputs):
    x, _, _ = inputs
    with pytest.raises(ValueError, match="at most 4096 experts"):
        moe_raw.permute(x, torch.zeros(T, 4097, dtype=torch.bool))


def test_permute_device_mismatch_meta(inputs):
    x, rm, probs = inputs
    with pytest.raises(ValueError, match="probs is on meta but tokens is on cpu"):
        moe_raw.permute(x, rm, probs.to("meta"))


@pytest.fixture
def permuted(inputs):
    x, rm, probs = inputs
    out, _, idx = moe_raw.permute(x, rm, probs)
    _, _, row_map = moe_raw.permute(x, rm, probs, fused=True)
    return out, idx, row_map, rm, probs


def test_unpermute_errors(permuted):
    out, idx, row_map, rm, probs = permuted
    n = out.shape[0]
    cases = [
        (dict(permuted_tokens=out[0]), ValueError, "permuted_tokens must be 2-D"),
        (dict(permuted_tokens=out.to(torch.int32)), TypeError, "permuted_tokens must have dtype"),
        (dict(sorted_indices=idx[:-1]), ValueError, f"sorted_indices has {n - 1} entries but permuted_tokens has {n}"),
        (dict(sorted_indices=idx.float()), TypeError, "sorted_indices must have dtype"),
        (dict(restore_shape=(T, H + 1)), ValueError, "restore_shape hidden 9 != permuted_tokens.shape"),
        (dict(restore_shape=(T,)), ValueError, r"restore_shape must be \(num_tokens, hidden\)"),
        (dict(restore_shape=5), TypeError, "restore_shape must be a"),
        (dict(routing_map=None), ValueError, "routing_map is required when probs is given"),
        (dict(routing_map=rm[:-1]), ValueError, "routing_map has 5 rows but there are 6 tokens"),
        (dict(probs=probs[:, :1]), ValueError, r"probs must be \[num_tokens, num_experts\]"),
    ]
    for override, exc, msg in cases:
        kw = dict(permuted_tokens=out, sorted_indices=idx, restore_shape=(T, H), probs=probs, routing_map=rm)
        kw.update(override)
        with pytest.raises(exc, match=msg):
            moe_raw.unpermute(**kw)


def test_unpermute_fused_errors(permuted):
    out, idx, row_map, rm, probs = permuted
    with pytest.raises(TypeError, match=r"with fused=True sorted_indices must be permute\(fused=True\)'s row map"):
        moe_raw.unpermute(out, idx, (T, H), probs, fused=True)  # the int64 index is not a row map
    with pytest.raises(ValueError, match=r"\[T\+3, E\]\) with T = restore_shape\[0\] = 5"):
        moe_raw.unpermute(out, row_map, (T - 1, H), probs, fused=True)
    with pytest.raises(ValueError, match="probs must be"):
        moe_raw.unpermute(out, row_map, (T, H), probs[:, :2], fused=True)


def test_unpermute_device_mismatch(permuted):
    out, idx, row_map, rm, probs = permuted
    with pytest.raises(ValueError, match="probs is on meta but permuted_tokens is on cpu"):
        moe_raw.unpermute(out, idx, (T, H), probs.to("meta"), rm)


def test_valid_call_after_errors(inputs):
    x, rm, probs = inputs
    with pytest.raises(ValueError):
        moe_raw.permute(x, rm[:-1])
    out, pp, idx = moe_raw.permute(x, rm, probs)
    y = moe_raw.unpermute(out, idx, (T, H), probs, rm)
    torch.testing.assert_close(y, x * probs.sum(1, keepdim=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device needed: these limits belong to the kernels")
def test_kernel_limits_on_cuda():
    x = torch.randn(4, 8, device="cuda")
    rm = torch.ones(4, 2, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match="num_out_tokens = 2147483646 exceeds"):
        moe_raw.permute(x, rm, num_out_tokens=2**31 - 2)
    with pytest.raises(ValueError, match="tokens is on cuda:0 but|routing_map is on cpu but tokens is on cuda"):
        moe_raw.permute(x, rm.cpu())
    # the process stays usable
    out, _, idx = moe_raw.permute(x, rm, num_out_tokens=8)
    torch.testing.assert_close(moe_raw.unpermute(out, idx, (4, 8)), 2 * x)
