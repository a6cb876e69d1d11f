"""CPU tests of ``moe_raw.reference``: the pure-torch oracle every kernel test and the benchmark trust.

Three independent checks, so a bug in the reference cannot hide behind itself:
hand-computed tensors written literally below; a loop-based Python oracle of the row layout (no torch indexing);
and the seed's own unfused torch code (Megatron / NeMo Automodel ``moe_utils``), copied here verbatim in logic.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import seed
from moe_raw import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAP_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64]


@pytest.fixture(autouse=True)
def _seed_rng():
    torch.manual_seed(1234)


# ---------------------------------------------------------------------------------------------------------------
# The hand case: T=4 tokens, E=3 experts, H=2.
#   token 0 -> experts 0, 2      expert 0 <- tokens 0, 2
#   token 1 -> expert 1          expert 1 <- tokens 1, 2
#   token 2 -> experts 0, 1      expert 2 <- tokens 0, 3
#   token 3 -> expert 2
# Probs are dyadic so every product and sum below is exact in fp32.

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
MAP = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
PROBS = torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.125, 0.0], [0.5, 0.375, 0.0], [0.0, 0.0, 1.0]])

IDX_FULL = [0, 2, 1, 2, 0, 3]
PERM_FULL = [[1.0, 2.0], [5.0, 6.0], [3.0, 4.0], [5.0, 6.0], [1.0, 2.0], [7.0, 8.0]]
PPROBS_FULL = [0.25, 0.5, 0.125, 0.375, 0.75, 1.0]
# Row r of a permuted tensor, as an expert's output: [10 (r + 1), r^2].
Y_FULL = torch.tensor([[10.0 * (r + 1), float(r * r)] for r in range(6)])
# token 0 <- rows 0 (e0, p .25), 4 (e2, p .75); token 1 <- row 2 (p .125);
# token 2 <- rows 1 (e0, p .5), 3 (e1, p .375); token 3 <- row 5 (p 1).
UNPERM_Y_PROBS = [[40.0, 12.0], [3.75, 0.5], [25.0, 3.875], [60.0, 25.0]]
UNPERM_Y_NOPROBS = [[60.0, 16.0], [30.0, 4.0], [60.0, 10.0], [60.0, 25.0]]
# Identity experts: x * (sum of the token's probs) and x * (number of routes).
ROUND_TRIP_PROBS = [[1.0, 2.0], [0.375, 0.5], [4.375, 5.25], [7.0, 8.0]]
ROUND_TRIP_NOPROBS = [[2.0, 4.0], [3.0, 4.0], [10.0, 12.0], [7.0, 8.0]]

ROW_MAP_FULL = [[0, -1, 4], [-1, 2, -1], [1, 3, -1], [-1, -1, 5], [6, 0, 0]]


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _assert_equal(got, expected):
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(got, expected), f"\ngot      {got}\nexpected {expected}"


# ---------------------------------------------------------------------------------------------------------------
# Independent oracles.


def _seed_permute(tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    return seed.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad=drop_and_pad)


def _seed_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, drop_and_pad=False):
    return seed.unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad=drop_and_pad)


def _oracle_rows(routing_map, num_out_tokens=None, drop_and_pad=False):
    """``[(token, expert, kind)]`` per permuted row from plain Python loops; kind is routed / pad / spare."""
    num_tokens, num_experts = routing_map.shape
    m = routing_map.bool().tolist()
    if drop_and_pad:
        cap = num_out_tokens // num_experts
        rows = []
        for e in range(num_experts):
            routed = [t for t in range(num_tokens) if m[t][e]][:cap]
            unrouted = [t for t in range(num_tokens) if not m[t][e]]
            rows += [(t, e, "routed") for t in routed]
            rows += [(t, e, "pad") for t in unrouted[: max(0, cap - len(routed))]]
        return rows
    rows = [(t, e, "routed") for e in range(num_experts) for t in range(num_tokens) if m[t][e]]
    n = len(rows) if num_out_tokens is None else num_out_tokens
    return rows[:n] + [(0, -1, "spare")] * max(0, n - len(rows))


def _oracle_permute(tokens, probs, rows):
    hidden = tokens.shape[1]
    perm = torch.zeros(len(rows), hidden, dtype=tokens.dtype)
    pprobs = torch.zeros(len(rows), dtype=probs.dtype) if probs is not None else None
    idx = torch.zeros(len(rows), dtype=torch.int64)
    for r, (t, e, kind) in enumerate(rows):
        idx[r] = t
        if kind != "spare":
            perm[r] = tokens[t]
        if kind == "routed" and probs is not None:
            pprobs[r] = probs[t, e]
    return perm, pprobs, idx


def _oracle_row_map(num_tokens, num_experts, rows):
    rm = [[-1] * num_experts for _ in range(num_tokens)] + [[0] * num_experts]
    for r, (t, e, kind) in enumerate(rows):
        if kind == "routed":
            rm[t][e] = r
        elif kind == "pad":
            rm[t][e] = -2 - r
    if num_experts:
        rm[num_tokens][0] = sum(kind != "spare" for _, _, kind in rows)
    return torch.tensor(rm, dtype=torch.int32).reshape(num_tokens + 1, num_experts)


def _oracle_unpermute(y, rows, num_tokens, probs=None):
    """fp64 sum of every routed (and, without probs, padding) row into its token."""
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float64)
    for r, (t, e, kind) in enumerate(rows):
        if kind == "routed":
            out[t] += y[r].double() * (1.0 if probs is None else float(probs[t, e]))
        elif kind == "pad" and probs is None:
            out[t] += y[r].double()
    return out


def _random_map(num_tokens, num_experts, topk, sparse=False):
    """Exactly min(K, E) experts per token; ``sparse`` then drops each route with probability 0.4, leaving
    unrouted tokens and uneven, possibly empty, experts."""
    scores = torch.randn(num_tokens, num_experts)
    idx = scores.topk(min(topk, num_experts), dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, idx, True)
    if sparse:
        routing_map &= torch.rand(num_tokens, num_experts) > 0.4
    return routing_map


def _random_probs(routing_map, dtype=torch.float32):
    logits = torch.randn(routing_map.shape)
    return (torch.softmax(logits, -1) * routing_map).to(dtype)


SHAPES = [(1, 1, 1), (7, 4, 2), (33, 8, 1), (33, 8, 8), (64, 16, 3), (17, 5, 5)]


# ---------------------------------------------------------------------------------------------------------------
# permute / unpermute: the hand case.


@pytest.mark.parametrize("with_probs", [False, True])
def test_hand_permute(with_probs):
    perm, pprobs, idx = R.permute(X, MAP, PROBS if with_probs else None)
    _assert_equal(perm, _t(PERM_FULL))
    _assert_equal(idx, _t(IDX_FULL, torch.int64))
    if with_probs:
        _assert_equal(pprobs, _t(PPROBS_FULL))
    else:
        assert pprobs is None


def test_hand_unpermute_expert_outputs():
    got = R.unpermute(Y_FULL, _t(IDX_FULL, torch.int64), X.shape, probs=PROBS, routing_map=MAP)
    _assert_equal(got, _t(UNPERM_Y_PROBS))
    got = R.unpermute(Y_FULL, _t(IDX_FULL, torch.int64), X.shape)
    _assert_equal(got, _t(UNPERM_Y_NOPROBS))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_probs", [False, True])
def test_hand_round_trip(with_probs, fused):
    perm, _, idx = R.permute(X, MAP, PROBS, fused=fused)
    if with_probs:
        got = R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP, fused=fused)
        _assert_equal(got, _t(ROUND_TRIP_PROBS))
    else:
        got = R.unpermute(perm, idx, X.shape, fused=fused)
        _assert_equal(got, _t(ROUND_TRIP_NOPROBS))


def test_hand_num_out_tokens_smaller():
    # 4 of 6 routed pairs fit: the tail (t0,e2), (t3,e2) of expert-major order is dropped.
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=4)
    _assert_equal(idx, _t([0, 2, 1, 2], torch.int64))
    _assert_equal(perm, _t([[1.0, 2.0], [5.0, 6.0], [3.0, 4.0], [5.0, 6.0]]))
    _assert_equal(pprobs, _t([0.25, 0.5, 0.125, 0.375]))
    expected_probs = _t([[0.25, 0.5], [0.375, 0.5], [4.375, 5.25], [0.0, 0.0]])
    expected_noprobs = _t([[1.0, 2.0], [3.0, 4.0], [10.0, 12.0], [0.0, 0.0]])
    _assert_equal(R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP), expected_probs)
    _assert_equal(R.unpermute(perm, idx, X.shape), expected_noprobs)
    perm_f, _, row_map = R.permute(X, MAP, PROBS, num_out_tokens=4, fused=True)
    _assert_equal(perm_f, perm)
    _assert_equal(row_map, _t([[0, -1, -1], [-1, 2, -1], [1, 3, -1], [-1, -1, -1], [4, 0, 0]], torch.int32))
    _assert_equal(R.unpermute(perm, row_map, X.shape, probs=PROBS, fused=True), expected_probs)
    _assert_equal(R.unpermute(perm, row_map, X.shape, fused=True), expected_noprobs)


def test_hand_num_out_tokens_larger():
    # 8 rows for 6 routed pairs: two spare rows, zero, prob 0, index 0.
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=8)
    _assert_equal(idx, _t(IDX_FULL + [0, 0], torch.int64))
    _assert_equal(perm, _t(PERM_FULL + [[0.0, 0.0], [0.0, 0.0]]))
    _assert_equal(pprobs, _t(PPROBS_FULL + [0.0, 0.0]))
    _assert_equal(R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP), _t(ROUND_TRIP_PROBS))
    _assert_equal(R.unpermute(perm, idx, X.shape), _t(ROUND_TRIP_NOPROBS))
    _, _, row_map = R.permute(X, MAP, num_out_tokens=8, fused=True)
    _assert_equal(row_map, _t(ROW_MAP_FULL, torch.int32))
    # Spare rows hold garbage after an expert (a bias, say): with probs or the row map they are never read.
    y = perm.clone()
    y[6:] = float("nan")
    _assert_equal(R.unpermute(y, idx, X.shape, probs=PROBS, routing_map=MAP), _t(ROUND_TRIP_PROBS))
    _assert_equal(R.unpermute(y, row_map, X.shape, probs=PROBS, fused=True), _t(ROUND_TRIP_PROBS))
    _assert_equal(R.unpermute(y, row_map, X.shape, fused=True), _t(ROUND_TRIP_NOPROBS))


def test_hand_row_map_full():
    _, _, row_map = R.permute(X, MAP, PROBS, fused=True)
    _assert_equal(row_map, _t(ROW_MAP_FULL, torch.int32))
    got = R.unpermute(Y_FULL, row_map, X.shape, probs=PROBS, fused=True)
    _assert_equal(got, _t(UNPERM_Y_PROBS))
    _assert_equal(R.unpermute(Y_FULL, row_map, X.shape, fused=True), _t(UNPERM_Y_NOPROBS))


# ---------------------------------------------------------------------------------------------------------------
# drop_and_pad: the hand case.

# C = 3: every expert has 2 routed tokens, padded with its lowest unrouted token id.
#   e0: t0 t2 | t1    e1: t1 t2 | t0    e2: t0 t3 | t1
DNP3_IDX = [0, 2, 1, 1, 2, 0, 0, 3, 1]
DNP3_PPROBS = [0.25, 0.5, 0.0, 0.125, 0.375, 0.0, 0.75, 1.0, 0.0]
DNP3_ROW_MAP = [[0, -7, 6], [-4, 3, -10], [1, 4, -1], [-1, -1, 7], [9, 0, 0]]
# Without probs the seed's scatter_add sums padding rows too: t0 in rows 0, 5, 6; t1 in rows 2, 3, 8.
DNP3_ROUND_TRIP_NOPROBS = [[3.0, 6.0], [9.0, 12.0], [10.0, 12.0], [7.0, 8.0]]


@pytest.mark.parametrize("num_out_tokens", [9, 10, 11])  # C = 9 // 3 = 10 // 3 = 11 // 3 = 3
def test_hand_drop_and_pad_padding(num_out_tokens):
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=num_out_tokens, drop_and_pad=True)
    _assert_equal(idx, _t(DNP3_IDX, torch.int64))
    _assert_equal(perm, X[DNP3_IDX])  # padding rows copy their token, as the seed does
    _assert_equal(pprobs, _t(DNP3_PPROBS))
    _, _, row_map = R.permute(X, MAP, PROBS, num_out_tokens=num_out_tokens, fused=True, drop_and_pad=True)
    _assert_equal(row_map, _t(DNP3_ROW_MAP, torch.int32))
    for got in (
        R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP, drop_and_pad=True),
        R.unpermute(perm, row_map, X.shape, probs=PROBS, fused=True, drop_and_pad=True),
    ):
        _assert_equal(got, _t(ROUND_TRIP_PROBS))
    for got in (
        R.unpermute(perm, idx, X.shape, drop_and_pad=True),
        R.unpermute(perm, row_map, X.shape, fused=True, drop_and_pad=True),
    ):
        _assert_equal(got, _t(DNP3_ROUND_TRIP_NOPROBS))
    # With probs, padding rows are skipped, not multiplied by 0: garbage there (an expert's NaN) never reaches out.
    y = perm.clone()
    y[[2, 5, 8]] = float("nan")
    for got in (
        R.unpermute(y, idx, X.shape, probs=PROBS, routing_map=MAP, drop_and_pad=True),
        R.unpermute(y, row_map, X.shape, probs=PROBS, fused=True, drop_and_pad=True),
    ):
        _assert_equal(got, _t(ROUND_TRIP_PROBS))


@pytest.mark.parametrize("num_out_tokens", [3, 5])  # C = 1
def test_hand_drop_and_pad_dropping(num_out_tokens):
    # e0 keeps t0 (drops t2), e1 keeps t1 (drops t2), e2 keeps t0 (drops t3).
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=num_out_tokens, drop_and_pad=True)
    _assert_equal(idx, _t([0, 1, 0], torch.int64))
    _assert_equal(perm, _t([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
    _assert_equal(pprobs, _t([0.25, 0.125, 0.75]))
    _, _, row_map = R.permute(X, MAP, num_out_tokens=num_out_tokens, fused=True, drop_and_pad=True)
    _assert_equal(row_map, _t([[0, -1, 2], [-1, 1, -1], [-1, -1, -1], [-1, -1, -1], [3, 0, 0]], torch.int32))
    expected = _t([[1.0, 2.0], [0.375, 0.5], [0.0, 0.0], [0.0, 0.0]])
    _assert_equal(R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP, drop_and_pad=True), expected)
    _assert_equal(R.unpermute(perm, row_map, X.shape, probs=PROBS, fused=True), expected)
    expected = _t([[2.0, 4.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    _assert_equal(R.unpermute(perm, idx, X.shape, drop_and_pad=True), expected)
    _assert_equal(R.unpermute(perm, row_map, X.shape, fused=True), expected)


def test_hand_drop_and_pad_capacity_zero():
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=2, drop_and_pad=True)
    assert perm.shape == (0, 2) and pprobs.shape == (0,) and idx.shape == (0,) and idx.dtype == torch.int64
    _, _, row_map = R.permute(X, MAP, num_out_tokens=2, fused=True, drop_and_pad=True)
    _assert_equal(row_map, _t([[-1] * 3] * 4 + [[0, 0, 0]], torch.int32))


@pytest.mark.parametrize("num_out_tokens", [12, 30, 1000])  # C = 4, 10, 333 >= T: the seed's slice keeps T
def test_hand_drop_and_pad_capacity_over_tokens(num_out_tokens):
    perm, pprobs, idx = R.permute(X, MAP, PROBS, num_out_tokens=num_out_tokens, drop_and_pad=True)
    expected_idx = [0, 2, 1, 3, 1, 2, 0, 3, 0, 3, 1, 2]
    _assert_equal(idx, _t(expected_idx, torch.int64))
    _assert_equal(perm, X[expected_idx])
    _assert_equal(pprobs, _t([0.25, 0.5, 0, 0, 0.125, 0.375, 0, 0, 0.75, 1.0, 0, 0]))
    _, _, row_map = R.permute(X, MAP, num_out_tokens=num_out_tokens, fused=True, drop_and_pad=True)
    expected_map = [[0, -8, 8], [-4, 4, -12], [1, 5, -13], [-5, -9, 9], [12, 0, 0]]
    _assert_equal(row_map, _t(expected_map, torch.int32))
    _assert_equal(
        R.unpermute(perm, idx, X.shape, probs=PROBS, routing_map=MAP, drop_and_pad=True), _t(ROUND_TRIP_PROBS)
    )
    _assert_equal(R.unpermute(perm, row_map, X.shape, probs=PROBS, fused=True), _t(ROUND_TRIP_PROBS))
    # Without probs every token is summed E=3 times (once per expert, routed or padding).
    _assert_equal(R.unpermute(perm, idx, X.shape, drop_and_pad=True), 3 * X)


# ---------------------------------------------------------------------------------------------------------------
# Random inputs against the seed's code and the loop oracle.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("sparse", [False, True])
def test_permute_matches_seed_bitwise(dtype, T, E, K, sparse):
    tokens = torch.randn(T, 24).to(dtype)
    routing_map = _random_map(T, E, K, sparse)
    probs = _random_probs(routing_map, dtype)
    for p in (None, probs):
        got = R.permute(tokens, routing_map, p)
        want = _seed_permute(tokens, routing_map, p)
        _assert_equal(got[0], want[0])
        _assert_equal(got[2], want[2])
        if p is None:
            assert got[1] is None
        else:
            _assert_equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("cap_factor", [0.5, 1.0, 1.5, 100.0])
@pytest.mark.parametrize("sparse", [False, True])
def test_drop_and_pad_matches_seed_bitwise(dtype, T, E, K, cap_factor, sparse):
    tokens = torch.randn(T, 24).to(dtype)
    routing_map = _random_map(T, E, K, sparse)
    probs = _random_probs(routing_map, dtype)
    num_out_tokens = int(T * min(K, E) * cap_factor)
    capacity = num_out_tokens // E
    perm, pprobs, idx = R.permute(tokens, routing_map, probs, num_out_tokens=num_out_tokens, drop_and_pad=True)
    formula = routing_map.to(torch.int8).T.contiguous().argsort(dim=-1, descending=True, stable=True)
    _assert_equal(idx, formula[:, :capacity].reshape(-1))
    want = _seed_permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad=True)
    _assert_equal(perm, want[0])
    _assert_equal(idx, want[2])
    _assert_equal(pprobs, want[1])  # probs are dense zero off-route, so the seed reads 0 at padding rows too
    rows = _oracle_rows(routing_map, num_out_tokens, drop_and_pad=True)
    assert len(rows) == E * min(capacity, T)
    o_perm, o_pprobs, o_idx = _oracle_permute(tokens, probs, rows)
    _assert_equal(perm, o_perm)
    _assert_equal(pprobs, o_pprobs)
    _assert_equal(idx, o_idx)


def _err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs_dtype", ["same", torch.float32])
@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("drop_and_pad", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_unpermute_matches_seed(dtype, probs_dtype, T, E, K, drop_and_pad, sparse):
    probs_dtype = dtype if probs_dtype == "same" else probs_dtype
    hidden = 40
    routing_map = _random_map(T, E, K, sparse)
    probs = _random_probs(routing_map, probs_dtype)
    num_out_tokens = T * min(K, E) if drop_and_pad else None  # capacity = T*K // E: some drops, some padding
    _, _, idx = R.permute(torch.zeros(T, hidden, dtype=dtype), routing_map, None, num_out_tokens, False, drop_and_pad)
    y = torch.randn(idx.numel(), hidden).to(dtype)  # expert outputs
    rows = _oracle_rows(routing_map, num_out_tokens, drop_and_pad)
    for p in (None, probs):
        got = R.unpermute(y, idx, (T, hidden), p, routing_map, drop_and_pad=drop_and_pad)
        seed = _seed_unpermute(y, idx, (T, hidden), p, routing_map, drop_and_pad=drop_and_pad)
        assert got.dtype == seed.dtype == dtype and got.shape == (T, hidden)
        ref = _oracle_unpermute(y, rows, T, p)
        # fp32 accumulation vs the seed's dtype arithmetic: flash-attention's rule against the fp64 oracle.
        assert _err(got, ref) <= 2 * _err(seed, ref) + 1e-6 * max(1.0, ref.abs().max().item())
        # n products summed in fp32, then one rounding to dtype.
        n = E if drop_and_pad else min(K, E)
        scale = max(1.0, ref.abs().max().item())
        atol = (torch.finfo(dtype).eps + n * torch.finfo(torch.float32).eps) * scale
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize(
    "num_out,drop_and_pad",
    [(n, False) for n in ("none", "fewer", "equal", "more", "zero")]
    + [(n, True) for n in ("fewer", "equal", "more", "zero")],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_layout_and_row_map_match_loop_oracle(T, E, K, num_out, drop_and_pad, sparse):
    routing_map = _random_map(T, E, K, sparse)
    routed = int(routing_map.sum())
    num_out_tokens = {"none": None, "fewer": routed // 2 + 1, "equal": routed, "more": routed + 5, "zero": 0}[num_out]
    tokens = torch.randn(T, 8)
    probs = _random_probs(routing_map)
    rows = _oracle_rows(routing_map, num_out_tokens, drop_and_pad)
    perm, pprobs, idx = R.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad=drop_and_pad)
    o_perm, o_pprobs, o_idx = _oracle_permute(tokens, probs, rows)
    _assert_equal(perm, o_perm)
    _assert_equal(pprobs, o_pprobs)
    _assert_equal(idx, o_idx)
    perm_f, pprobs_f, row_map = R.permute(tokens, routing_map, probs, num_out_tokens, True, drop_and_pad)
    _assert_equal(perm_f, perm)
    _assert_equal(pprobs_f, pprobs)
    _assert_equal(row_map, _oracle_row_map(T, E, rows))
    row_map2, n_rows = R.build_row_map(routing_map, num_out_tokens, drop_and_pad)
    _assert_equal(row_map2, row_map)
    assert n_rows == len(rows)


# ---------------------------------------------------------------------------------------------------------------
# num_out_tokens without drop_and_pad.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", SHAPES)
def test_num_out_tokens_equal_is_bit_identical(dtype, T, E, K):
    tokens = torch.randn(T, 16).to(dtype)
    routing_map = _random_map(T, E, K)
    probs = _random_probs(routing_map, dtype)
    n = int(routing_map.sum())
    for fused in (False, True):
        a = R.permute(tokens, routing_map, probs, None, fused)
        b = R.permute(tokens, routing_map, probs, n, fused)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
        y_out = torch.randn_like(a[0])
        kw = dict(fused=fused) if fused else dict(routing_map=routing_map)
        _assert_equal(
            R.unpermute(y_out, a[2], tokens.shape, probs, **kw), R.unpermute(y_out, b[2], tokens.shape, probs, **kw)
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", [(7, 4, 2), (33, 8, 8), (64, 16, 3)])
@pytest.mark.parametrize("fused", [False, True])
def test_num_out_tokens_fewer_drops_the_tail(dtype, T, E, K, fused):
    tokens = torch.randn(T, 16).to(dtype)
    routing_map = _random_map(T, E, K)
    probs = _random_probs(routing_map, dtype)
    n = int(routing_map.sum()) * 2 // 3
    full = R.permute(tokens, routing_map, probs)
    perm, pprobs, idx = R.permute(tokens, routing_map, probs, n, fused)
    _assert_equal(perm, full[0][:n])
    _assert_equal(pprobs, full[1][:n])
    if not fused:
        _assert_equal(idx, full[2][:n])
    # Dropped pairs contribute nothing: same as a map with those pairs removed.
    kept_map = torch.zeros_like(routing_map)
    kept_map[full[2][:n], torch.arange(E).repeat_interleave(routing_map.sum(0))[:n]] = True
    assert int(kept_map.sum()) == n
    perm_k, _, idx_k = R.permute(tokens, routing_map=kept_map, probs=probs * kept_map, fused=fused)
    _assert_equal(perm_k, perm)
    kw = dict(fused=True) if fused else dict(routing_map=routing_map)
    kw_k = dict(fused=True) if fused else dict(routing_map=kept_map)
    _assert_equal(
        R.unpermute(perm, idx, tokens.shape, probs, **kw), R.unpermute(perm_k, idx_k, tokens.shape, probs, **kw_k)
    )
    _assert_equal(
        R.unpermute(perm, idx, tokens.shape, fused=fused), R.unpermute(perm_k, idx_k, tokens.shape, fused=fused)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", [(7, 4, 2), (33, 8, 8)])
@pytest.mark.parametrize("fused", [False, True])
def test_num_out_tokens_more_spare_rows(dtype, T, E, K, fused):
    tokens = torch.randn(T, 16).to(dtype)
    routing_map = _random_map(T, E, K)
    probs = _random_probs(routing_map, dtype)
    n = int(routing_map.sum())
    full = R.permute(tokens, routing_map, probs)
    perm, pprobs, idx = R.permute(tokens, routing_map, probs, n + 7, fused)
    _assert_equal(perm[:n], full[0])
    _assert_equal(perm[n:], torch.zeros(7, 16, dtype=dtype))
    _assert_equal(pprobs, torch.cat([full[1], torch.zeros(7, dtype=dtype)]))
    if not fused:
        _assert_equal(idx, torch.cat([full[2], torch.zeros(7, dtype=torch.int64)]))
    else:
        assert int(idx[T, 0]) == n
    kw = dict(fused=True) if fused else dict(routing_map=routing_map)
    _assert_equal(
        R.unpermute(perm, idx, tokens.shape, probs, **kw),
        R.unpermute(full[0], full[2], tokens.shape, probs, routing_map=routing_map),
    )


# ---------------------------------------------------------------------------------------------------------------
# fused=True: the row map round trip.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("mode", ["none", "fewer", "more", "dnp_drop", "dnp_pad"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_unpermute_equals_unfused(dtype, T, E, K, mode, sparse):
    routing_map = _random_map(T, E, K, sparse)
    probs = _random_probs(routing_map, dtype)
    routed = int(routing_map.sum())
    num_out_tokens, dnp = {
        "none": (None, False),
        "fewer": (max(1, routed // 2), False),
        "more": (routed + 3, False),
        "dnp_drop": (max(E, routed // 2), True),
        "dnp_pad": (2 * routed + E, True),
    }[mode]
    # Integer-valued data: every sum is exact in every dtype, so the two accumulation orders must agree bitwise.
    tokens = torch.randint(-8, 9, (T, 12)).to(dtype)
    perm, _, idx = R.permute(tokens, routing_map, probs, num_out_tokens, False, dnp)
    perm_f, _, row_map = R.permute(tokens, routing_map, probs, num_out_tokens, True, dnp)
    _assert_equal(perm_f, perm)
    y = torch.randint(-8, 9, perm.shape).to(dtype)
    if not dnp:
        y[routed:] = 0  # spare rows (if any): the unfused format cannot tell them from a row of token 0
    unfused = R.unpermute(y, idx, tokens.shape, probs, routing_map, drop_and_pad=dnp)
    _assert_equal(R.unpermute(y, row_map, tokens.shape, probs, fused=True, drop_and_pad=dnp), unfused)
    unfused = R.unpermute(y, idx, tokens.shape, drop_and_pad=dnp)
    _assert_equal(R.unpermute(y, row_map, tokens.shape, fused=True, drop_and_pad=dnp), unfused)


# ---------------------------------------------------------------------------------------------------------------
# NaN in probs where the map is 0.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dnp", [False, True])
@pytest.mark.parametrize("T,E,K", [(7, 4, 2), (33, 8, 1), (17, 5, 5)])
def test_nan_probs_off_route_never_reach_output(dtype, fused, dnp, T, E, K):
    tokens = torch.randn(T, 16).to(dtype)
    routing_map = _random_map(T, E, K, sparse=True)
    clean = _random_probs(routing_map, dtype)
    dirty = torch.where(routing_map, clean, torch.full_like(clean, float("nan")))
    num_out_tokens = T * min(K, E) if dnp else None  # C = T*K // E: some experts drop, some pad
    perm, pprobs, idx = R.permute(tokens, routing_map, dirty, num_out_tokens, fused, dnp)
    assert not pprobs.isnan().any()
    _assert_equal(pprobs, R.permute(tokens, routing_map, clean, num_out_tokens, fused, dnp)[1])
    y = torch.randn(perm.shape).to(dtype)
    kw = dict(fused=True) if fused else dict(routing_map=routing_map)
    got = R.unpermute(y, idx, tokens.shape, dirty, drop_and_pad=dnp, **kw)
    assert not got.isnan().any()
    _assert_equal(got, R.unpermute(y, idx, tokens.shape, clean, drop_and_pad=dnp, **kw))


def test_nan_probs_hand_case_drop_and_pad():
    dirty = torch.where(MAP, PROBS, torch.full_like(PROBS, float("nan")))
    perm, pprobs, idx = R.permute(X, MAP, dirty, num_out_tokens=9, drop_and_pad=True)
    _assert_equal(pprobs, _t(DNP3_PPROBS))
    got = R.unpermute(perm, idx, X.shape, probs=dirty, routing_map=MAP, drop_and_pad=True)
    _assert_equal(got, _t(ROUND_TRIP_PROBS))


# ---------------------------------------------------------------------------------------------------------------
# routing_map dtypes.


@pytest.mark.parametrize("map_dtype", MAP_DTYPES)
@pytest.mark.parametrize("num_out_tokens,dnp", [(None, False), (5, False), (9, True), (3, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_routing_map_dtypes_agree(map_dtype, num_out_tokens, dnp, fused):
    rm = MAP.to(map_dtype)
    want = R.permute(X, MAP, PROBS, num_out_tokens, fused, dnp)
    got = R.permute(X, rm, PROBS, num_out_tokens, fused, dnp)
    for g, w in zip(got, want, strict=True):
        _assert_equal(g, w)
    kw = dict(fused=True) if fused else {}
    _assert_equal(
        R.unpermute(got[0], got[2], X.shape, PROBS, rm, drop_and_pad=dnp, **kw),
        R.unpermute(want[0], want[2], X.shape, PROBS, MAP, drop_and_pad=dnp, **kw),
    )


# ---------------------------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_out_tokens,dnp", [(None, False), (0, False), (6, True)])
def test_zero_tokens(fused, num_out_tokens, dnp):
    x = torch.zeros(0, 2)
    rm = torch.zeros(0, 3, dtype=torch.bool)
    p = torch.zeros(0, 3)
    perm, pprobs, idx = R.permute(x, rm, p, num_out_tokens, fused, dnp)
    assert perm.shape == (0, 2) and pprobs.shape == (0,)
    if fused:
        _assert_equal(idx, torch.zeros(1, 3, dtype=torch.int32))
    else:
        _assert_equal(idx, torch.zeros(0, dtype=torch.int64))
    kw = dict(fused=True) if fused else dict(routing_map=rm)
    assert R.unpermute(perm, idx, x.shape, p, drop_and_pad=dnp, **kw).shape == (0, 2)
    assert R.unpermute(perm, idx, x.shape, drop_and_pad=dnp, fused=fused).shape == (0, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_zero_tokens_with_spare_rows(fused):
    # Contract: num_out_tokens rows, all spare (zero, prob 0, index 0), whatever T is.
    x = torch.zeros(0, 2)
    rm = torch.zeros(0, 3, dtype=torch.bool)
    p = torch.zeros(0, 3)
    perm, pprobs, idx = R.permute(x, rm, p, num_out_tokens=4, fused=fused)
    _assert_equal(perm, torch.zeros(4, 2))
    _assert_equal(pprobs, torch.zeros(4))
    if fused:
        _assert_equal(idx, torch.zeros(1, 3, dtype=torch.int32))
        assert R.unpermute(perm, idx, x.shape, p, fused=True).shape == (0, 2)
    else:
        _assert_equal(idx, torch.zeros(4, dtype=torch.int64))
        assert R.unpermute(perm, idx, x.shape, p, routing_map=rm).shape == (0, 2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("num_out_tokens", [None, 0])
def test_no_routed_pairs(fused, num_out_tokens):
    # Tokens exist but nothing is routed (or num_out_tokens=0): permute is empty, unpermute is all zeros
    # (the seed: masked_select gives an empty prob vector and scatter_add_ of nothing).
    x = torch.randn(3, 2)
    rm = torch.zeros(3, 2, dtype=torch.bool) if num_out_tokens is None else MAP[:3, :2]
    p = torch.zeros(3, 2)
    perm, pprobs, idx = R.permute(x, rm, p, num_out_tokens, fused)
    assert perm.shape == (0, 2) and pprobs.shape == (0,)
    kw = dict(fused=True) if fused else dict(routing_map=rm)
    _assert_equal(R.unpermute(perm, idx, x.shape, p, **kw), torch.zeros(3, 2))
    _assert_equal(R.unpermute(perm, idx, x.shape, fused=fused), torch.zeros(3, 2))


def test_one_expert():
    x = torch.randn(5, 3)
    rm = torch.tensor([[1], [0], [1], [1], [0]], dtype=torch.bool)
    p = torch.tensor([[0.5], [0.0], [0.25], [2.0], [0.0]])
    perm, pprobs, idx = R.permute(x, rm, p)
    _assert_equal(idx, _t([0, 2, 3], torch.int64))
    _assert_equal(perm, x[[0, 2, 3]])
    _assert_equal(pprobs, _t([0.5, 0.25, 2.0]))
    _, _, row_map = R.permute(x, rm, p, fused=True)
    _assert_equal(row_map, _t([[0], [-1], [1], [2], [-1], [3]], torch.int32))
    expected = x * _t([[0.5], [0.0], [0.25], [2.0], [0.0]])
    _assert_equal(R.unpermute(perm, idx, x.shape, p, rm), expected)
    _assert_equal(R.unpermute(perm, row_map, x.shape, p, fused=True), expected)
    # drop_and_pad with E=1, C=4: t0 t2 t3 then t1 as padding.
    perm, pprobs, idx = R.permute(x, rm, p, num_out_tokens=4, drop_and_pad=True)
    _assert_equal(idx, _t([0, 2, 3, 1], torch.int64))
    _assert_equal(pprobs, _t([0.5, 0.25, 2.0, 0.0]))
    # All tokens on the single expert: permute is the identity.
    ones = torch.ones(5, 1, dtype=torch.bool)
    perm, _, idx = R.permute(x, ones)
    _assert_equal(perm, x)
    _assert_equal(idx, torch.arange(5))


def test_empty_expert_and_all_on_one_expert():
    x = torch.randn(6, 4)
    rm = torch.zeros(6, 4, dtype=torch.bool)
    rm[:, 2] = True  # every token on expert 2; experts 0, 1, 3 empty
    p = rm.float() * torch.rand(6, 1)
    perm, pprobs, idx = R.permute(x, rm, p)
    _assert_equal(idx, torch.arange(6))
    _assert_equal(perm, x)
    _assert_equal(pprobs, p[:, 2])
    _, _, row_map = R.permute(x, rm, p, fused=True)
    expected_map = torch.full((7, 4), -1, dtype=torch.int32)
    expected_map[:6, 2] = torch.arange(6, dtype=torch.int32)
    expected_map[6] = torch.tensor([6, 0, 0, 0], dtype=torch.int32)
    _assert_equal(row_map, expected_map)
    _assert_equal(R.unpermute(perm, idx, x.shape, p, rm), x * p[:, 2:3])
    # drop_and_pad, C = 2: expert 2 keeps t0 t1 (drops t2..t5); the empty experts are all padding (t0 t1).
    perm, pprobs, idx = R.permute(x, rm, p, num_out_tokens=8, drop_and_pad=True)
    _assert_equal(idx, _t([0, 1, 0, 1, 0, 1, 0, 1], torch.int64))
    _assert_equal(pprobs, torch.cat([torch.zeros(4), p[:2, 2], torch.zeros(2)]))
    _, _, row_map = R.permute(x, rm, p, num_out_tokens=8, fused=True, drop_and_pad=True)
    expected_map = torch.full((7, 4), -1, dtype=torch.int32)
    expected_map[0] = torch.tensor([-2, -4, 4, -8], dtype=torch.int32)
    expected_map[1] = torch.tensor([-3, -5, 5, -9], dtype=torch.int32)
    expected_map[6] = torch.tensor([8, 0, 0, 0], dtype=torch.int32)
    _assert_equal(row_map, expected_map)
    got = R.unpermute(perm, idx, x.shape, p, rm, drop_and_pad=True)
    expected = torch.zeros_like(x)
    expected[:2] = x[:2] * p[:2, 2:3]
    _assert_equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU family.


def _silu(a: float) -> float:
    return a / (1.0 + math.exp(-a))


def _dsilu(a: float) -> float:
    s = 1.0 / (1.0 + math.exp(-a))
    return s * (1.0 + a * (1.0 - s))


def _hand_swiglu(y):
    """Row-wise by hand in Python floats: y [N, 2F] -> swiglu [N, F], d/da, d/db."""
    f = y.shape[-1] // 2
    rows = y.double().tolist()
    out = [[_silu(r[i]) * r[f + i] for i in range(f)] for r in rows]
    da = [[_dsilu(r[i]) * r[f + i] for i in range(f)] for r in rows]
    db = [[_silu(r[i]) for i in range(f)] for r in rows]
    return (
        torch.tensor(out, dtype=torch.float64),
        torch.tensor(da, dtype=torch.float64),
        torch.tensor(db, dtype=torch.float64),
    )


def test_swiglu_literal():
    # a = 0: silu(0) = 0, silu'(0) = 1/2.
    y = _t([[0.0, 2.0]], torch.float64)
    g = _t([[3.0]], torch.float64)
    w = _t([[2.0]], torch.float64)
    _assert_equal(R.swiglu(y), _t([[0.0]], torch.float64))
    _assert_equal(R.swiglu_back(g, y), _t([[3.0, 0.0]], torch.float64))
    _assert_equal(R.weighted_swiglu(y, w), _t([[0.0]], torch.float64))
    dy, dw = R.weighted_swiglu_back(g, y, w)
    _assert_equal(dy, _t([[6.0, 0.0]], torch.float64))
    _assert_equal(dw, _t([[0.0]], torch.float64))


def test_swiglu_family_hand_formulas():
    n, f = 5, 3
    y = torch.randn(n, 2 * f, dtype=torch.float64) * 3
    y[0, :f] = torch.tensor([0.0, -20.0, 20.0], dtype=torch.float64)
    g = torch.randn(n, f, dtype=torch.float64)
    w = torch.rand(n, 1, dtype=torch.float64)
    out, da, db = _hand_swiglu(y)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.swiglu(y), out, **tol)
    torch.testing.assert_close(R.weighted_swiglu(y, w), out * w, **tol)
    torch.testing.assert_close(R.swiglu_back(g, y), torch.cat([g * da, g * db], -1), **tol)
    dy, dw = R.weighted_swiglu_back(g, y, w)
    torch.testing.assert_close(dy, torch.cat([g * w * da, g * w * db], -1), **tol)
    torch.testing.assert_close(dw, (out * g).sum(-1, keepdim=True), **tol)


def test_swiglu_3d():
    y = torch.randn(2, 3, 8, dtype=torch.float64)
    out, _, _ = _hand_swiglu(y.reshape(6, 8))
    torch.testing.assert_close(R.swiglu(y), out.reshape(2, 3, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("y_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_dtype_rules(y_dtype, w_dtype):
    y = torch.randn(4, 6).to(y_dtype)
    g = torch.randn(4, 3).to(y_dtype)
    w = torch.rand(4, 1).to(w_dtype)
    assert R.swiglu(y).dtype == y_dtype
    assert R.swiglu_back(g, y).dtype == y_dtype
    assert R.weighted_swiglu(y, w).dtype == y_dtype
    dy, dw = R.weighted_swiglu_back(g, y, w)
    assert (dy.dtype, dw.dtype) == (y_dtype, w_dtype)
    assert dy.shape == (4, 6) and dw.shape == (4, 1)
    x = y.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    out = R.WeightedSwiGLUFunction.apply(x, wr, False)
    assert out.dtype == y_dtype
    out.backward(g)
    assert (x.grad.dtype, wr.grad.dtype) == (y_dtype, w_dtype)


def test_weighted_swiglu_function_gradcheck():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.WeightedSwiGLUFunction.apply(a, b, False), (x, w))
    x3 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    w3 = torch.rand(4, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.weighted_bias_swiglu_impl(a, b), (x3, w3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_swiglu_function_matches_torch_autograd(dtype):
    x = torch.randn(6, 10, dtype=dtype, requires_grad=True)
    w = torch.rand(6, 1, dtype=dtype, requires_grad=True)
    g = torch.randn(6, 5, dtype=dtype)
    out = R.WeightedSwiGLUFunction.apply(x, w, False)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    out_t = R.weighted_swiglu(x, w)
    dx_t, dw_t = torch.autograd.grad(out_t, (x, w), g)
    _assert_equal(out, out_t.detach())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(dx, dx_t, rtol=tol, atol=tol)
    torch.testing.assert_close(dw, dw_t, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_bias_swiglu_impl_2d_3d(dtype):
    s, b, f = 3, 2, 4
    x3 = torch.randn(s, b, 2 * f).to(dtype)
    w = torch.rand(s * b, 1)
    g3 = torch.randn(s, b, f).to(dtype)
    a = x3.clone().requires_grad_()
    wa = w.clone().requires_grad_()
    out3 = R.weighted_bias_swiglu_impl(a, wa)
    assert out3.shape == (s, b, f) and out3.dtype == dtype
    out3.backward(g3)
    x2 = x3.reshape(s * b, 2 * f).clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    out2 = R.weighted_bias_swiglu_impl(x2, w2)
    assert out2.shape == (s * b, f)
    out2.backward(g3.reshape(s * b, f))
    _assert_equal(out3.detach().reshape(s * b, f), out2.detach())
    _assert_equal(out2.detach(), R.weighted_swiglu(x2.detach(), w))
    _assert_equal(a.grad.reshape(s * b, 2 * f), x2.grad)
    _assert_equal(wa.grad, w2.grad)
    dy, dw = R.weighted_swiglu_back(g3.reshape(s * b, f), x2.detach(), w)
    _assert_equal(x2.grad, dy)
    _assert_equal(w2.grad, dw)
    with pytest.raises(AssertionError):
        R.weighted_bias_swiglu_impl(torch.randn(8), torch.rand(1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_input_store_only_rounds_saved_input(dtype):
    x = (torch.randn(8, 16) * 2).to(dtype)
    w = torch.rand(8, 1)
    g = torch.randn(8, 8).to(dtype)
    grads = {}
    for fp8 in (False, True):
        a = x.clone().requires_grad_()
        wa = w.clone().requires_grad_()
        out = R.weighted_bias_swiglu_impl(a, wa, fp8_input_store=fp8)
        out.backward(g)
        grads[fp8] = (out.detach(), a.grad, wa.grad)
    _assert_equal(grads[True][0], grads[False][0])  # forward uses the full-precision input
    x_fp8 = x.to(torch.float8_e4m3fn).to(dtype)
    assert not torch.equal(x_fp8, x)  # the test must actually round something
    dy, dw = R.weighted_swiglu_back(g, x_fp8, w)
    _assert_equal(grads[True][1], dy)
    _assert_equal(grads[True][2], dw)
    dy_full, dw_full = R.weighted_swiglu_back(g, x, w)
    _assert_equal(grads[False][1], dy_full)
    _assert_equal(grads[False][2], dw_full)
    assert not torch.equal(grads[True][1], grads[False][1])
