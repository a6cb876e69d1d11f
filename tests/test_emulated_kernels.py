"""The CUDA C kernels run on the CPU by the emulator (tests/cuda_emu), against the CPU path: no GPU needed.

Each test calls a launcher's ``*_cuda`` function (the same sizing, argument packing and launch a GPU call makes)
on CPU tensors inside ``cuda_emu.emulated()``, and compares with the CPU twin of the same step (moe_raw._cpu, the
reference, the FP8 transcription): bit for bit where the kernel's arithmetic is the twin's (moves, sums in expert
order, FP8 codes), within rounding for the probs gradient's dot products (the kernels' reduction trees). Where an op
has two kernels (the gather and the FP8 quantize: "warp", a warp a token; "block", a block a token), both run every
case and must agree.

What this catches: indexing, tails, row lists, warp-collective and barrier misuse (the emulator reports those),
shared-memory overruns, launch shapes. What it cannot: races, timing, the sm_90 bulk-copy path (compiled out), the
GPU's own rounding of library math. The GPU suite (-m gpu) remains the judge on a device.
"""

from __future__ import annotations

import itertools
import os

import cuda_emu
import pytest
import torch
from conftest import make_probs, make_routing

from moe_raw import _cpu, _launch, reference
from moe_raw import reference_fp8 as RF
from moe_raw._kernels import dispatch as D
from moe_raw._kernels import quantize as QK

pytestmark = [
    pytest.mark.skipif(cuda_emu.unavailable() is not None, reason=str(cuda_emu.unavailable())),
    # No Numba here: the CPU job (README <!-- ci:cpu -->) runs these; the simulator job would repeat them as they are.
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="emulated kernels run in the CPU job"),
]

KINDS = ("warp", "block")  # the gather's and the quantize's two kernels


@pytest.fixture(params=cuda_emu.SCHEDULES)
def emulated(request, monkeypatch):
    """Run inside the emulator, once for each order its threads can be resumed in (a missing barrier or
    __syncwarp that one order hides, another exposes); yields a function that picks the gather's and the
    quantize's kernel kind."""

    def kernel_kind(kind):
        monkeypatch.setattr(D, "_GATHER_KERNEL", kind)
        monkeypatch.setattr(QK, "_QUANT_KERNEL", kind)

    with cuda_emu.emulated(request.param):
        cuda_emu.launches.clear()
        yield kernel_kind


def launched():
    """Base names of the kernels launched since the fixture started."""
    return {_launch.base_name(name) for name, *_ in cuda_emu.launches}


def assert_same(got, want, what):
    assert (got is None) == (want is None), what
    if got is not None:
        assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
        assert torch.equal(as_bits(got), as_bits(want)), what


def as_bits(x):
    """FP8 tensors as their bytes (torch.equal has no FP8 kernel on the CPU; a move is a move)."""
    return x.view(torch.uint8) if x.dtype.is_floating_point and x.element_size() == 1 else x


# (T, E, H, K, dtype, routing kind): odd H and 1-byte rows take the 1 / 2 / 4 / 8-byte pack instances; T * E
# above 4096 takes the routing tables (permute_scatter) even with num_out_tokens given, below it permute_small; E 33
# and 300 cross warp_slots' 32-expert rounds unevenly; E 3000 exceeds gather_warp's shared memory and must fall back
# to gather_reduce; E 4096 (the most supported) gives each of a row kernel's 128 threads a run of 32 experts, all the
# bits of scatter_token's routed mask. H 4100 fp32 (16400-byte rows) takes permute_scatter's bulk-copy stage in two
# chunks. The sums' several-packs-a-step path (sum_packs: K 1 and 2, 8- and 16-byte packs) needs U * step packs and
# leaves a tail: H 4100 fp32 at K 2 (1025 packs), H 4104 bf16 at K 1 (513 packs: 4 steps and a tail a warp, one and a
# tail a block).
CASES = [
    (1, 1, 8, 1, torch.bfloat16, "topk"),
    (37, 8, 64, 2, torch.bfloat16, "topk"),
    (37, 8, 63, 2, torch.bfloat16, "sparse"),
    (29, 33, 40, 5, torch.float16, "empty_expert"),
    (50, 4, 7, 1, torch.float32, "one_expert"),
    (21, 16, 5, 3, torch.float64, "balanced"),
    (300, 16, 24, 4, torch.bfloat16, "sparse"),
    (40, 300, 16, 8, torch.bfloat16, "topk"),
    (9, 3000, 8, 6, torch.float32, "topk"),
    (3, 4096, 8, 4, torch.bfloat16, "topk"),
    (6, 4, 4100, 2, torch.float32, "topk"),
    (5, 4, 4104, 1, torch.bfloat16, "topk"),
]


def case_id(c):
    T, E, H, K, dtype, kind = c
    return f"T{T}-E{E}-H{H}-K{K}-{str(dtype)[6:]}-{kind}"


def make_case(c, strided=False):
    T, E, H, K, dtype, kind = c
    routing_map = make_routing(T, E, K, kind=kind)
    probs = make_probs(routing_map)
    x = torch.randn(T, H + 3 if strided else H).to(dtype)
    return (x[:, 1 : H + 1] if strided else x), routing_map, probs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_permute(emulated, case):
    x, routing_map, probs = make_case(case)
    routed = int(routing_map.sum())
    for n_out, drop_and_pad in ((None, False), (routed, False), (routed + 5, False), (max(routed - 3, 0), False),
                                (routed, True)):  # fmt: skip
        got = D._permute_cuda(x, routing_map, probs, n_out, drop_and_pad)
        want = _cpu.permute(x, routing_map, probs, n_out, drop_and_pad)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, f"{name} (num_out_tokens={n_out}, drop_and_pad={drop_and_pad})")
    T, E = routing_map.shape
    # num_out_tokens None: the tables, then the row kernel: permute_grouped for 16-byte rows of 8-16 KiB, at least
    # 4 routed pairs a token and E <= 1024 (not for drop_and_pad), else permute_scatter
    row_bytes = x.shape[1] * x.element_size()
    grouped = (
        row_bytes % 16 == 0 and D._GROUP_MIN_ROW_BYTES <= row_bytes <= D._STAGE_BYTES and E <= D._GROUP_MAX_EXPERTS
        and int(routing_map.sum()) >= D._GROUP_MIN_PAIRS * T
    )  # fmt: skip
    assert {"routing_pack", "permute_grouped" if grouped else "permute_scatter"} <= launched(), launched()
    assert ("permute_grouped" in launched()) == grouped, launched()
    assert ("permute_small" in launched()) == (T * E <= D._SMALL_MAP), launched()


@pytest.mark.parametrize(
    ("T", "E"),
    [(200, 4096), (200, 60), (600, 3000), (600, 1000), (300, 40)],
    ids=["pack-2-rounds", "pack-small", "scan-2-rounds", "scan-1-round", "scan-small"],
)
def test_routing_tables(emulated, T, E):
    """routing_pack + routing_scan's tables against torch: each (expert, 256-token tile) count and its exclusive
    prefix in expert-major order (tile_base), each expert's first row (expert_start). The scan stages 8 entries a
    thread a round: T <= 256 runs it inside routing_pack (256 threads: E 4096 is two rounds), else routing_scan
    (1024 threads: 3 tiles x E 3000 is two rounds, x E 1000 one); "small": a few entries (E or 2 E)."""
    routing_map = make_routing(T, E, 3, kind="topk")
    n_words, n_tiles = -(-T // 32), -(-T // 256)
    buf = torch.full((D._workspace_ints(T, E),), -7, dtype=torch.int32)
    D._tables(routing_map, buf.data_ptr())
    padded = torch.zeros(n_tiles * 256, E, dtype=torch.int64)
    padded[:T] = routing_map.long()
    tile_sums = padded.view(n_tiles, 256, E).sum(1).t().reshape(-1)  # [E * n_tiles], expert-major
    tile_base = torch.cumsum(tile_sums, 0) - tile_sums
    ew, m = n_words * E, n_tiles * E
    assert torch.equal(buf[2 * ew : 2 * ew + m].long(), tile_sums)
    assert torch.equal(buf[2 * ew + m : 2 * ew + 2 * m].long(), tile_base)
    starts = torch.cat([tile_base[::n_tiles], tile_sums.sum().view(1)])
    assert torch.equal(buf[2 * ew + 2 * m :].long(), starts)
    assert ("routing_scan" in launched()) == (n_tiles > 1)


@pytest.mark.parametrize("tail_blocks", [1, 2, 256])
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7]], ids=case_id)
def test_permute_tail_blocks_stride(emulated, monkeypatch, case, tail_blocks):
    """permute's tail blocks, at most _TAIL_BLOCKS, stride over the spare rows' 32-row chunks (70 spare rows: 3
    chunks, past a partial one): rows, probs, row map and indices equal the CPU path's with spare, exact and short
    row counts, in permute_small (T 37) and permute_scatter; the grid has T + min(_TAIL_BLOCKS, chunks) blocks."""
    x, routing_map, probs = make_case(case)
    monkeypatch.setattr(D, "_TAIL_BLOCKS", tail_blocks)
    routed = int(routing_map.sum())
    for n_out in (routed + 70, routed, max(routed - 9, 0)):
        cuda_emu.launches.clear()
        got = D._permute_cuda(x, routing_map, probs, n_out, False)
        want = _cpu.permute(x, routing_map, probs, n_out, False)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, f"{name} (num_out_tokens={n_out})")
        (grid,) = [g[0] for name, g, *_ in cuda_emu.launches if "permute_" in _launch.base_name(name)]
        assert grid == routing_map.shape[0] + min(tail_blocks, -(-n_out // 32)), grid


def grouped_everywhere(monkeypatch):
    """permute_grouped for every row size and pair count (by default only where it won: 8-16 KiB rows, >= 4 pairs a
    token), so the small test shapes run it."""
    monkeypatch.setattr(D, "_GROUP_MIN_ROW_BYTES", 0)
    monkeypatch.setattr(D, "_GROUP_MIN_PAIRS", 0)


def grouped_instance(num_experts: int) -> str:
    """permute_grouped's instance for E experts: each thread owns one expert up to 256 (the block's threads), four
    above (kernels/permute.cu KE)."""
    return f"moe_raw::permute_grouped<16, {1 if num_experts <= 256 else 4}>"


@pytest.mark.parametrize("num_experts", [256, 257])
def test_permute_grouped_experts_a_thread(emulated, monkeypatch, num_experts):
    """At E = 256 permute_grouped's threads own one expert each (the KE 1 instance), at 257 four (KE 4): both give
    the CPU path's rows, probs, row map and indices, with the scan and without it (row count given)."""
    g = torch.Generator().manual_seed(num_experts)
    T, H, K = 40, 16, 4
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    top = torch.rand(T, num_experts, generator=g).topk(K, dim=1).indices
    routing_map = torch.zeros(T, num_experts, dtype=torch.bool).scatter_(1, top, True)
    routing_map[:, -1] = True  # the last expert, owned by thread 0's fourth slot at 257
    probs = torch.rand(T, num_experts, generator=g)
    grouped_everywhere(monkeypatch)
    for n_out in (None, int(routing_map.sum())):
        cuda_emu.launches.clear()
        got = D._permute_cuda(x, routing_map, probs, n_out, False)
        want = _cpu.permute(x, routing_map, probs, n_out, False)
        for name, gv, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(gv, w, f"{name} (num_out_tokens={n_out})")
        grouped = [name for name, *_ in cuda_emu.launches if _launch.base_name(name) == "permute_grouped"]
        assert grouped == [grouped_instance(num_experts)], grouped


@pytest.mark.parametrize("group", [1, 2, 8, 32])
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7]], ids=case_id)
def test_permute_grouped_group_sizes(emulated, monkeypatch, case, group):
    """permute_grouped with `group` tokens a block (the host sizes it from the row bytes; forced here), so a block's
    tokens start inside a 32-token bit word (group < 32) and the last block can be partial: rows, probs, row map and
    indices equal the CPU path's, for permute (row count known or not, drops, spare rows) and permute_and_pad."""
    x, routing_map, probs = make_case(case)
    row_bytes = x.shape[1] * x.element_size()
    grouped_everywhere(monkeypatch)
    monkeypatch.setattr(D, "_GROUP_BYTES", group * row_bytes)
    routed = int(routing_map.sum())
    for n_out in (None, routed + 5, max(routed - 7, 0)):
        got = D._permute_cuda(x, routing_map, probs, n_out, False)
        want = _cpu.permute(x, routing_map, probs, n_out, False)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, f"{name} (num_out_tokens={n_out})")
    for n_out in (None, routed - 1):
        got = D._permute_and_pad_cuda(x, routing_map, probs, 16, n_out)
        want = reference.permute_and_pad(x, routing_map, probs, 16, n_out)
        for name, g, w in zip(("rows", "probs", "row_map", "tokens_per_expert", "padded"), got, want, strict=True):
            assert_same(g, w, f"permute_and_pad {name} (num_out_tokens={n_out})")
    grids = {grid[0] for name, grid, *_ in cuda_emu.launches if _launch.base_name(name) == "permute_grouped"}
    names = {name for name, *_ in cuda_emu.launches if _launch.base_name(name) == "permute_grouped"}
    assert names == {grouped_instance(routing_map.shape[1])}, names
    T = routing_map.shape[0]
    assert min(grids) >= -(-T // group), grids  # ceil(T / group) token blocks (+ tail blocks)


@pytest.mark.parametrize("tail_blocks", [1, 3, 256])
@pytest.mark.parametrize("case", [CASES[6], CASES[7]], ids=case_id)
def test_permute_grouped_unscanned(emulated, monkeypatch, case, tail_blocks):
    """permute with the row count given and permute_grouped taking the rows: routing_scan is skipped and each block
    counts its experts' starts from routing_pack's tile sums (T 300: two tiles, so the tile bases differ from the expert
    starts; T 40: one tile, whose starts routing_pack writes, so no scan either); the tail blocks, at most _TAIL_BLOCKS,
    stride over the spare rows' 32-row chunks (70 spare rows: 3 chunks). Rows, probs, row map and indices equal the CPU
    path's, with spare rows, exact and short counts."""
    x, routing_map, probs = make_case(case)
    grouped_everywhere(monkeypatch)
    monkeypatch.setattr(D, "_TAIL_BLOCKS", tail_blocks)
    routed = int(routing_map.sum())
    for n_out in (routed + 70, routed, routed - 9):
        cuda_emu.launches.clear()
        got = D._permute_cuda(x, routing_map, probs, n_out, False)
        want = _cpu.permute(x, routing_map, probs, n_out, False)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, f"{name} (num_out_tokens={n_out})")
        assert "permute_grouped" in launched() and "routing_scan" not in launched(), launched()
        (grid,) = [g[0] for name, g, *_ in cuda_emu.launches if _launch.base_name(name) == "permute_grouped"]
        token_blocks = -(-routing_map.shape[0] // D._group(x.shape[1] * x.element_size()))
        assert grid == token_blocks + min(tail_blocks, -(-n_out // 32)), grid


def test_permute_grouped_scanned_past_tiles(emulated, monkeypatch):
    """Past _UNSCANNED_MAX_TILES tiles permute_grouped takes the rows after routing_scan (each block would sum
    E x tiles tile sums otherwise); same results as the CPU path."""
    x, routing_map, probs = make_case(CASES[6])  # T 300: two tiles
    grouped_everywhere(monkeypatch)
    monkeypatch.setattr(D, "_UNSCANNED_MAX_TILES", 1)
    routed = int(routing_map.sum())
    cuda_emu.launches.clear()
    got = D._permute_cuda(x, routing_map, probs, routed, False)
    want = _cpu.permute(x, routing_map, probs, routed, False)
    for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
        assert_same(g, w, name)
    assert "permute_grouped" in launched() and "routing_scan" in launched(), launched()


def test_permute_unscanned_needs_16_byte_rows(emulated, monkeypatch):
    """The scan is skipped only where the output's row layout gives permute_grouped its 16-byte packs: with 8-byte
    ones (an output 8 bytes off a 16-byte boundary, as _row_layout would find it; torch's allocations never are, so
    forced here) routing_scan runs and the per-token kernel takes the rows; the results are the CPU path's."""
    x, routing_map, probs = make_case(CASES[6])  # T 300: two tiles
    grouped_everywhere(monkeypatch)
    row_layout = D._row_layout
    monkeypatch.setattr(D, "_row_layout", lambda tokens, out_ptr: (*row_layout(tokens, out_ptr)[:3], 8))
    n_out = int(routing_map.sum()) + 3
    cuda_emu.launches.clear()
    got = D._permute_cuda(x, routing_map, probs, n_out, False)
    want = _cpu.permute(x, routing_map, probs, n_out, False)
    for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
        assert_same(g, w, name)
    assert [_launch.base_name(name) for name, *_ in cuda_emu.launches] == [
        "routing_pack",
        "routing_scan",
        "permute_scatter",
    ]


@pytest.mark.parametrize("kernel", ["permute_grouped", "permute_scatter"])
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=case_id)
def test_permute_overlapped_launch(emulated, monkeypatch, case, kernel):
    """Where the row kernel stages rows (16-byte rows, a device with programmatic dependent launch), they total
    _OVERLAP_MIN_BYTES and no host read came between (num_out_tokens given), it is launched with overlap after the
    map kernels (its blocks start loading rows before routing_scan ends; kernels/common.cuh pdl_wait), with the CPU
    path's outputs; below the size, or after the read of N, a plain launch. routing_scan, where it runs (permute_scatter
    past one tile), is overlapped with the row kernel up to _SCAN_OVERLAP_MAX_SUMS tile sums, plain above. Both row
    kernels: permute_grouped where it applies (with at most 16 tiles it skips the scan), permute_scatter (forced by a
    zero expert limit)."""
    x, routing_map, probs = make_case(case)
    n = int(routing_map.sum())
    monkeypatch.setattr(D, "_SMALL_MAP", 0)  # the row kernels with tables for a known N too
    if kernel == "permute_scatter":
        monkeypatch.setattr(D, "_GROUP_MAX_EXPERTS", 0)
    else:
        grouped_everywhere(monkeypatch)
    scanned = kernel == "permute_scatter" and x.shape[0] > D._TILE_TOKENS
    tile_sums = routing_map.shape[1] * D.cdiv(x.shape[0], D._TILE_TOKENS)
    sizes = (0, x.numel() * x.element_size() + 1)  # _OVERLAP_MIN_BYTES: overlapped, plain
    for num_out_tokens, min_bytes, max_sums in itertools.product((n, None), sizes, (tile_sums - 1, tile_sums)):
        want = _cpu.permute(x, routing_map, probs, num_out_tokens, False)
        monkeypatch.setattr(D, "_OVERLAP_MIN_BYTES", min_bytes)
        monkeypatch.setattr(D, "_SCAN_OVERLAP_MAX_SUMS", max_sums)
        cuda_emu.overlapped.clear()
        got = D._permute_cuda(x, routing_map, probs, num_out_tokens, False)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, name)
        overlapped = min_bytes == 0 and num_out_tokens is not None
        scan = ["moe_raw::routing_scan<1024>"] if overlapped and scanned and tile_sums <= max_sums else []
        name = f"moe_raw::{kernel}<16>" if kernel == "permute_scatter" else grouped_instance(routing_map.shape[1])
        want_launch = scan + [name] if overlapped else []
        assert cuda_emu.overlapped == want_launch, (num_out_tokens, min_bytes, max_sums, cuda_emu.overlapped)


@pytest.mark.parametrize("case", CASES[1:6] + CASES[7:], ids=case_id)
def test_permute_strided_rows_and_int_map(emulated, case):
    x, routing_map, probs = make_case(case, strided=True)
    for map_dtype in (torch.int8, torch.int32, torch.int64):
        m = routing_map.to(map_dtype)
        got = D._permute_cuda(x, m, probs.t().contiguous().t(), int(m.sum()), False)
        want = _cpu.permute(x, routing_map, probs, int(m.sum()), False)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, f"{name} ({map_dtype})")


def permuted(x, routing_map, probs, n_rows):
    rows, _, row_map, indices = _cpu.permute(x, routing_map, probs, n_rows, False)
    return rows, row_map, indices


@pytest.mark.parametrize("kernels", KINDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unpermute_gather(emulated, kernels, case):
    emulated(kernels)
    x, routing_map, probs = make_case(case)
    T = x.shape[0]
    rows, row_map, indices = permuted(x, routing_map, probs, int(routing_map.sum()) + 2)
    rows = torch.randn(rows.shape).to(x.dtype)  # the experts' outputs
    g_pprobs = torch.randn(rows.shape[0])
    for p, g in ((None, None), (probs, None), (probs, g_pprobs), (None, g_pprobs)):
        got = D._gather_cuda(rows, row_map, T, probs=p, g_pprobs=g, dprobs_dtype=torch.float32)
        want = _cpu.gather(rows, row_map, T, probs=p, g_pprobs=g, dprobs_dtype=torch.float32)
        assert_same(got[0], want[0], f"out (probs {p is not None}, g_pprobs {g is not None})")
        assert_same(got[1], want[1], f"dprobs (probs {p is not None}, g_pprobs {g is not None})")
    got = D._gather_cuda(None, row_map, T, g_pprobs=g_pprobs, dprobs_dtype=torch.float32)
    assert_same(got[1], _cpu.gather(None, row_map, T, g_pprobs=g_pprobs, dprobs_dtype=torch.float32)[1], "dprobs only")
    E = routing_map.shape[1]
    assert ("gather_warp" in launched()) == (kernels == "warp" and E < 3000), launched()


@pytest.mark.parametrize("kernels", KINDS)
def test_unpermute_csr(emulated, kernels):
    emulated(kernels)
    x, routing_map, probs = make_case(CASES[2])
    rows, row_map, indices = permuted(x, routing_map, probs, None)
    T = x.shape[0]
    order, perm = torch.sort(indices, stable=True)
    csr = (torch.searchsorted(order, torch.arange(T + 1)), perm)
    got = D._gather_cuda(rows, None, T, csr=csr)[0]
    assert_same(got, _cpu.gather_csr(rows, indices, T), "out")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unpermute_backward(emulated, case):
    x, routing_map, probs = make_case(case)
    T, H = x.shape
    n_rows = int(routing_map.sum()) + 3
    rows, row_map, _ = permuted(x, routing_map, probs, n_rows)
    rows = torch.randn(rows.shape).to(x.dtype)  # the experts' outputs: a token's rows differ, so do their dots
    grad = torch.randn(T, H).to(x.dtype)
    for p, need_dprobs in ((None, False), (probs, False), (probs, True)):
        got = D._unpermute_bwd_cuda(grad, rows, row_map, n_rows, p, need_dprobs)
        want = _cpu.unpermute_bwd(grad, rows, row_map, n_rows, p, need_dprobs)
        assert_same(got[0], want[0], f"d_rows (probs {p is not None})")
        if need_dprobs:  # dot products: the kernels' reduction trees, not the twin's order
            tol = 1e-12 if x.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)
    assert "unpermute_bwd" in launched(), launched()
    wide = H * x.element_size() % 16 == 0
    lone = any(name.endswith(", true>") for name, *_ in cuda_emu.launches)  # kernels/permute.cu LONE
    assert lone == (wide and n_rows < 2 * T), cuda_emu.launches
    quad = any(name.endswith(", false, 4>") for name, *_ in cuda_emu.launches)  # kernels/permute.cu QUAD
    assert quad == (wide and n_rows >= 4 * T and x.element_size() == 2), cuda_emu.launches


# unpermute_bwd's LONE instance takes a token's lone row two packs a step (the launcher picks it where N < 2 T: K 1,
# mostly one-row groups), its QUAD instance four rows a step (where N >= 4 T, bf16 / fp16). Forced here at K 2
# (pairs only; QUAD: one step of two rows), 3 (a pair, then a lone row; QUAD: one step of three) and 9 (a group of 8,
# then a lone row; QUAD: two full steps, then one of one), with an odd pack count at H 2056 bf16 (257 packs: one step
# of two and a tail a block) and H 520 fp16 (65), each must give the two-rows-a-step instance's bits.
@pytest.mark.parametrize("case,instance", [
    ((7, 16, 2056, 9, torch.bfloat16, "topk"), "true"), ((9, 6, 1032, 3, torch.float32, "topk"), "true"),
    ((5, 4, 520, 2, torch.float16, "topk"), "true"), ((7, 16, 2056, 9, torch.bfloat16, "topk"), "false, 4"),
    ((9, 6, 1032, 3, torch.bfloat16, "topk"), "false, 4"), ((5, 4, 520, 2, torch.float16, "topk"), "false, 4"),
], ids=lambda v: case_id(v) if isinstance(v, tuple) else ("QUAD" if "4" in v else "LONE"))  # fmt: skip
def test_unpermute_backward_instances_forced(emulated, monkeypatch, case, instance):
    x, routing_map, probs = make_case(case)
    T, H = x.shape
    n_rows = int(routing_map.sum()) + 3
    rows, row_map, _ = permuted(x, routing_map, probs, n_rows)
    rows = torch.randn(rows.shape).to(x.dtype)
    grad = torch.randn(T, H).to(x.dtype)
    name = f"moe_raw::unpermute_bwd<{D.CTYPES[x.dtype]}, 16, {instance}>"
    assert name in _launch.KERNELS["permute"]
    plain_name = f"moe_raw::unpermute_bwd<{D.CTYPES[x.dtype]}, 16>"
    monkeypatch.setattr(D, "_unpermute_bwd_name", lambda ctype, vb, n, t: plain_name)
    plain = D._unpermute_bwd_cuda(grad, rows, row_map, n_rows, probs, True)
    monkeypatch.setattr(D, "_unpermute_bwd_name", lambda ctype, vb, n, t: name)
    cuda_emu.launches.clear()
    forced = D._unpermute_bwd_cuda(grad, rows, row_map, n_rows, probs, True)
    assert [launch for launch, *_ in cuda_emu.launches if "unpermute_bwd" in launch] == [name]
    assert_same(forced[0], plain[0], "d_rows")
    assert_same(forced[1], plain[1], "dprobs")  # the same terms in the same order
    assert_same(forced[0], _cpu.unpermute_bwd(grad, rows, row_map, n_rows, probs, True)[0], "d_rows against the twin")


# align 300: more padding rows an expert than scatter_rows' and unpermute_bwd's 4 padding blocks take at once
@pytest.mark.parametrize("align", (1, 8, 128, 300))
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6], CASES[7]], ids=case_id)
def test_permute_and_pad(emulated, align, case):
    x, routing_map, probs = make_case(case)
    routed = int(routing_map.sum())
    for n_out in (None, routed, routed - 1):
        got = D._permute_and_pad_cuda(x, routing_map, probs, align, n_out)
        want = reference.permute_and_pad(x, routing_map, probs, align, n_out)
        for name, g, w in zip(("rows", "probs", "row_map", "tokens_per_expert", "padded"), got, want, strict=True):
            assert_same(g, w, f"{name} (num_out_tokens={n_out})")
        T = x.shape[0]
        rows_back = D._scatter_rows_cuda(x, got[2], T, got[0].shape[0])
        assert_same(rows_back, reference.permute_with_row_map(x, got[2], got[0].shape[0]), "permute_with_row_map")
        g = torch.randn(T, x.shape[1]).to(x.dtype)
        d_rows = D._unpermute_bwd_cuda(g, None, got[2], got[0].shape[0], None, False)[0]
        assert_same(d_rows, _cpu.unpermute_bwd(g, None, got[2], got[0].shape[0], None, False)[0], "padded d_rows")


@pytest.mark.parametrize("gather", (False, True))
@pytest.mark.parametrize("H,dtype", [(64, torch.bfloat16), (7, torch.float32), (5, torch.float16)])
def test_chunk_sort(emulated, gather, H, dtype):
    sizes = torch.tensor([3, 0, 5, 1, 7, 0, 2, 4])
    order = torch.tensor([4, 2, 7, 0, 1, 6, 3, 5])
    x = torch.randn(int(sizes.sum()), H).to(dtype)
    probs = torch.rand(x.shape[0])
    got = D._chunk_sort_cuda(x, probs, sizes, order, gather)
    want = D._chunk_sort(x, probs, sizes, order, gather)
    assert_same(got[0], want[0], "rows")
    assert_same(got[1], want[1], "probs")


# FP8: (H, dtype, recipe): rows of whole 16-byte packs (quantize_warp) and not (quantize_rows only); blockwise with
# a partial last block; mxfp8 only where H % 32 == 0 (the op refuses other H before any kernel). H 2080 bf16 (260
# packs) and 1048 fp32 (262) give a lane of quantize_warp several packs, its loops several rounds and a partial last.
QUANT_CASES = [
    pytest.param(H, dtype, recipe, id=f"H{H}-{str(dtype)[6:]}-{recipe}")
    for H, dtype in (
        (256, torch.bfloat16),
        (96, torch.float32),
        (160, torch.float16),
        (200, torch.bfloat16),
        (2080, torch.bfloat16),
        (1048, torch.float32),
    )
    for recipe in ("rowwise", "blockwise", "mxfp8")
    if recipe != "mxfp8" or H % 32 == 0
]


@pytest.mark.parametrize("kernels", KINDS)
@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2), ids=("e4m3", "e5m2"))
@pytest.mark.parametrize("H,dtype,recipe", QUANT_CASES)
def test_quantize_rows(emulated, kernels, fp8, H, dtype, recipe):
    emulated(kernels)
    T, E, K = 23, 12, 3
    routing_map = make_routing(T, E, K, kind="sparse")
    x = torch.randn(T, H).to(dtype) * torch.logspace(-3, 3, T).unsqueeze(1).to(dtype)
    x[3, :40] = 0  # an all-zero block: scale 1
    x[5, 7] = 1e30 if dtype != torch.float16 else 6e4  # saturation
    groups = (RF.scale_shape(1, H, recipe)[1:] or (1,))[0]
    for align in (None, 128):  # 128: more padding rows an expert than quantize_fill has blocks for it
        n_rows = int(routing_map.sum()) + 4
        if align:
            rows, _, row_map, _, _ = reference.permute_and_pad(x, routing_map, None, align, n_rows)
        else:
            rows, _, row_map, _ = _cpu.permute(x, routing_map, None, n_rows, False)
        codes, scales = QK.quantize_rows(x, row_map, rows.shape[0], recipe, fp8, RF.FP8_MAX[fp8], RF.EMAX_ELEM[fp8],
                                         groups, align is not None)  # fmt: skip
        want_q, want_s = RF.quantize(rows, recipe, fp8)
        assert_same(codes, want_q.view(torch.uint8), f"codes (align {align})")
        assert_same(scales, want_s, f"scales (align {align})")
    warp = kernels == "warp" and H * dtype.itemsize % 16 == 0
    assert ("quantize_warp" in launched()) == warp and ("quantize_rows" in launched()) == (not warp), launched()


@pytest.mark.parametrize("H,dtype,recipe", QUANT_CASES)
def test_quantize_grad_rows(emulated, H, dtype, recipe):
    T, E, K = 19, 6, 2
    fp8 = torch.float8_e4m3fn
    routing_map = make_routing(T, E, K, kind="sparse")
    probs = make_probs(routing_map)
    grad = torch.randn(T, H).to(dtype)
    n_rows = int(routing_map.sum()) + 2
    _, _, row_map, _ = _cpu.permute(grad, routing_map, probs, n_rows, False)
    groups = (RF.scale_shape(1, H, recipe)[1:] or (1,))[0]
    for p in (None, probs):
        codes, scales = QK.quantize_grad_rows(grad, row_map, n_rows, p, recipe, fp8, RF.FP8_MAX[fp8],
                                              RF.EMAX_ELEM[fp8], groups, False)  # fmt: skip
        d_rows = _cpu.unpermute_bwd(grad, None, row_map, n_rows, p, False)[0]
        want_q, want_s = RF.quantize(d_rows, recipe, fp8)
        assert_same(codes, want_q.view(torch.uint8), f"codes (probs {p is not None})")
        assert_same(scales, want_s, f"scales (probs {p is not None})")


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("probs_dtype", (None, torch.float32, torch.bfloat16, torch.float64))
def test_topk_to_dense(emulated, index_dtype, probs_dtype):
    T, E, K = 45, 37, 4
    idx = torch.rand(T, E).topk(K, 1).indices.to(index_dtype)
    idx[3, 2] = idx[3, 0]  # a repeated index: counted once, its first prob kept
    p = torch.rand(T, K).to(probs_dtype) if probs_dtype else None
    routing_map, probs = D._dense_cuda(idx, E, p)
    want_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert_same(routing_map.contiguous(), want_map, "routing_map")
    if p is not None:
        first = D._first_of_each_expert(idx)
        want = torch.zeros(T, E, dtype=p.dtype)
        want[torch.arange(T).unsqueeze(1).expand(T, K)[first], idx.long()[first]] = p[first]
        assert_same(probs, want, "probs")


# Router: (E, K, score function, pre-softmax, groups, group_topk, scaling, bias): every kernel shape of
# ROUTER_SHAPES from E 8 (one lane a token) to 1000 (32 lanes of 32 experts).
ROUTERS = [
    (8, 2, "softmax", False, None, None, None, False),
    (16, 4, "softmax", True, None, None, 2.5, False),
    (64, 6, "sigmoid", False, 8, 2, 2.5, True),
    (128, 8, "sqrtsoftplus", False, None, None, None, True),
    (256, 8, "sigmoid", False, 8, 4, 2.5, True),
    (1000, 5, "softmax", False, None, None, None, False),
]


@pytest.mark.parametrize("dense_output", (False, True), ids=("map", "topk-form"))
@pytest.mark.parametrize("cfg", ROUTERS, ids=lambda c: f"E{c[0]}-K{c[1]}-{c[2]}{'-pre' if c[3] else ''}"
                         f"{'-groups' if c[4] else ''}{'-bias' if c[7] else ''}")  # fmt: skip
def test_router(emulated, monkeypatch, cfg, dense_output):
    """moe_raw.topk_routing_with_score_function through its kernel path (forward and the autograd backward) on the
    emulator, against the transcription of Megatron: the same picks, probs and logits gradient within fp32
    rounding (the kernel's exp / log are the host's here, the order of its sums its own)."""
    import moe_raw
    from moe_raw import router

    monkeypatch.setattr(router, "_use_kernel", lambda *args: True)
    E, K, score, pre, groups, group_topk, scaling, with_bias = cfg
    bias = torch.randn(E) * 0.1 if with_bias else None
    kw = dict(use_pre_softmax=pre, num_groups=groups, group_topk=group_topk, scaling_factor=scaling,
              score_function=score, expert_bias=bias, dense_output=dense_output)  # fmt: skip
    logits = torch.randn(13, E)
    results = []
    for fn in (moe_raw.topk_routing_with_score_function, reference.topk_routing_with_score_function):
        x = logits.clone().requires_grad_()
        extra = {} if fn is moe_raw.topk_routing_with_score_function else {"select": reference.stable_topk}
        probs, second = fn(x, K, **kw, **extra)
        w = torch.linspace(-1, 2, probs.numel()).view(probs.shape)
        (grad,) = torch.autograd.grad((probs * w).sum(), x)
        results.append((probs.detach(), second, grad))
    (probs, second, grad), (want_probs, want_second, want_grad) = results
    assert {"router_fwd", "router_bwd"} <= launched(), launched()
    assert torch.equal(second, want_second), "picks"
    torch.testing.assert_close(probs, want_probs, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.float8_e4m3fn)


@st.composite
def dispatch_cases(draw):
    """A permute / unpermute problem: shapes around the kernels' boundaries (a warp's 32 experts, 4 tokens a block,
    16-byte packs, tail blocks of 32 rows, 256-token tiles, the 4096-entry small-map limit), any map and row
    dtype, strided rows."""
    T = draw(st.integers(1, 300))
    E = draw(st.sampled_from((1, 2, 7, 31, 32, 33, 64, 65, 130, 600)))
    K = draw(st.integers(0, min(E, 9)))
    H = draw(st.integers(1, 70))
    kind = draw(st.sampled_from(("topk", "sparse", "balanced")))
    routing_map = make_routing(T, E, K, kind=kind).to(draw(st.sampled_from((torch.bool, torch.uint8, torch.int64))))
    routed = int(routing_map.bool().sum())
    n_out = draw(st.sampled_from((None, routed, max(routed - 1, 0), routed + 7, 0)))
    drop_and_pad = n_out is not None and draw(st.booleans())
    return dict(
        T=T, E=E, H=H, routing_map=routing_map, n_out=n_out, drop_and_pad=drop_and_pad,
        dtype=draw(st.sampled_from(TOKEN_DTYPES)), strided=draw(st.booleans()),
        kernels=draw(st.sampled_from(KINDS)), align=draw(st.sampled_from((1, 4, 16))),
    )  # fmt: skip


@hypothesis.settings(deadline=None, max_examples=200, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(case=dispatch_cases())
def test_fuzz_dispatch(case):
    """Drawn problems through permute, unpermute (forward and backward) and permute_and_pad on the emulator, against
    the CPU twins, bit for bit (the probs gradient's dot products within rounding)."""
    T, H, dtype = case["T"], case["H"], case["dtype"]
    routing_map = case["routing_map"]
    probs = make_probs(routing_map.bool(), off_route=float("nan"))
    x = (torch.randn(T, H + 2) * 8).to(dtype)
    x = x[:, 1 : H + 1] if case["strided"] else x[:, :H].contiguous()
    n_out, drop_and_pad = case["n_out"], case["drop_and_pad"]
    with cuda_emu.emulated("shuffled"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "_GATHER_KERNEL", case["kernels"])
        got = D._permute_cuda(x, routing_map, probs, n_out, drop_and_pad)
        want = _cpu.permute(x, routing_map, probs, n_out, drop_and_pad)
        for name, g, w in zip(("rows", "probs", "row_map", "indices"), got, want, strict=True):
            assert_same(g, w, name)
        if dtype.itemsize == 1:  # byte rows: permute only (a move); the sums need a float dtype
            return
        rows, row_map = torch.randn(got[0].shape).to(dtype), want[2]
        g_pprobs = torch.randn(rows.shape[0])
        out = D._gather_cuda(rows, row_map, T, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=probs.dtype)
        ref = _cpu.gather(rows, row_map, T, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=probs.dtype)
        assert_same(out[0], ref[0], "unpermute out")
        assert_same(out[1], ref[1], "dprobs of permute")
        grad = torch.randn(T, H).to(dtype)
        d_rows, dprobs = D._unpermute_bwd_cuda(grad, rows, row_map, rows.shape[0], probs, True)
        ref = _cpu.unpermute_bwd(grad, rows, row_map, rows.shape[0], probs, True)
        assert_same(d_rows, ref[0], "unpermute d_rows")
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(dprobs, ref[1], rtol=tol, atol=tol, equal_nan=True)
        if not drop_and_pad:
            padded = D._permute_and_pad_cuda(x, routing_map, probs, case["align"], n_out)
            ref = reference.permute_and_pad(x, routing_map, probs, case["align"], n_out)
            for name, g, w in zip(("rows", "probs", "row_map", "tpe", "padded"), padded, ref, strict=True):
                assert_same(g, w, f"permute_and_pad {name}")
