"""``moe_raw.megatron``: Megatron-LM main's permute / unpermute on moe_raw's kernels, against transcriptions of
main's unfused code (below, from megatron/core/transformer/moe/moe_utils.py and batch_invariant.py) and of
Transformer Engine's ``moe_permute_and_pad_with_probs``. Moves are compared bit for bit, sums by flash-attention's
rule against the transcription in fp64; batch invariance bit for bit. CPU always, CUDA where present (``DEVICES``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_2x, make_probs, make_routing

from moe_raw import megatron as M

# ----------------------------------------------------------------------------------------------------------------
# Transcriptions of Megatron-LM main (unfused path) and TE's padded permute, written from their semantics.


def _main_order(routing_map: torch.Tensor) -> torch.Tensor:
    """Main's flat_sorted: indices e * T + t of the transposed map, routed pairs first, each group ascending."""
    keys = routing_map.bool().T.contiguous().reshape(-1).to(torch.int8)
    return torch.argsort(keys, descending=True, stable=True)


def main_permute(tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    num_tokens, num_experts = routing_map.shape
    pprobs = None
    if drop_and_pad:
        capacity = num_out_tokens // num_experts
        cols = routing_map.to(torch.int8).T.contiguous()
        indices = torch.argsort(cols, dim=-1, descending=True, stable=True)[:, :capacity].reshape(-1)
        if probs is not None:
            experts = torch.arange(num_experts, device=tokens.device).repeat_interleave(indices.numel() // num_experts)
            pprobs = probs[indices, experts]
        flat = None
    else:
        flat = _main_order(routing_map)[:num_out_tokens]
        indices = flat % num_tokens
        if probs is not None:
            pprobs = probs.T.contiguous().reshape(-1)[flat]
    return tokens.index_select(0, indices), pprobs, indices, flat


def main_unpermute(rows, indices, restore_shape, probs=None, routing_map=None, drop_and_pad=False):
    dtype = rows.dtype
    if probs is not None:
        num_experts = routing_map.shape[1]
        if drop_and_pad:
            capacity = indices.numel() // num_experts
            experts = torch.arange(num_experts, device=rows.device).repeat_interleave(capacity)
            pprobs = probs[indices, experts]
        else:
            pprobs = probs.T.contiguous().reshape(-1)[_main_order(routing_map)[: rows.shape[0]]]
        rows = rows * pprobs.unsqueeze(-1)
    out = torch.zeros(restore_shape, dtype=rows.dtype, device=rows.device)
    return out.index_add(0, indices, rows).to(dtype)


def main_inverse_map(routing_map, flat, indices, num_out_tokens):
    """batch_invariant.build_inverse_permutation_map: slot k of token t = its k-th routed expert (ascending)."""
    num_tokens = routing_map.shape[0]
    topk = num_out_tokens // num_tokens
    experts = flat // num_tokens
    slot = (routing_map.bool().long().cumsum(1) - 1)[indices, experts]
    where = indices * topk + slot
    inverse = torch.full((2, num_tokens * topk), -1, dtype=torch.int64, device=routing_map.device)
    inverse[0, where] = torch.arange(num_out_tokens, device=routing_map.device)
    inverse[1, where] = experts
    return inverse.view(2, num_tokens, topk)


def main_bi_unpermute(rows, restore_shape, probs, inverse):
    """batch_invariant.unpermute at EP size 1 (fp32 partial): slot by slot, 0 + c_0 + c_1 + ..."""
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32  # fp64: the exact reference
    acc = torch.zeros(restore_shape, dtype=acc_dtype, device=rows.device)
    for k in range(inverse.shape[2]):
        row, expert = inverse[0, :, k], inverse[1, :, k]
        chunk = rows.index_select(0, row.clamp_min(0)).to(acc_dtype)
        if probs is not None:
            chunk = chunk * probs.gather(1, expert.clamp_min(0).unsqueeze(1)).to(acc_dtype)
        acc += chunk.masked_fill(~(row >= 0).unsqueeze(1), 0.0)
    return acc.to(rows.dtype)


def te_permute_and_pad(tokens, probs, routing_map, tokens_per_expert, align):
    """TE's moe_permute_and_pad_with_probs: expert e's rows start at sum(target[:e]); pad_offsets None if aligned."""
    target = (torch.ceil(tokens_per_expert / align) * align).long()
    if torch.equal(tokens_per_expert, target):
        pad_offsets = None
    else:
        pads = target - tokens_per_expert
        pad_offsets = torch.cat([pads.new_zeros(1), torch.cumsum(pads, 0)[:-1]])
    flat = _main_order(routing_map)[: int(tokens_per_expert.sum())]
    num_tokens = routing_map.shape[0]
    token, expert = flat % num_tokens, flat // num_tokens
    rows = torch.arange(flat.numel(), device=tokens.device) + (0 if pad_offsets is None else pad_offsets[expert])
    out = tokens.new_zeros((int(target.sum()), tokens.shape[1]))
    out[rows] = tokens[token]
    pprobs = probs.new_zeros(out.shape[0])
    pprobs[rows] = probs[token, expert]
    return out, pprobs, pad_offsets, target, rows, token, expert


# ----------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _case(T, E, K, H, dtype, device, kind="topk", off_route=0.0):
    rm = make_routing(T, E, K, device, kind=kind)
    probs = make_probs(rm, off_route=off_route)
    x = torch.randn(T, H).to(dtype).to(device)
    return x, rm, probs


def _grads(fn, tensors, weights):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = [o for o in fn(*leaves) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, weights, strict=True))
    return [o.detach() for o in outs], [g for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "kind,n_out", [("topk", "TK"), ("sparse", "TK"), ("empty_expert", "TK"), ("topk", 9), ("sparse", "TE+5")]
)
@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "noprobs"])
def test_dropless_permute_is_mains_bit_for_bit(device, dtype, kind, n_out, with_probs):
    T, E, K, H = 37, 8, 2, 24
    # off-route probs of 0.25: main reads them on rows past the routed count, and so does moe_raw
    x, rm, probs = _case(T, E, K, H, dtype, device, kind, off_route=0.25)
    probs = probs if with_probs else None
    n = {"TK": T * K, "TE+5": T * E + 5}.get(n_out, n_out)
    tpe = rm.sum(0)
    out, pprobs, indices, fourth, fifth = M.permute(x, rm, probs, n, tokens_per_expert=tpe)
    want, want_probs, want_idx, _ = main_permute(x, rm, probs, n)
    assert out.shape[0] == min(n, T * E) and indices.dtype == torch.int64
    assert torch.equal(indices, want_idx) and torch.equal(out, want)
    assert (pprobs is None) == (probs is None) and (pprobs is None or torch.equal(pprobs, want_probs))
    assert fourth is None and fifth is tpe
    y = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = M.unpermute(y.to(dtype), indices, (T, H), probs, rm if with_probs else None)
    ref64 = main_unpermute(y, want_idx, (T, H), None if probs is None else probs.double(), rm)
    same = main_unpermute(y.to(dtype), want_idx, (T, H), probs, rm)
    assert_close_2x(got, ref64, same, "unpermute")
    if with_probs:  # the same with routing_map given and no probs: every row summed, as main's scatter_add
        got = M.unpermute(y.to(dtype), indices, (T, H), routing_map=rm)
        assert_close_2x(got, main_unpermute(y, want_idx, (T, H)), main_unpermute(y.to(dtype), want_idx, (T, H)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("capacity", [2, 5, 50])
def test_drop_and_pad_is_mains(device, dtype, capacity):
    T, E, K, H = 29, 6, 2, 16
    x, rm, probs = _case(T, E, K, H, dtype, device, "sparse", off_route=0.25)  # padding copies read probs[t, e]
    n = capacity * E
    out, pprobs, indices, fourth, fifth = M.permute(x, rm, probs, n, drop_and_pad=True)
    want, want_probs, want_idx, _ = main_permute(x, rm, probs, n, drop_and_pad=True)
    assert torch.equal(indices, want_idx) and torch.equal(out, want) and torch.equal(pprobs, want_probs)
    assert fourth is None and fifth is None
    y = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = M.unpermute(y.to(dtype), indices, (T, H), probs, rm, drop_and_pad=True)
    ref64 = main_unpermute(y, want_idx, (T, H), probs.double(), rm, drop_and_pad=True)
    same = main_unpermute(y.to(dtype), want_idx, (T, H), probs, rm, drop_and_pad=True)
    assert_close_2x(got, ref64, same, "drop_and_pad unpermute")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("align,kind", [(4, "sparse"), (16, "topk"), (1, "topk"), (8, "balanced")])
def test_padded_permute_is_tes(device, dtype, align, kind):
    T, E, K, H = 40, 5, 2, 12  # balanced: 80 pairs over 5 experts, 16 each: nothing to pad at align 8
    x, rm, probs = _case(T, E, K, H, dtype, device, kind)
    tpe = rm.sum(0)
    out, pprobs, row_map, pad_offsets, padded = M.permute(
        x, rm, probs, T * K, fused=True, tokens_per_expert=tpe, align_size=align
    )
    want, want_probs, want_offsets, target, rows, token, expert = te_permute_and_pad(x, probs, rm, tpe, align)
    assert torch.equal(out, want) and torch.equal(pprobs, want_probs) and torch.equal(padded, target)
    assert padded.dtype == torch.int64 and row_map.dtype == torch.int32 and row_map.shape == (T + 3, E)
    if align == 1 or kind == "balanced":
        assert want_offsets is None and pad_offsets is None
    else:
        assert want_offsets is not None and pad_offsets.dtype == torch.int64
        assert torch.equal(pad_offsets, want_offsets)
    y = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = M.unpermute(y.to(dtype), row_map, (T, H), probs, fused=True, pad_offsets=pad_offsets)

    def combine(rows_y, p):
        return torch.zeros(T, H, dtype=rows_y.dtype, device=device).index_add(
            0, token, rows_y[rows] * p[token, expert].unsqueeze(1).to(rows_y.dtype)
        )

    assert_close_2x(got, combine(y, probs.double()), combine(y.to(dtype), probs.float()).to(dtype), "padded")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "noprobs"])
def test_fused_path_round_trip(device, with_probs):
    T, E, K, H = 23, 8, 3, 16
    x, rm, probs = _case(T, E, K, H, torch.float32, device)
    probs = probs if with_probs else None
    tpe = rm.sum(0)
    out, pprobs, row_map, fourth, fifth = M.permute(x, rm, probs, T * K, fused=True, tokens_per_expert=tpe)
    want, want_probs, want_idx, _ = main_permute(x, rm, probs, T * K)
    assert torch.equal(out, want) and fourth is None and fifth is tpe
    assert row_map.dtype == torch.int32 and row_map.shape == (T + 1, E)
    assert (pprobs is None) == (not with_probs) and (pprobs is None or torch.equal(pprobs, want_probs))
    got = M.unpermute(out, row_map, (T, H), probs, rm, fused=True)
    same = main_unpermute(want, want_idx, (T, H), probs, rm)
    ref64 = main_unpermute(want.double(), want_idx, (T, H), None if probs is None else probs.double(), rm)
    assert_close_2x(got, ref64, same, "fused round trip")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["topk", "empty_expert", "balanced"])
def test_inverse_map_is_mains(device, kind):
    T, E, K, H = 31, 8, 3, 8
    x, rm, probs = _case(T, E, K, H, torch.float32, device, kind)
    out, _, indices, inverse, _ = M.permute(x, rm, probs, T * K, return_batch_invariant_inverse_map=True)
    _, _, want_idx, flat = main_permute(x, rm, probs, T * K)
    assert torch.equal(indices, want_idx)
    assert inverse.dtype == torch.int64 and inverse.shape == (2, T, K)
    assert torch.equal(inverse, main_inverse_map(rm, flat, want_idx, T * K))
    assert not inverse.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_map_with_fewer_routes_lists_the_routed_rows(device):
    # tokens with fewer than K experts (main's map is then undefined past its routed rows): slot k holds the k-th
    # routed expert and its row, -1 after; rows past the routed count (unrouted pairs) are in no slot
    T, E, K, H = 12, 5, 2, 4
    x, rm, probs = _case(T, E, K, H, torch.float32, device, "sparse")
    _, _, indices, inverse, _ = M.permute(x, rm, probs, T * K, return_batch_invariant_inverse_map=True)
    flat = _main_order(rm)[: T * K]
    row_of = {(int(f % T), int(f // T)): r for r, f in enumerate(flat.tolist())}
    rm_cpu = rm.cpu()
    for t in range(T):
        experts = rm_cpu[t].nonzero().flatten().tolist()
        want_rows = [row_of[(t, e)] for e in experts] + [-1] * (K - len(experts))
        assert inverse[0, t].tolist() == want_rows and inverse[1, t].tolist() == experts + [-1] * (K - len(experts))
    assert torch.equal(indices, flat % T)


def _dyadic_probs(rm):
    """Probs 2^-j on the map: every product with a row is exact, so a fused multiply-add rounds as mul + add."""
    p = torch.pow(2.0, -torch.randint(0, 4, rm.shape).float()).to(rm.device)
    return torch.where(rm.bool(), p, torch.zeros((), device=rm.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("probs_kind", ["random", "dyadic", "none"])
@pytest.mark.parametrize("kind", ["topk", "sparse"])
def test_unpermute_with_inverse_map_is_the_inverse_map_sum(device, dtype, probs_kind, kind):
    T, E, K, H = 33, 8, 4, 40
    x, rm, probs = _case(T, E, K, H, dtype, device, kind)
    probs = {"random": probs, "dyadic": _dyadic_probs(rm), "none": None}[probs_kind]
    _, _, indices, inverse, _ = M.permute(x, rm, probs, T * K, return_batch_invariant_inverse_map=True)
    y = (torch.randn(T * K, H) * 4).to(dtype).to(device)
    got = M.unpermute(y, indices, (T, H), probs, rm, batch_invariant_inverse_map=inverse)
    want = main_bi_unpermute(y, (T, H), probs, inverse)
    if device == "cpu" or probs_kind != "random":  # CUDA sums with FMA: exact products keep it bit for bit
        assert torch.equal(got, want)
    else:
        assert_close_2x(got, main_bi_unpermute(y.double(), (T, H), probs.double(), inverse), want)
    if kind == "topk":  # no rows past the routed count: the default path gives the same bits
        assert torch.equal(M.unpermute(y, indices, (T, H), probs, rm), got)


def _expert_rows(permuted, routing_map):
    """Expert e's output for token t: a function of (t's row, e) only, the same in any batch."""
    counts = routing_map.sum(0)
    experts = torch.repeat_interleave(torch.arange(routing_map.shape[1], device=permuted.device), counts)
    scale = (1.0 + torch.arange(routing_map.shape[1], device=permuted.device) / 7.0).to(permuted.dtype)
    return permuted * scale[experts].unsqueeze(1) + experts.unsqueeze(1).to(permuted.dtype)  # two rounded ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("with_inverse", [True, False], ids=["inverse-map", "default"])
@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "noprobs"])
def test_a_tokens_output_does_not_depend_on_its_batch(device, dtype, with_inverse, with_probs):
    T, E, K, H = 24, 16, 4, 72
    x, rm, probs = _case(T, E, K, H, dtype, device)
    probs = probs if with_probs else None

    def run(sel):
        xs, rms = x[sel], rm[sel]
        ps = None if probs is None else probs[sel]
        out, _, idx, inv, _ = M.permute(xs, rms, ps, len(sel) * K, return_batch_invariant_inverse_map=with_inverse)
        return M.unpermute(_expert_rows(out, rms), idx, xs.shape, ps, rms, batch_invariant_inverse_map=inv)

    full = run(torch.arange(T, device=device))
    perm = torch.randperm(T).to(device)
    shuffled = run(perm)
    assert torch.equal(shuffled, full[perm])
    for t in (0, 5, T - 1):
        assert torch.equal(run(torch.tensor([t], device=device))[0], full[t]), t
    half = torch.arange(0, T, 2, device=device)
    assert torch.equal(run(half), full[half])
    if with_inverse:  # and each equals the inverse-map sum of its own rows
        out, _, idx, inv, _ = M.permute(x, rm, probs, T * K, return_batch_invariant_inverse_map=True)
        rows = _expert_rows(out, rm)
        if device == "cpu" or probs is None:
            assert torch.equal(full, main_bi_unpermute(rows, (T, H), probs, inv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "kind,drop_and_pad,n_out", [("topk", False, "TK"), ("sparse", False, "TK"), ("topk", False, 20),
                                ("sparse", True, 24)],
)  # fmt: skip
def test_gradients_are_mains(device, dtype, kind, drop_and_pad, n_out):
    T, E, K, H = 19, 6, 2, 16
    x, rm, probs = _case(T, E, K, H, dtype, device, kind, off_route=0.25)  # main reads probs off the map too
    n = T * K if n_out == "TK" else n_out
    w_rows = torch.randn(min(n, T * E) if not drop_and_pad else n, H, dtype=torch.float64, device=device)
    w_probs = torch.randn(w_rows.shape[0], dtype=torch.float64, device=device)

    def ours(tokens, p):
        return M.permute(tokens, rm, p, n, drop_and_pad=drop_and_pad)[:2]

    def main(tokens, p):
        return main_permute(tokens, rm, p, n, drop_and_pad=drop_and_pad)[:2]

    got, got_g = _grads(ours, (x, probs), (w_rows, w_probs))
    same, same_g = _grads(main, (x, probs), (w_rows, w_probs))
    ref, ref_g = _grads(main, (x.double(), probs.double()), (w_rows, w_probs))
    for a, s in zip(got, same, strict=True):
        assert torch.equal(a, s)
    for k, (a, r, s) in enumerate(zip(got_g, ref_g, same_g, strict=True)):
        assert_close_2x(a, r, s, f"permute gradient {k}")
    # unpermute: gradients w.r.t. the rows and the probs
    _, _, indices, _, _ = M.permute(x, rm, probs, n, drop_and_pad=drop_and_pad)
    rows = torch.randn(indices.numel(), H).to(dtype).to(device)
    w_out = torch.randn(T, H, dtype=torch.float64, device=device)

    def ours_u(r, p):
        return (M.unpermute(r, indices, (T, H), p, rm, drop_and_pad=drop_and_pad),)

    def main_u(r, p):
        return (main_unpermute(r, indices, (T, H), p, rm, drop_and_pad),)

    got, got_g = _grads(ours_u, (rows, probs), (w_out,))
    same, same_g = _grads(main_u, (rows, probs), (w_out,))
    ref, ref_g = _grads(main_u, (rows.double(), probs.double()), (w_out,))
    assert_close_2x(got[0], ref[0], same[0], "unpermute")
    for k, (a, r, s) in enumerate(zip(got_g, ref_g, same_g, strict=True)):
        assert_close_2x(a, r, s, f"unpermute gradient {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    H, E = 8, 4
    x = torch.randn(0, H, device=device, requires_grad=True)
    rm = torch.zeros(0, E, dtype=torch.bool, device=device)
    probs = torch.zeros(0, E, device=device, requires_grad=True)
    for n in (0, 8):
        out, pprobs, idx, inverse, _ = M.permute(x, rm, probs, n, return_batch_invariant_inverse_map=True)
        assert out.shape == (0, H) and pprobs.shape == (0,) and idx.shape == (0,) and inverse.shape == (2, 0, 0)
        y = M.unpermute(out, idx, (0, H), probs, rm, batch_invariant_inverse_map=inverse)
        assert y.shape == (0, H)
        (y.sum() + pprobs.sum()).backward()
        assert x.grad.shape == (0, H) and probs.grad.shape == (0, E)
    out, _, idx, _, _ = M.permute(x, rm, probs, 8, drop_and_pad=True)
    assert out.shape == (0, H) and M.unpermute(out, idx, (0, H), probs, rm, drop_and_pad=True).shape == (0, H)
    out, _, row_map, _, _ = M.permute(x, rm, probs, 8, fused=True)
    assert M.unpermute(out, row_map, (0, H), probs, fused=True).shape == (0, H)


@pytest.mark.parametrize("device", DEVICES)
def test_num_out_tokens_tensor_and_oversized_top_k(device):
    T, E, K, H = 10, 4, 2, 8
    x, rm, probs = _case(T, E, K, H, torch.float32, device)
    a = M.permute(x, rm, probs, T * K)
    b = M.permute(x, rm, probs, rm.sum())  # Megatron's dynamic size: a 0-d tensor, read on the host
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3], strict=True))
    out, _, idx, inverse, _ = M.permute(x, rm, probs, T * (E + 1), return_batch_invariant_inverse_map=True)
    assert out.shape[0] == T * E and inverse.shape == (2, T, E + 1) and (inverse[:, :, K:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_probs_off_the_map_reach_only_the_rows_main_reads_them_for(device):
    T, E, K, H = 16, 6, 2, 8
    x, rm, probs = _case(T, E, K, H, torch.float32, device, off_route=float("nan"))
    out, pprobs, idx, _, _ = M.permute(x, rm, probs, T * K)  # every row routed: no NaN anywhere
    assert not pprobs.isnan().any() and not M.unpermute(out, idx, (T, H), probs, rm).isnan().any()
    x, rm, probs = _case(T, E, K, H, torch.float32, device, "sparse", off_route=float("nan"))
    for n, drop_and_pad in ((T * K, False), (5 * E, True)):  # rows of unrouted pairs: main reads NaN there too
        out, pprobs, idx, _, _ = M.permute(x, rm, probs, n, drop_and_pad=drop_and_pad)
        want = main_permute(x, rm, probs, n, drop_and_pad=drop_and_pad)[1]
        assert want.isnan().any()
        torch.testing.assert_close(pprobs, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_routing_map_changed_in_place_is_read_again(device):
    # unpermute with routing_map reads the rows from the map (main recomputes from what it is given): a map changed
    # in place after permute must not reuse what permute remembered for the old one
    T, E, K, H = 12, 4, 2, 8
    x, rm, probs = _case(T, E, K, H, torch.float32, device)
    out, _, idx, _, _ = M.permute(x, rm, probs, T * K)
    y = torch.randn(out.shape, device=device)
    before = M.unpermute(y, idx, (T, H), probs, rm)
    rm.copy_(make_routing(T, E, K, device))
    after = M.unpermute(y, idx, (T, H), probs, rm)
    assert torch.equal(after, M.unpermute(y, idx, (T, H), probs, rm.clone())) and not torch.equal(after, before)


def _bad_calls(device):
    x = torch.randn(6, 4, device=device)
    rm = make_routing(6, 3, 2, device)
    probs = make_probs(rm)
    out, _, idx, inverse, _ = M.permute(x, rm, probs, 12, return_batch_invariant_inverse_map=True)
    _, _, row_map, _, _ = M.permute(x, rm, probs, 12, fused=True)
    offsets = torch.zeros(3, dtype=torch.int64, device=device)
    return [
        (lambda: M.permute(x, rm, probs), ValueError, "num_out_tokens is required"),
        (lambda: M.permute(x, rm, probs, 12, fused=True, return_batch_invariant_inverse_map=True), ValueError,
         "unfused, dropless"),
        (lambda: M.permute(x, rm, probs, 12, drop_and_pad=True, return_batch_invariant_inverse_map=True), ValueError,
         "unfused, dropless"),
        (lambda: M.permute(x, rm, probs, 13, return_batch_invariant_inverse_map=True), ValueError, "multiple"),
        (lambda: M.permute(x, rm, probs, rm.sum(), return_batch_invariant_inverse_map=True), ValueError, "as an int"),
        (lambda: M.permute(x, rm, probs, drop_and_pad=True), ValueError, "num_out_tokens is required"),
        (lambda: M.permute(x, rm, probs, 12, align_size=2.0), TypeError, "align_size must be an int"),
        (lambda: M.permute(x, rm, probs, 12, align_size=True), TypeError, "align_size must be an int"),
        (lambda: M.permute(x, rm, probs, 12, tokens_per_expert=[2, 2, 2]), TypeError, "tokens_per_expert"),
        (lambda: M.permute(x, rm, probs, 12, fused=True, tokens_per_expert=rm.sum(0)[:2], align_size=4), ValueError,
         "tokens_per_expert must be"),
        (lambda: M.permute(x, rm, probs, 12, fused=True, tokens_per_expert=rm.sum(0), align_size=2048), ValueError,
         "at most 1024"),
        (lambda: M.permute(x, rm, probs, -1), ValueError, "num_out_tokens must be >= 0"),
        (lambda: M.permute(x, rm, probs[:, :2], 12), ValueError, "probs must be"),
        (lambda: M.permute(x, rm, probs, 12, return_batch_invariant_inverse_map="yes"), TypeError, "must be a bool"),
        (lambda: M.unpermute(out, idx, (6, 4), probs), ValueError, "routing_map is required"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm, batch_invariant_inverse_map=inverse.float()), TypeError,
         "batch_invariant_inverse_map must have dtype"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm, batch_invariant_inverse_map=inverse[0]), ValueError,
         "must be 3-D"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm, batch_invariant_inverse_map=inverse[:, :5]), ValueError,
         r"\[2, T, K\]"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, batch_invariant_inverse_map=inverse), ValueError,
         "with routing_map"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm, drop_and_pad=True, batch_invariant_inverse_map=inverse),
         ValueError, "unfused, dropless"),
        (lambda: M.unpermute(out, row_map, (6, 4), probs, fused=True, batch_invariant_inverse_map=inverse),
         ValueError, "unfused, dropless"),
        (lambda: M.unpermute(out, row_map, (6, 4), probs, fused=True, pad_offsets=offsets), ValueError,
         "not permute's padded row map"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm, pad_offsets=offsets.float()), TypeError, "pad_offsets"),
        (lambda: M.unpermute(out, idx.float(), (6, 4), probs, rm), TypeError, "sorted_indices"),
        (lambda: M.unpermute(out, idx, (6, 5), probs, rm), ValueError, "restore_shape"),
        (lambda: M.unpermute(out, idx, (6, 4), probs, rm[:5]), ValueError, "routing_map has 5 rows"),
    ]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise(device):
    for call, exc, match in _bad_calls(device):
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_padded_pad_offsets_shape_is_checked(device):
    x, rm, probs = _case(10, 3, 2, 4, torch.float32, device, "sparse")
    out, _, row_map, _, _ = M.permute(x, rm, probs, 20, fused=True, tokens_per_expert=rm.sum(0), align_size=4)
    with pytest.raises(ValueError, match=r"pad_offsets must be \[E\]"):
        M.unpermute(out, row_map, (10, 4), probs, fused=True, pad_offsets=torch.zeros(4, dtype=torch.int64))
