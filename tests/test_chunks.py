"""sort_chunks_by_idxs (issue #7): the reference against Megatron's split/cat on the CPU (CI), the kernel against
the reference on the GPU (bit-exact: a pure move), its backward, edge cases, no host sync, graph replay."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_cuda

import moe_raw
from bench.bench_dispatch import megatron_sort_chunks
from moe_raw import _validate, reference


def random_case(n_splits, n_rows, tail=0, hidden=8, dtype=torch.float32, zero_frac=0.3, gen_seed=0):
    """split sizes (some zero) summing to n_rows, a random permutation, input [n_rows + tail, hidden], probs."""
    g = torch.Generator().manual_seed(gen_seed)
    cuts = torch.sort(torch.randint(0, n_rows + 1, (n_splits - 1,), generator=g)).values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_rows])])
    sizes = bounds.diff()
    sizes[torch.rand(n_splits, generator=g) < zero_frac] = 0
    sizes[-1] += n_rows - int(sizes.sum())  # keep the sum
    order = torch.randperm(n_splits, generator=g)
    x = torch.randn(n_rows + tail, hidden, generator=g).to(dtype)
    probs = torch.rand(n_rows + tail, generator=g)
    return x, sizes, order, probs


# ------------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("n_splits,n_rows", [(1, 5), (4, 0), (8, 37), (64, 1000)])
def test_reference_is_megatrons_split_cat(n_splits, n_rows):
    x, sizes, order, probs = random_case(n_splits, n_rows)
    out, pout = reference.sort_chunks_by_idxs(x, sizes, order, probs)
    exp, pexp = megatron_sort_chunks(x, sizes, order, probs)
    assert torch.equal(out, exp) and torch.equal(pout, pexp)


def test_rows_past_the_chunks_stay_in_place():
    x, sizes, order, probs = random_case(6, 20, tail=7)
    out, pout = moe_raw.sort_chunks_by_idxs(x, sizes, order, probs)
    exp, pexp = megatron_sort_chunks(x[:20], sizes, order, probs[:20])
    assert torch.equal(out[:20], exp) and torch.equal(out[20:], x[20:])
    assert torch.equal(pout[:20], pexp) and torch.equal(pout[20:], probs[20:])


def test_by_hand():
    x = torch.arange(6.0).unsqueeze(1)  # rows 0..5: chunks [0, 1] [2] [3, 4, 5]
    out, pout = moe_raw.sort_chunks_by_idxs(x, torch.tensor([2, 1, 3]), torch.tensor([2, 0, 1]))
    assert out.squeeze(1).tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0] and pout is None


def test_cpu_backward_is_the_inverse():
    x, sizes, order, probs = random_case(5, 30, tail=3, dtype=torch.float64)
    xr, pr = x.clone().requires_grad_(True), probs.double().requires_grad_(True)
    out, pout = moe_raw.sort_chunks_by_idxs(xr, sizes, order, pr)
    g, gp = torch.randn_like(out), torch.randn_like(pout)
    (out * g).sum().add((pout * gp).sum()).backward()
    inv_out, _ = megatron_sort_chunks(g[:30], sizes[order], torch.argsort(order))  # regroup back
    assert torch.equal(xr.grad[:30], inv_out) and torch.equal(xr.grad[30:], g[30:])


BAD = [
    (lambda x, s, o: (x, s.float(), o), TypeError, "split_sizes must have dtype"),
    (lambda x, s, o: (x, s, o.to(torch.int16)), TypeError, "sorted_idxs must have dtype"),
    (lambda x, s, o: (x, s.view(1, -1), o), ValueError, "split_sizes must be 1-D"),
    (lambda x, s, o: (x, s, o[:-1]), ValueError, "sorted_idxs has 3 entries but split_sizes has 4"),
    (lambda x, s, o: (x, s[:0], o[:0]), ValueError, "1 to 4096 entries"),
    (lambda x, s, o: (x.sum(), s, o), ValueError, "at least 1 dimension"),
    (lambda x, s, o: ([1.0], s, o), TypeError, "input must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,err,msg", BAD)
def test_bad_arguments_raise(make, err, msg):
    x, sizes, order, _ = random_case(4, 10)
    with pytest.raises(err, match=msg):
        moe_raw.sort_chunks_by_idxs(*make(x, sizes, order))


def test_bad_probs_raise():
    x, sizes, order, probs = random_case(4, 10)
    with pytest.raises(ValueError, match=r"probs must be \[N\] = \[10\]"):
        moe_raw.sort_chunks_by_idxs(x, sizes, order, probs[:5])
    with pytest.raises(TypeError, match="probs must have dtype"):
        moe_raw.sort_chunks_by_idxs(x, sizes, order, probs.long())


@pytest.mark.parametrize("sizes,order", [([3, -1, 8], [0, 1, 2]), ([5, 5, 5], [0, 1, 2]), ([3, 3, 3], [0, 0, 2])])
def test_reference_rejects_bad_values(sizes, order):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="split_sizes must be >= 0|permutation"):
        moe_raw.sort_chunks_by_idxs(x, torch.tensor(sizes), torch.tensor(order))


# ------------------------------------------------------------------------------------------------------ GPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def _on(x, dtype, device="cuda"):
    if dtype.is_floating_point and dtype.itemsize == 1:  # fp8: build from bytes
        return x.to(torch.float32).to(dtype).to(device)
    if not dtype.is_floating_point:
        return (x * 50).to(torch.int64).remainder(256).to(dtype).to(device)
    return x.to(dtype).to(device)


def _equal(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n_splits,n_rows,tail,hidden",
    [(1, 7, 0, 16), (4, 0, 3, 8), (8, 300, 5, 7168), (32, 1000, 0, 13), (257, 4000, 9, 64), (4096, 5000, 1, 8)],
)
def test_gpu_bit_exact(dtype, n_splits, n_rows, tail, hidden):
    x, sizes, order, probs = random_case(n_splits, n_rows, tail, hidden, gen_seed=n_splits)
    exp, pexp = reference.sort_chunks_by_idxs(x, sizes, order, probs)
    for idx_dtype in (torch.int32, torch.int64):
        out, pout = moe_raw.sort_chunks_by_idxs(
            _on(x, dtype), sizes.to(idx_dtype).cuda(), order.to(idx_dtype).cuda(), probs.cuda()
        )
        assert out.dtype == dtype and _equal(out, _on(exp, dtype)) and torch.equal(pout.cpu(), pexp)


@needs_cuda
@pytest.mark.gpu
def test_gpu_strided_and_3d_rows_and_cpu_indices():
    x, sizes, order, probs = random_case(9, 120, 4, 2 * 24)
    wide = x.cuda()
    view = wide[:, ::2]  # rows with a non-unit element stride: copied contiguous first
    out, _ = moe_raw.sort_chunks_by_idxs(view, sizes, order)  # CPU index tensors move to the device
    assert torch.equal(out.cpu(), reference.sort_chunks_by_idxs(view.cpu(), sizes, order)[0])
    sliced = torch.randn(124, 64, device="cuda")[:, 8:40]  # row stride 64, contiguous last dim: no copy
    out, _ = moe_raw.sort_chunks_by_idxs(sliced, sizes.cuda(), order.cuda())
    assert torch.equal(out.cpu(), reference.sort_chunks_by_idxs(sliced.cpu(), sizes, order)[0])
    three = x.cuda().view(124, 6, 8)
    out, _ = moe_raw.sort_chunks_by_idxs(three, sizes.cuda(), order.cuda())
    assert out.shape == (124, 6, 8)
    assert torch.equal(out.cpu(), reference.sort_chunks_by_idxs(three.cpu(), sizes, order)[0])


@needs_cuda
@pytest.mark.gpu
def test_gpu_backward_matches_reference():
    x, sizes, order, probs = random_case(16, 500, 11, 96, dtype=torch.float64)
    xg, pg = x.cuda().requires_grad_(True), probs.double().cuda().requires_grad_(True)
    xc, pc = x.clone().requires_grad_(True), probs.double().clone().requires_grad_(True)
    out, pout = moe_raw.sort_chunks_by_idxs(xg, sizes.cuda(), order.cuda(), pg)
    ref, pref = reference.sort_chunks_by_idxs(xc, sizes, order, pc)
    g, gp = torch.randn_like(ref), torch.randn_like(pref)
    ((out * g.cuda()).sum() + (pout * gp.cuda()).sum()).backward()
    ((ref * g).sum() + (pref * gp).sum()).backward()
    assert torch.equal(xg.grad.cpu(), xc.grad) and torch.equal(pg.grad.cpu(), pc.grad)


@needs_cuda
@pytest.mark.gpu
def test_gpu_gradcheck():
    sizes, order = torch.tensor([3, 0, 5, 2], device="cuda"), torch.tensor([2, 3, 0, 1], device="cuda")
    x = torch.randn(12, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    p = torch.rand(12, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: moe_raw.sort_chunks_by_idxs(a, sizes, order, b), (x, p))


@needs_cuda
@pytest.mark.gpu
def test_gpu_no_host_sync_and_graph_replay_follows_device_sizes():
    x, sizes, order, probs = random_case(8, 200, 6, 32)
    xd, sd, od = x.cuda(), sizes.cuda(), order.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_raw.sort_chunks_by_idxs(xd, sd, od)  # warm-up (compiles) and the check: no sync on this path
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_raw.sort_chunks_by_idxs(xd, sd, od)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = moe_raw.sort_chunks_by_idxs(xd, sd, od)
    graph.replay()
    assert torch.equal(out.cpu(), reference.sort_chunks_by_idxs(x, sizes, order)[0])
    # New sizes and order in the same device tensors: the replay reads them (they are never read on the host).
    x2, sizes2, order2, _ = random_case(8, 190, 16, 32, gen_seed=5)
    xd.copy_(x2.cuda()), sd.copy_(sizes2.cuda()), od.copy_(order2.cuda())
    graph.replay()
    assert torch.equal(out.cpu(), reference.sort_chunks_by_idxs(x2, sizes2, order2)[0])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sizes,order", [([3, -1, 8], [0, 1, 2]), ([500, 500, 500], [0, 1, 2]),
                                         ([3, 3, 3], [0, 0, 2]), ([3, 3, 3], [7, -9, 1])])  # fmt: skip
def test_gpu_bad_values_stay_in_bounds(sizes, order, monkeypatch):
    x = torch.randn(10, 64, device="cuda")
    s, o = torch.tensor(sizes, device="cuda"), torch.tensor(order, device="cuda")
    monkeypatch.setattr(_validate, "DEBUG", False)
    moe_raw.sort_chunks_by_idxs(x, s, o)  # wrong rows, but no fault
    torch.cuda.synchronize()  # a device-side fault would surface here
    good = moe_raw.sort_chunks_by_idxs(x, torch.tensor([4, 6], device="cuda"), torch.tensor([1, 0], device="cuda"))
    assert torch.equal(good[0].cpu(), torch.cat([x[4:], x[:4]]).cpu())  # the process is still usable
    monkeypatch.setattr(_validate, "DEBUG", True)
    with pytest.raises(ValueError, match="MOE_RAW_DEBUG=1"):
        moe_raw.sort_chunks_by_idxs(x, s, o)


@needs_cuda
@pytest.mark.gpu
def test_gpu_device_mismatch():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="probs"):
        moe_raw.sort_chunks_by_idxs(x, torch.tensor([4]), torch.tensor([0]), torch.rand(4))
