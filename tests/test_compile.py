"""torch.compile of moe_raw (issue #7 item 5): the public ops run as torch.library custom ops while traced.

* Round trips and a small MoE block compiled with ``fullgraph=True`` (a graph break raises) give the eager results,
  forward and backward.
* ``torch.library.opcheck`` on every registered op (schema, fake implementation, autograd registration).

Every test runs on CPU (the custom ops run ``moe_raw.reference`` there; CI) and, marked ``gpu``, on CUDA (the
kernels): ``python -m pytest -q -m gpu tests/test_compile.py`` on a CUDA machine. Shapes are tiny: the time is
compilation (the first inductor compile in a process costs ~30 s on CPU), so compiled functions are cached per
module and reused across parameters where they can be.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICES

import moe_raw
from moe_raw import _ops
from moe_raw._kernels.glu_codegen import _GEGLU

T, H, E, K, F = 8, 16, 4, 2, 8


@functools.cache
def _compiled(fn, backend: str = "inductor"):
    """One compiled function per Python function: dynamo guards recompile it per device / flag where needed."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


def _routing(device):
    logits = torch.randn(T, E)
    topk_p, topk_i = logits.softmax(-1).topk(K, dim=-1)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, topk_i, True)
    probs = torch.zeros(T, E).scatter(1, topk_i, topk_p)
    return routing_map.to(device), probs.to(device)


def _fwd_bwd(fn, inputs, *extra):
    """fn(*leaves, *extra) and the gradients of the leaves for a fixed random output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, *extra)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out.detach(), [x.grad for x in leaves]


def _assert_compiled_matches(fn, inputs, *extra):
    eager = _fwd_bwd(fn, inputs, *extra)
    compiled = _fwd_bwd(_compiled(fn), inputs, *extra)
    torch.testing.assert_close(compiled[0], eager[0])
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------
# permute -> unpermute


def _round_trip(tokens, probs, routing_map, fused, drop_and_pad):
    n_out = T * K if not drop_and_pad else E * 3  # drop_and_pad: capacity 3 of up to T tokens per expert
    out, pprobs, index = moe_raw.permute(
        tokens, routing_map, probs, num_out_tokens=n_out, fused=fused, drop_and_pad=drop_and_pad
    )
    rows = out * 2 + pprobs.unsqueeze(1)  # both outputs feed the result: gradients reach tokens and probs twice
    return moe_raw.unpermute(
        rows, index, tokens.shape, probs, None if fused else routing_map, fused=fused, drop_and_pad=drop_and_pad
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_round_trip(device, fused, drop_and_pad):
    routing_map, probs = _routing(device)
    tokens = torch.randn(T, H, device=device)
    _assert_compiled_matches(_round_trip, [tokens, probs], routing_map, fused, drop_and_pad)


def _csr_round_trip(tokens, routing_map):
    out, _, index = moe_raw.permute(tokens, routing_map, num_out_tokens=T * K)
    return moe_raw.unpermute(out * 3, index, tokens.shape)  # no routing map: the CSR path over sorted_indices


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_csr(device):
    routing_map, _ = _routing(device)
    _assert_compiled_matches(_csr_round_trip, [torch.randn(T, H, device=device)], routing_map)


def _fused_pair(tokens, routing_map, probs):
    out, pprobs, row_map = moe_raw.permute(tokens, routing_map, probs, num_out_tokens=T * K, fused=True)
    return moe_raw.unpermute(out, row_map, tokens.shape, probs, fused=True), pprobs


@pytest.mark.parametrize("device", DEVICES)
def test_eager_signatures_do_not_recompile(device):
    """Eager calls leave signatures in moe_raw._validate's cache; a compiled graph never reads it (no guard on it),
    so new eager signatures between two compiled calls do not recompile it, and its results stay the eager ones."""
    routing_map, probs = _routing(device)
    tokens = torch.randn(T, H, device=device)
    compiled = torch.compile(_fused_pair, fullgraph=True, dynamic=False, backend="eager")
    first = compiled(tokens, routing_map, probs)
    for n in range(1, 4):  # new signatures: the cache changes
        moe_raw.permute(tokens, routing_map, probs, num_out_tokens=n, fused=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # (pytest's monkeypatch would delete the option)
        again = compiled(tokens, routing_map, probs)
    eager = _fused_pair(tokens, routing_map, probs)
    for a, b, c in zip(first, again, eager, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def _routed_count(tokens, routing_map):
    out, _, index = moe_raw.permute(tokens, routing_map, fused=True)  # N = the routed count, data-dependent
    return moe_raw.unpermute(out, index, tokens.shape, fused=True)


@pytest.mark.parametrize("device", DEVICES)
def test_data_dependent_rows(device):
    """num_out_tokens=None: the fake gives N an unbacked size; the compiled graph still runs without a break."""
    routing_map, _ = _routing(device)
    _assert_compiled_matches(_routed_count, [torch.randn(T, H, device=device)], routing_map)


def _topk_round_trip(tokens, topk_probs, topk_indices):
    # permute_topk / unpermute_topk compose torch ops with permute / unpermute: no op of their own
    out, pprobs, row_map = moe_raw.permute_topk(tokens, topk_indices, E, topk_probs, num_out_tokens=T * K, fused=True)
    return moe_raw.unpermute_topk(out * pprobs.unsqueeze(1), row_map, tokens.shape, topk_probs, topk_indices, E, True)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_round_trip(device):
    topk_indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(device)
    inputs = [torch.randn(T, H, device=device), torch.rand(T, K, device=device)]
    _assert_compiled_matches(_topk_round_trip, inputs, topk_indices)


# ----------------------------------------------------------------------------------------------------------------
# A small MoE block and the gated activations


def _moe_block(x, logits, w1, w2):
    """Router -> permute -> expert up-projection -> weighted SwiGLU -> expert down-projection -> unpermute."""
    topk_p, topk_i = logits.softmax(-1).topk(K, dim=-1)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=x.device).scatter(1, topk_i, True)
    probs = torch.zeros_like(logits).scatter(1, topk_i, topk_p)
    permuted, pprobs, row_map = moe_raw.permute(x, routing_map, probs, num_out_tokens=T * K, fused=True)
    # rows are expert-major: row r belongs to the expert whose cumulative count first exceeds r
    ends = routing_map.sum(0).cumsum(0)
    expert = torch.searchsorted(ends, torch.arange(T * K, device=x.device), right=True)
    h = torch.bmm(permuted.unsqueeze(1), w1[expert]).squeeze(1)  # [N, 2F]: each row by its expert's weight
    act = moe_raw.weighted_bias_swiglu_impl(h, pprobs.unsqueeze(1))  # [N, F], weighted by the router prob
    out = torch.bmm(act.unsqueeze(1), w2[expert]).squeeze(1)  # [N, H]
    return moe_raw.unpermute(out, row_map, x.shape, fused=True)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_block(device):
    inputs = [
        torch.randn(T, H, device=device),
        torch.randn(T, E, device=device),
        torch.randn(E, H, 2 * F, device=device) / H**0.5,
        torch.randn(E, F, H, device=device) / F**0.5,
    ]
    _assert_compiled_matches(_moe_block, inputs)
    explain = torch._dynamo.explain(_moe_block)(*inputs)
    assert explain.graph_break_count == 0, explain.break_reasons


def _quick_geglu_block(y, bias, weights, fp8_input_store):
    # gpt-oss's clamped form (clamp in the kernel), and Megatron's bias path (torch clamp + add, then the kernel)
    a = moe_raw.weighted_bias_quick_geglu_impl(y, None, weights, fp8_input_store, linear_offset=1.0, clamp_value=7.0)
    b = moe_raw.weighted_bias_quick_geglu_impl(y * 4, bias, weights, fp8_input_store, clamp_value=3.0)
    c = moe_raw.weighted_bias_swiglu_impl(y.view(2, -1, 2 * F), weights, fp8_input_store).view(-1, F)
    d = moe_raw.weighted_bias_geglu_impl(y, weights, fp8_input_store)
    return a + b + c + d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8_input_store", [False, True])
def test_gated_autograd(device, fp8_input_store):
    inputs = [torch.randn(T, 2 * F, device=device), torch.randn(2 * F, device=device), torch.rand(T, 1, device=device)]
    _assert_compiled_matches(_quick_geglu_block, inputs, fp8_input_store)


def _gated_family(y, g, weights):
    y3 = y.view(2, -1, 2 * F)
    return (
        moe_raw.swiglu(y),
        moe_raw.swiglu(y3),
        moe_raw.weighted_swiglu(y, weights),
        moe_raw.swiglu_back(g, y),
        *moe_raw.weighted_swiglu_back(g, y, weights),
        moe_raw.quick_geglu(y, 0.5),
        moe_raw.weighted_quick_geglu(y, weights, 1.0),
        moe_raw.quick_geglu_back(g, y, 0.5),
        *moe_raw.weighted_quick_geglu_back(g, y, weights, 1.0),
        moe_raw.clamped_swiglu(y * 4, 1.702, 7.0),
        moe_raw.weighted_clamped_swiglu(y * 4, weights, limit=3.0),
        moe_raw.clamped_swiglu_back(g, y * 4),
        *moe_raw.weighted_clamped_swiglu_back(g, y * 4, weights, limit=3.0),
        moe_raw.geglu(y),
        moe_raw.weighted_geglu(y, weights),
        moe_raw.geglu_back(g, y),
        *moe_raw.weighted_geglu_back(g, y, weights),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gated_family(device):
    args = (torch.randn(T, 2 * F, device=device), torch.randn(T, F, device=device), torch.rand(T, 1, device=device))
    for got, want in zip(_compiled(_gated_family)(*args), _gated_family(*args), strict=True):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------------
# sort_chunks_by_idxs, permute_and_pad + permute_with_row_map + unpermute


def _ep_regroup(rows, probs, sizes, order):
    out, pout = moe_raw.sort_chunks_by_idxs(rows, sizes, order, probs)
    return out * pout.unsqueeze(1)


def _padded_round_trip(tokens, probs, scales, routing_map):
    out, pprobs, row_map, tpe, padded = moe_raw.permute_and_pad(tokens, routing_map, probs, 4, T * K)
    moved = moe_raw.permute_with_row_map(scales, row_map, out.shape[0])
    rows = out * moved + pprobs.unsqueeze(1)
    return moe_raw.unpermute(rows, row_map, tokens.shape, probs, fused=True)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_extras(device):
    sizes, order = torch.tensor([3, 0, 4, 1], device=device), torch.tensor([2, 0, 3, 1], device=device)
    _assert_compiled_matches(_ep_regroup, (torch.randn(T + 2, H, device=device), torch.rand(T + 2, device=device)),
                             sizes, order)  # fmt: skip
    routing_map, probs = _routing(device)
    inputs = (torch.randn(T, H, device=device), probs, torch.rand(T, H, device=device))
    _assert_compiled_matches(_padded_round_trip, inputs, routing_map)


# ----------------------------------------------------------------------------------------------------------------
# opcheck of every registered op


def _opcheck_cases(device):
    routing_map, probs = _routing(device)
    tokens = torch.randn(T, H, device=device)
    cases = []
    for fused in (False, True):
        for drop_and_pad in (False, True):
            n_out = E * 3 if drop_and_pad else T * K
            cases.append((_ops.permute, (tokens, routing_map, probs, n_out, fused, drop_and_pad)))
    cases.append((_ops.permute, (tokens, routing_map, None, None, False, False)))
    perm, pprobs, row_map, indices = _ops.permute(tokens, routing_map, probs, T * K, False, False)
    cases += [
        (_ops.permute_backward, (perm, pprobs, row_map, torch.float32)),
        (_ops.permute_backward, (perm, None, row_map, torch.float32)),
        (_ops.unpermute, (perm, row_map, probs, None, T, True, False)),
        (_ops.unpermute, (perm, indices, probs, routing_map, T, False, False)),
        (_ops.unpermute, (perm, indices, None, None, T, False, False)),
        (_ops.unpermute_backward, (tokens, perm, row_map, None, probs, T * K)),
        (_ops.unpermute_backward, (tokens, None, row_map, None, None, T * K)),
        (_ops.unpermute_backward, (tokens, None, None, indices, None, T * K)),
    ]
    sizes, order = torch.tensor([3, 0, 4, 1], device=device), torch.tensor([2, 0, 3, 1], device=device)
    p_rows = torch.rand(T + 2, device=device)
    rows = torch.randn(T + 2, H, device=device)  # 2 rows past the chunks
    padded = _ops.permute_and_pad(tokens, routing_map, probs, 4, T * K)
    cases += [
        (_ops.sort_chunks, (rows, sizes, order, p_rows, False)),
        (_ops.sort_chunks, (rows, sizes, order, None, True)),
        (_ops.permute_and_pad, (tokens, routing_map, probs, 4, T * K)),
        (_ops.permute_and_pad, (tokens, routing_map, None, 1, None)),
        (_ops.permute_with_row_map, (torch.rand(T, 3, device=device), padded[2], padded[0].shape[0])),
        (_ops.permute_with_row_map, (torch.rand(T, device=device), row_map, T * K)),
    ]
    y, g, w = torch.randn(T, 2 * F, device=device), torch.randn(T, F, device=device), torch.rand(T, 1, device=device)
    for act in ((1.0, 0.0, None, 0.0), (1.702, 0.5, None, 0.0), (1.702, 1.0, 3.0, 0.0), tuple(_GEGLU)):
        cases += [
            (_ops.glu, (y, *act)),
            (_ops.glu, (y.view(2, -1, 2 * F), *act)),
            (_ops.weighted_glu, (y, w, *act)),
            (_ops.glu_back, (g, y, *act)),
            (_ops.weighted_glu_back, (g, y, w, *act)),
            (_ops.weighted_glu_fn, (y, w, False, *act)),
            (_ops.weighted_glu_fn, (y, w, True, *act)),
        ]
    return cases


_DIFFERENTIABLE = (
    _ops.permute, _ops.unpermute, _ops.weighted_glu_fn, _ops.sort_chunks, _ops.permute_and_pad,
    _ops.permute_with_row_map,
)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        # ops with an autograd formula get float leaves that require grad (opcheck then checks the formula too);
        # the backward ops are not differentiable (as the eager backward: once_differentiable)
        if op in _DIFFERENTIABLE:
            args = tuple(
                a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            )
        torch.library.opcheck(op, args)
