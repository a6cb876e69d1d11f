"""Launchers of the CUDA C kernels (kernels/permute.cu, chunks.cu, topk.cu) and, for tensors on other devices, their
torch twins (``moe_raw._cpu``): the one place each forward and backward formula of the dispatch ops lives.

Every function here takes validated tensors, allocates its outputs and launches (or runs the twin); none validates
its arguments or builds autograd nodes. The autograd Functions of ``permutation`` / ``padding`` / ``chunks`` /
``topk`` and the custom ops of ``moe_raw._ops`` call the same functions, so CPU, CUDA, eager and torch.compile share
one formula per op. Constants mirrored from the .cu files are checked against them by tests/test_kernel_constants.py.

Layering: ``moe_raw._launch`` (compile, stream, launch) and ``moe_raw._cpu`` below; the op modules and ``_ops`` above.
"""

from __future__ import annotations

import math

import torch

from moe_raw import _cpu, _env, _launch, reference
from moe_raw import _validate as V
from moe_raw._launch import _SHARED_NO_OPT_IN, CTYPES, QUAD_CTYPES, SCALAR_CODE, cdiv, launch, ptr, row_view

_TILE_TOKENS = 256  # kernels/permute.cu kTileTokens
# permute_small (no routing tables: each block counts the whole map) serves maps of at most this many entries when
# the row count is given: one launch instead of two, for the small calls where launches are the cost.
_SMALL_MAP = 4096
_ROW_THREADS = 128  # kRowThreads
_TAIL_ROWS = 32  # kTailRows
_TAIL_BLOCKS = 256  # permute's tail blocks at most without the aligned layout (one a 32-row chunk before)
# Blocks per expert zeroing its padding rows in the aligned layout where align is unknown (a row map carries each
# expert's padding range, not align): 4 cover 128 rows at once, and more are strided.
_PAD_BLOCKS = 4
_STAGE_BYTES = 16384  # kStageBytes
# permute_grouped (kernels/permute.cu) takes `group` consecutive tokens a block, their rows staged whole, where the
# bulk-copy path runs (sm_90, 16-byte rows of at most _STAGE_BYTES), E <= _GROUP_MAX_EXPERTS and drop_and_pad is
# off, and where it won in two same-run A/Bs against permute_scatter (H100, bench/results/2026-12-06-h100-main and
# -h100-grouped): rows of at least _GROUP_MIN_ROW_BYTES and at least _GROUP_MIN_PAIRS rows a token (DeepSeek-V3,
# 14 KiB rows at K 8: 4.4-4.8% faster; T16k-E128, 8 KiB at K 6: 1-1.2%). On every shape it lost 2.4-3.5% with 4 KiB
# rows at K 8 (Qwen3-30B-A3B) and 0-4% at K 1-2 (T16k-E4-K1, Mixtral).
# group: the largest power of two <= 32 whose rows fit _GROUP_BYTES. bench.probe_permute --phased (H100,
# 2026-12-05) moved the rows fastest with large batches at K 6-8 (115 KiB: 97% of copy at DeepSeek-V3).
_GROUP_MIN_ROW_BYTES = 8192
_GROUP_MIN_PAIRS = 4
_GROUP_THREADS = 256  # kGroupThreads
_GROUP_EXPERTS = 4  # kGroupExperts: experts a thread owns
_GROUP_MAX_EXPERTS = _GROUP_THREADS * _GROUP_EXPERTS
_GROUP_BYTES = 112 * 1024
_GROUP_BYTES_MAX = 227 * 1024  # the dynamic shared memory a block may have on sm_90
# permute_grouped counts its experts' starts itself (no routing_scan) only up to this many 256-token tiles: each block
# then reads E x tiles tile sums (H100 A/Bs, bench/results/2026-12-06-h100-fourteenth: DeepSeek-V3's 16 tiles 1.0-1.7%
# faster in three rounds, T16k-E128-K6's 64 tiles 5% slower ungated: there the blocks' sums read 4.4% of the bytes the
# rows move, 1.6% at DeepSeek-V3).
_UNSCANNED_MAX_TILES = 16
# permute_scatter is launched with overlap (a programmatic dependent launch: its blocks load their token rows while
# the map kernels before it finish) where it stages rows (sm_90, 16-byte rows) and the rows total at least this
# many bytes; below it the plain launch's lower host cost matters more than a few microseconds of GPU time.
_OVERLAP_MIN_BYTES = 1 << 22
# routing_scan is launched with overlap after routing_pack (where the row kernel after it is) up to this many tile
# sums: one a thread of its block, one load and a block scan, so its launch was a large part of the map build. On an
# H100 overlapping it lost 0.3% at 8192 tile sums (Qwen3-30B-A3B, T16k-E128-K6) and won 0.7-0.9% at 256-512
# (T16k-E4-K1, Mixtral: bench/results/2026-12-06-h100-scan-overlap).
_SCAN_OVERLAP_MAX_SUMS = 1024
# Bytes past the row lists of gather_reduce / unpermute_bwd: nvcc loads the lists up to 4 entries ahead of the loop
# bound (two float weights as one 8-byte load, past a 1-expert list: compute-sanitizer memcheck on an H100), so the
# allocation covers 4 more fp64 entries.
_SMEM_SLACK = 32
# compute-sanitizer initcheck does not see writes made by the bulk-copy engine (permute_scatter's sm_90 path for
# 16-byte rows) and reports every row written that way as uninitialized when it is read; MOE_RAW_NO_BULK_COPY=1
# (moe_raw/_env.py) writes those rows with plain 8-byte stores instead.
_BULK_COPY = not _env.NO_BULK_COPY


MAX_SPLITS = 4096  # kernels/chunks.cu: two int32 tables of S entries in shared memory
_CHUNK_ROWS = 8  # kChunkRows
_CHUNK_THREADS = 256  # kChunkThreads
_WORDS = {2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
_TOKENS_PER_BLOCK = 8  # kernels/topk.cu kTokensPerBlock


# The two row-map layouts (moe_raw.reference documents both): permute's [T + 1, E] and permute_and_pad's aligned
# [T + 3, E], whose two extra lines give each expert's padding rows. The row map is the user's tensor (it travels to
# unpermute(fused=True) and permute_with_row_map), so its height is the layout's tag: read here, nowhere else.
def _aligned_layout(row_map: torch.Tensor, num_tokens: int) -> bool:
    return row_map.shape[0] == num_tokens + 3


def _pad_blocks(num_experts: int, align: int | None = None) -> int:
    """The blocks after the spare-row blocks that zero the experts' padding rows (kernels/permute.cu
    zero_unowned_rows, which reads their count per expert from the grid): one per 32 rows of the most padding an
    expert can have (align - 1 rows), or _PAD_BLOCKS each. A block per expert left a whole expert's padding to one
    block at the grid's end."""
    return num_experts * (max(1, cdiv(align - 1, _TAIL_ROWS)) if align else _PAD_BLOCKS)


def _scatter_vec_bytes(vb: int) -> int:
    """permute_scatter's vector width: 16 takes the bulk-copy path on sm_90, unless MOE_RAW_NO_BULK_COPY=1."""
    return vb if vb != 16 or _BULK_COPY else 8


def _group(row_bytes: int) -> int:
    """permute_grouped's tokens a block: a power of two <= 32 (a divisor of the tables' 32-token bit words)."""
    target = min(_GROUP_BYTES, _GROUP_BYTES_MAX)
    group = 1
    while group < 32 and 2 * group * row_bytes <= target:
        group *= 2
    return group


def _vec_bytes(elem: int, *byte_quantities: int) -> int:
    """Widest vector (16, 8, 4, 2 or 1 bytes, at least one element) dividing every row size, stride and address."""
    q = 0
    for b in byte_quantities:
        q |= b  # a power of two divides every quantity iff it divides their bitwise OR
    vb = 16
    while vb > elem and q % vb:
        vb >>= 1
    return vb


def _scalar_args(p: torch.Tensor | None):
    """(address, dtype code, stride 0, stride 1) of a [T, E] scalar tensor, or nulls."""
    if p is None:
        return (0, 0, 0, 0)
    st, se = p.stride()
    return (p.data_ptr(), SCALAR_CODE[p.dtype], st, se)


def _workspace_ints(num_tokens: int, num_experts: int) -> int:
    """int32 words of kernels/permute.cu's routing workspace."""
    n_words, n_tiles = cdiv(num_tokens, 32), cdiv(num_tokens, _TILE_TOKENS)
    return 2 * num_experts * (n_words + n_tiles) + num_experts + 1


def _tables(routing_map: torch.Tensor, ws: int, scan: bool = True, overlap: bool = False) -> None:
    """Launch routing_pack (+ routing_scan) filling the int32 workspace at device address ``ws``. No host sync.
    scan=False leaves tile_base / expert_start unwritten where T spans more than one tile (one tile: routing_pack
    writes them): only for permute_grouped's scanned=0 launch, which counts them from the tile sums itself.
    overlap: routing_scan as a programmatic dependent launch after routing_pack (kernels/permute.cu "Overlap")."""
    num_tokens, num_experts = routing_map.shape
    n_tiles = cdiv(num_tokens, _TILE_TOKENS)
    # One block does everything for T <= 256 (one launch); otherwise tiles x 32-expert groups, then the scan.
    grid = (1, 1) if n_tiles == 1 else (n_tiles, cdiv(num_experts, 32))
    dev = routing_map.device
    launch(
        "permute", "moe_raw::routing_pack<256>", dev, grid, _TILE_TOKENS,
        (routing_map.data_ptr(), routing_map.element_size(), routing_map.stride(0), routing_map.stride(1),
         num_tokens, num_experts, ws),
    )  # fmt: skip
    if n_tiles > 1 and scan:
        launch("permute", "moe_raw::routing_scan<1024>", dev, 1, 1024, (ws, num_tokens, num_experts), overlap=overlap)


def _map_and_workspace(routing_map: torch.Tensor, lines: int = 1):
    """One int32 allocation: the row map [T + lines, E] (returned as a view: lines 1 for permute's layout, 3 for
    the aligned one) and, after it, the routing workspace
    (returned as its device address, plus the tensor holding it). One allocation and one view per call: on the
    small-call path each costs microseconds."""
    num_tokens, num_experts = routing_map.shape
    extra_rows = cdiv(_workspace_ints(num_tokens, num_experts), num_experts)
    buf = torch.empty((num_tokens + lines + extra_rows, num_experts), dtype=torch.int32, device=routing_map.device)
    ws = buf.data_ptr() + 4 * (num_tokens + lines) * num_experts
    return buf[: num_tokens + lines], ws, buf


# The gather (unpermute forward, permute backward): "block" (gather_reduce, a block a token) or "warp" (gather_warp,
# a warp a token, no block barrier). On an H100, same run, gather_reduce was 1.4-2.6% faster at every bench shape
# (bench/results/2026-12-06-h100-ncu-gather: DeepSeek-V3's 4096 tokens fill under one wave of warps, 47% achieved
# occupancy under ncu); on the H200 gather_warp had been faster, but against a gather_reduce at 44 registers (10
# blocks a SM, since fixed; bench/results/2026-12-05-h200-candidate). A warp a token lost there for permute and
# unpermute's backward, so those have only the block kernels. MOE_RAW_BLOCK_KERNELS=0 and tests choose the warp one.
_GATHER_KERNEL = "warp" if _env.BLOCK_KERNELS is False else "block"
_WARPS = _ROW_THREADS // 32  # tokens a block of gather_warp


def _on_warps(list_bytes: int) -> bool:
    """Whether the gather runs a warp a token: each warp keeps its own row list (list_bytes of shared memory), so
    the block needs _WARPS lists; gather_warp runs only where those fit the shared memory every block gets without
    opting in (up to E of about 1000-3000), gather_reduce (one list a block) otherwise."""
    return _GATHER_KERNEL == "warp" and _WARPS * list_bytes + _SMEM_SLACK <= _SHARED_NO_OPT_IN


_SCATTER_NAMES = {(way, vb): f"moe_raw::permute_{way}<{vb}>" for way in ("scatter", "small") for vb in (16, 8, 4, 2, 1)}
# permute_grouped's instance by KE, the experts a thread owns (kernels/permute.cu): 1 where E <= the block's threads
# (40 registers on sm_90), else _GROUP_EXPERTS (60)
_GROUPED_NAMES = {ke: f"moe_raw::permute_grouped<16, {ke}>" for ke in (1, _GROUP_EXPERTS)}


def _row_layout(tokens: torch.Tensor, out_ptr: int) -> tuple:
    """(row bytes, row stride in bytes, address, vector width) of the token rows permute's row kernel reads, for an
    output at out_ptr."""
    src = row_view(tokens)
    esize = src.element_size()
    row_bytes, src_stride, src_ptr = src.shape[1] * esize, src.stride()[0] * esize, src.data_ptr()
    return row_bytes, src_stride, src_ptr, _scatter_vec_bytes(_vec_bytes(1, row_bytes, src_stride, src_ptr, out_ptr))


def _rows_overlapped(layout, num_tokens: int) -> bool:
    """Whether the row kernel, where the map kernels may still run, is launched with overlap after them: it stages
    16-byte rows (``layout``: _row_layout's (row bytes, stride, address, vector bytes)) totalling at least
    _OVERLAP_MIN_BYTES. The caller checks the bulk-copy path (sm_90)."""
    return layout[3] == 16 and num_tokens * layout[0] >= _OVERLAP_MIN_BYTES


def _grouped(row_bytes: int, num_tokens: int, num_experts: int, n_rows: int, capacity) -> bool:
    """Whether permute_grouped takes the rows where the bulk-copy path runs (sm_90, 16-byte rows, the tables): rows
    of _GROUP_MIN_ROW_BYTES to _STAGE_BYTES, at least _GROUP_MIN_PAIRS rows a token, no drop_and_pad, E <=
    _GROUP_MAX_EXPERTS."""
    return (
        _GROUP_MIN_ROW_BYTES <= row_bytes <= _STAGE_BYTES and n_rows >= _GROUP_MIN_PAIRS * num_tokens
        and capacity is None and num_experts <= _GROUP_MAX_EXPERTS
    )  # fmt: skip


def _scatter(
    tokens, out, routing_map, ws, row_map, indices, probs, pprobs, n_rows, extra_blocks, n_keep, capacity, pads,
    map_pending, scanned=True, layout=None,
):  # fmt: skip
    """Launch the row kernel (kernels/permute.cu): the token rows, then ``extra_blocks`` blocks that zero spare and
    padding rows (without ``pads`` at most _TAIL_BLOCKS of them, striding over the spare rows). With ``ws`` (the
    routing tables' address) permute_scatter; ``ws`` 0 (no tables: a map of at most _SMALL_MAP entries)
    permute_small. ``tokens`` None writes only the row map / indices / probs (no rows).
    ``capacity``: rows per expert of drop_and_pad, None otherwise; ``pads``: the aligned layout's padding ranges
    (row map line T + 1). ``map_pending``: no host read since the map kernels were queued, so they may still run
    and the row kernel's overlapped launch has something to hide; after a read (N unknown) they have finished, and
    the plain launch's lower host cost is exposed instead (H100 A/B: unknown N 0.5-1.3% slower overlapped).
    ``scanned`` False: _tables ran without routing_scan because the caller chose permute_grouped from ``layout``
    (its _row_layout of tokens for this out, not computed again), which counts its part of the scan itself."""
    num_tokens, num_experts = routing_map.shape
    way = "scatter" if ws else "small"
    src_ptr = src_stride = row_bytes = stage = 0
    vb = 16
    if tokens is not None:
        if layout is None:
            layout = _row_layout(tokens, out.data_ptr())
        row_bytes, src_stride, src_ptr, vb = layout
        if vb == 16:  # the kernel's 128-aligned stage of up to 16 KiB of the row (bulk copies)
            stage = 128 + min(row_bytes, _STAGE_BYTES)
    # permute_small's counts in front, the row list and scratch, then the stage
    counts = 0 if ws else 4 * ((3 * num_experts + 2) & ~1)
    if pads is None:  # the tail blocks stride over the spare rows' 32-row chunks (kernels/permute.cu zero_unowned_rows)
        extra_blocks = min(extra_blocks, _TAIL_BLOCKS)
    blocks, shared = num_tokens + extra_blocks, counts + 8 * num_experts + stage
    map_st, map_se = routing_map.stride()
    args = (src_ptr, src_stride, ptr(out), row_bytes, num_tokens, num_experts, n_rows, int(capacity is not None),
            capacity or 0, routing_map.data_ptr(), routing_map.element_size(), map_st, map_se, ws, row_map.data_ptr(),
            ptr(indices), *_scalar_args(probs), ptr(pprobs), n_keep, ptr(pads))  # fmt: skip
    device = routing_map.device
    staged = bool(ws and stage) and _launch.has_bulk_copy(device)
    overlap = map_pending and staged and _rows_overlapped(layout, num_tokens)
    if staged and (not scanned or _grouped(row_bytes, num_tokens, num_experts, n_rows, capacity)):
        group = _group(row_bytes)
        name = _GROUPED_NAMES[1 if num_experts <= _GROUP_THREADS else _GROUP_EXPERTS]
        launch("permute", name, device, cdiv(num_tokens, group) + extra_blocks,
               _GROUP_THREADS, (*args, group, int(scanned)), shared_mem=group * row_bytes, overlap=overlap)  # fmt: skip
        return
    launch("permute", _SCATTER_NAMES[way, vb], device, blocks, _ROW_THREADS, args, shared_mem=shared, overlap=overlap)


def _permute_cuda(tokens, routing_map, probs, num_out_tokens, drop_and_pad, want_rows=True, want_indices=True):
    """(permuted [N, H] | None, permuted_probs [N] | None, row_map [T+1, E] int32, sorted_indices [N] | None)."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    # outputs by new_empty: dtype and device come from the tensor, not parsed from keywords (0.3 us an allocation,
    # which a small call pays four times a permute + unpermute pair)
    if num_out_tokens is not None and num_tokens * num_experts <= _SMALL_MAP:  # permute_small: no tables
        row_map, ws = routing_map.new_empty((num_tokens + 1, num_experts), dtype=torch.int32), 0
    else:
        row_map, ws, buf = _map_and_workspace(routing_map)
    n_rows = num_out_tokens
    if n_rows is None:
        _tables(routing_map, ws)
        # the routed count (expert_start[E], the workspace's last word): the one device-to-host read
        n_rows = int(buf.view(-1)[(num_tokens + 1) * num_experts + _workspace_ints(num_tokens, num_experts) - 1].item())
        if n_rows > V.MAX_ROWS:
            raise ValueError(f"moe_raw.permute: {n_rows} routed pairs exceed the {V.MAX_ROWS} rows supported")
    capacity = 0
    if drop_and_pad:
        capacity = min(n_rows // num_experts, num_tokens)  # the seed slices argsort(...)[:, :capacity]
        n_rows = num_experts * capacity
    tail_blocks = cdiv(n_rows, _TAIL_ROWS) if (num_out_tokens is not None and not drop_and_pad) else 0
    out = tokens.new_empty((n_rows, hidden)) if want_rows else None
    indices = routing_map.new_empty(n_rows, dtype=torch.int64) if want_indices else None
    pprobs = probs.new_empty(n_rows) if probs is not None else None
    scan, scan_overlap, layout = True, False, None
    if num_out_tokens is not None and ws:  # the tables after the outputs: the row layout is known before them
        if not drop_and_pad and want_rows and _launch.has_bulk_copy(tokens.device):
            # permute_grouped with the row count given counts the scan's results itself: no routing_scan to wait for
            layout = _row_layout(tokens, out.data_ptr())
            n_tiles = cdiv(num_tokens, _TILE_TOKENS)
            scan = not (
                layout[3] == 16 and 1 < n_tiles <= _UNSCANNED_MAX_TILES  # one tile: no scan
                and _grouped(layout[0], num_tokens, num_experts, num_out_tokens, None)
            )  # fmt: skip
            # the scan of a few tile sums overlapped too, where the row kernel after it is
            scan_overlap = num_experts * n_tiles <= _SCAN_OVERLAP_MAX_SUMS and _rows_overlapped(layout, num_tokens)
        _tables(routing_map, ws, scan, scan_overlap)
    src = tokens if want_rows else None
    _scatter(src, out, routing_map, ws, row_map, indices, probs, pprobs, n_rows, tail_blocks, n_rows,
             capacity if drop_and_pad else None, None, num_out_tokens is not None, scan, layout)  # fmt: skip
    return out, pprobs, row_map, indices


def _permute_empty(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    """T = 0: nothing is routed; num_out_tokens rows of zeros (none with drop_and_pad: capacity is min(C, T) = 0)."""
    n_rows = 0 if (drop_and_pad or num_out_tokens is None) else num_out_tokens
    dev = tokens.device
    row_map = torch.zeros((1, routing_map.shape[1]), dtype=torch.int32, device=dev)
    out = torch.zeros((n_rows, tokens.shape[1]), dtype=tokens.dtype, device=dev)
    pprobs = torch.zeros(n_rows, dtype=probs.dtype, device=dev) if probs is not None else None
    return out, pprobs, row_map, torch.zeros(n_rows, dtype=torch.int64, device=dev)


def _acc_size(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


_GATHER_NAMES = {
    (way, dtype, vb): f"moe_raw::gather_{way}<{ctype}, {vb}>"
    for way in ("reduce", "warp")
    for dtype, ctype in CTYPES.items()
    for vb in (16, 8, 4, 2, 1)
}


def _gather_cuda(rows, row_map, num_tokens, probs=None, csr=None, g_pprobs=None, dprobs_dtype=None, out_dtype=None):
    """out[t] = sum of token t's rows (weighted by probs where given). Returns (out [T, H], dprobs [T, E] | None).

    rows None (no row gradient) computes dprobs only. dprobs[t, e] = g_pprobs[row] at routed pairs, else 0.
    """
    dev = row_map.device if row_map is not None else csr[0].device
    num_experts = row_map.shape[1] if row_map is not None else 0
    dprobs = None
    if g_pprobs is not None:
        dprobs = torch.empty((num_tokens, num_experts), dtype=dprobs_dtype, device=dev)
    if rows is None:
        if dprobs is None:
            return None, None
        dtype = out_dtype if out_dtype in CTYPES else torch.float32
        # No row data, only dprobs: n_rows still bounds the row ids the kernel accepts.
        hidden, n_rows, out, rows_stride, vb = 0, g_pprobs.shape[0], None, 0, 16
    else:
        rows = row_view(rows)
        dtype = rows.dtype
        if dtype not in CTYPES:
            raise TypeError(f"moe_raw: summing rows needs a float dtype ({', '.join(map(str, CTYPES))}), got {dtype}")
        n_rows, hidden = rows.shape
        esize = rows.element_size()
        out = rows.new_empty((num_tokens, hidden))
        rows_stride = rows.stride()[0]
        vb = _vec_bytes(esize, hidden * esize, rows_stride * esize, rows.data_ptr(), out.data_ptr())
    # the row list and weights (gather_warp: one of each a warp, row lists first)
    smem = 4 * (num_experts + (num_experts & 1)) + num_experts * _acc_size(dtype)
    if _on_warps(smem):
        way, blocks, smem = "warp", cdiv(num_tokens, _WARPS), _WARPS * smem + _SMEM_SLACK
    else:
        way, blocks, smem = "reduce", num_tokens, smem + _SMEM_SLACK
    csr_ptr, csr_rows = csr if csr else (None, None)
    launch(
        "permute", _GATHER_NAMES[way, dtype, vb], dev, blocks, _ROW_THREADS,
        (ptr(rows), rows_stride, n_rows, ptr(out), hidden, hidden, num_tokens, num_experts, ptr(row_map),
         ptr(csr_ptr), ptr(csr_rows), *_scalar_args(probs),
         ptr(g_pprobs), (SCALAR_CODE[g_pprobs.dtype] if g_pprobs is not None else 0),
         ptr(dprobs), (SCALAR_CODE[dprobs_dtype] if dprobs is not None else 0)),
        shared_mem=smem,
    )  # fmt: skip
    return out, dprobs


def _unpermute_bwd_name(ctype: str, vb: int, n_rows: int, num_tokens: int) -> str:
    """unpermute_bwd's instance (kernels/permute.cu), for 16-byte packs: LONE (a token's lone row two packs a step)
    where there are fewer than two rows a token (K 1, spare or padding rows included), QUAD (four rows a step, bf16 /
    fp16) where there are at least four (0.3-0.4% faster at K 6 on an H200, level at K 8 and on an H100); the
    two-rows-a-step one otherwise and for narrower packs (LONE lost 1.5-2.9% at K 2-8 on an H100). The same bits
    whichever runs."""
    if vb == 16 and n_rows < 2 * num_tokens:
        return f"moe_raw::unpermute_bwd<{ctype}, 16, true>"
    if vb == 16 and n_rows >= 4 * num_tokens and ctype in QUAD_CTYPES:
        return f"moe_raw::unpermute_bwd<{ctype}, 16, false, 4>"
    return f"moe_raw::unpermute_bwd<{ctype}, {vb}>"


def _unpermute_bwd_cuda(grad_out, rows, row_map, n_rows, probs, need_dprobs, need_drows=True):
    """Returns (d_rows [N, H], dprobs [T, E] | None); spare rows (and the aligned layout's padding rows) of d_rows are
    zero."""
    num_tokens, hidden = grad_out.shape
    num_experts = row_map.shape[1]
    aligned = _aligned_layout(row_map, num_tokens)  # more blocks zero the padding rows
    dev = grad_out.device
    g = row_view(grad_out)
    dtype = g.dtype
    esize = g.element_size()
    d_rows = torch.empty((n_rows, hidden), dtype=dtype, device=dev)
    rows = row_view(rows) if need_dprobs else None
    dprobs = torch.empty((num_tokens, num_experts), dtype=probs.dtype, device=dev) if need_dprobs else None
    quantities = [hidden * esize, g.stride(0) * esize, g.data_ptr(), d_rows.data_ptr()]
    if rows is not None:
        quantities += [rows.stride(0) * esize, rows.data_ptr()]
    vb = _vec_bytes(esize, *quantities)
    smem = 8 * (num_experts + (num_experts & 1)) + num_experts * _acc_size(dtype)  # the row, expert, weight lists
    blocks = num_tokens + cdiv(n_rows, _TAIL_ROWS) + (_pad_blocks(num_experts) if aligned else 0)
    launch(
        "permute", _unpermute_bwd_name(CTYPES[dtype], vb, n_rows, num_tokens), dev, blocks, _ROW_THREADS,
        (ptr(g), (g.stride(0)), ptr(rows), (rows.stride(0) if rows is not None else 0), ptr(d_rows),
         (n_rows), (hidden), (num_tokens), (num_experts), ptr(row_map), *_scalar_args(probs),
         ptr(dprobs), (SCALAR_CODE[probs.dtype] if need_dprobs else 0),
         (row_map[num_tokens + 1].data_ptr() if aligned else 0)),
        shared_mem=smem + _SMEM_SLACK,
    )  # fmt: skip
    return d_rows, dprobs


def _gather(rows, row_map, num_tokens, probs=None, g_pprobs=None, dprobs_dtype=None):
    """gather_reduce on the tensors' device: (out [T, H] | None, dprobs [T, E] | None); see ``_gather_cuda``."""
    if num_tokens == 0:
        out = rows.new_zeros((0, rows.shape[1])) if rows is not None else None
        dprobs = None
        if g_pprobs is not None:
            dprobs = torch.zeros((0, row_map.shape[1]), dtype=dprobs_dtype, device=row_map.device)
        return out, dprobs
    if _launch.runs_kernels(row_map):
        return _gather_cuda(rows, row_map, num_tokens, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=dprobs_dtype)
    if rows is not None and rows.dtype not in CTYPES:
        raise TypeError(f"moe_raw: summing rows needs a float dtype ({', '.join(map(str, CTYPES))}), got {rows.dtype}")
    return _cpu.gather(rows, row_map, num_tokens, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=dprobs_dtype)


def _unpermute_bwd(grad_out, rows, row_map, n_rows, probs, need_dprobs):
    """unpermute_bwd on the tensors' device: (d_rows [N, H], dprobs [T, E] | None)."""
    if _launch.runs_kernels(grad_out):
        return _unpermute_bwd_cuda(grad_out, rows, row_map, n_rows, probs, need_dprobs)
    return _cpu.unpermute_bwd(grad_out, rows, row_map, n_rows, probs, need_dprobs)


def _permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):
    """Returns (permuted, permuted_probs, index returned to the user, row map), on the tensors' device."""
    if tokens.shape[0] == 0:
        out, pprobs, row_map, indices = _permute_empty(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    elif _launch.runs_kernels(tokens):
        out, pprobs, row_map, indices = _permute_cuda(
            tokens, routing_map, probs, num_out_tokens, drop_and_pad, want_indices=not fused
        )
    else:
        out, pprobs, row_map, indices = _cpu.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    return out, pprobs, (row_map if fused else indices), row_map


def _unpermute_forward(permuted, probs, row_map, sorted_indices, num_tokens):
    """row_map given: the row-map path; else the CSR path over sorted_indices (no probs)."""
    if num_tokens == 0:
        return permuted.new_zeros((0, permuted.shape[1]))
    if row_map is not None:
        return _gather(permuted, row_map, num_tokens, probs=probs)[0]
    if not _launch.runs_kernels(permuted):
        return _cpu.gather_csr(permuted, sorted_indices, num_tokens)
    # Generic seed semantics: rows grouped by token through a stable sort (deterministic, no host sync).
    tok_sorted, perm = torch.sort(sorted_indices, stable=True)
    bounds = torch.arange(num_tokens + 1, device=permuted.device, dtype=sorted_indices.dtype)
    csr_ptr = torch.searchsorted(tok_sorted, bounds)
    return _gather_cuda(permuted, None, num_tokens, csr=(csr_ptr, perm))[0]


def _csr_rows_grad(grad_out: torch.Tensor, sorted_indices: torch.Tensor) -> torch.Tensor:
    """d_rows[r] = grad_out[sorted_indices[r]], and 0 for an index outside [0, T): the forward's CSR summed such a
    row into no token. Those rows gather a zero row appended at T, as a direct index_select would trip a device-side
    assert that leaves the process's CUDA context unusable (the range is checked only under MOE_RAW_DEBUG=1)."""
    num_tokens = grad_out.shape[0]
    padded = torch.cat((grad_out, grad_out.new_zeros((1, grad_out.shape[1]))))
    inside = (sorted_indices >= 0) & (sorted_indices < num_tokens)
    return padded.index_select(0, torch.where(inside, sorted_indices, num_tokens))


def _row_map_from_routing(routing_map: torch.Tensor, n_rows: int, drop_and_pad: bool) -> torch.Tensor:
    """The row map that permute(routing_map, num_out_tokens=n_rows, drop_and_pad) produced, rebuilt without data."""
    num_tokens, num_experts = routing_map.shape
    if num_tokens == 0:
        return torch.zeros((1, num_experts), dtype=torch.int32, device=routing_map.device)
    if drop_and_pad:
        n_rows = num_experts * (n_rows // num_experts)
    if not _launch.runs_kernels(routing_map):
        return _cpu.row_map(routing_map, n_rows, drop_and_pad)
    _, _, row_map, _ = _permute_cuda(
        routing_map.new_empty((num_tokens, 0), dtype=torch.uint8), routing_map, None, n_rows, drop_and_pad,
        want_rows=False, want_indices=False,
    )  # fmt: skip
    return row_map


def _permute_and_pad_cuda(tokens, routing_map, probs, align, num_out_tokens):
    """(permuted [N, H], permuted_probs [N] | None, row_map [T+3, E], tokens_per_expert [E], padded [E])."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    dev = tokens.device
    row_map, ws, _ = _map_and_workspace(routing_map, lines=3)
    counts = torch.empty((2, num_experts), dtype=torch.int64, device=dev)
    _tables(routing_map, ws)
    n_keep = min(num_out_tokens, V.MAX_ROWS) if num_out_tokens is not None else V.MAX_ROWS
    launch(
        "permute", "moe_raw::pad_offsets<1024>", dev, 1, 1024,
        (ws, num_tokens, num_experts, n_keep, align, ptr(row_map[num_tokens + 1]), ptr(row_map[num_tokens]),
         ptr(counts[0]), ptr(counts[1])),
    )  # fmt: skip
    if num_out_tokens is None:
        n_rows = int(row_map[num_tokens, 0].item())  # the padded total: the one device-to-host read
    else:
        n_rows = num_out_tokens + num_experts * (align - 1)  # the worst case: every expert pads align - 1 rows
    out = torch.empty((n_rows, hidden), dtype=tokens.dtype, device=dev)
    pprobs = torch.empty(n_rows, dtype=probs.dtype, device=dev) if probs is not None else None
    extra_blocks = cdiv(n_rows, _TAIL_ROWS) + _pad_blocks(num_experts, align)  # spare rows, the experts' padding
    _scatter(tokens, out, routing_map, ws, row_map, None, probs, pprobs, n_rows, extra_blocks, n_keep, None,
             row_map[num_tokens + 1], num_out_tokens is not None)  # fmt: skip
    return out, pprobs, row_map, counts[0], counts[1]


def _permute_and_pad_rows(tokens, routing_map, probs, align, num_out_tokens):
    """permute_and_pad's five outputs on the tensors' device (the CUDA kernels, or their torch twin: the reference,
    which also serves T = 0 on CUDA: all zeros, no kernel needed)."""
    if _launch.runs_kernels(tokens) and tokens.shape[0] > 0:
        return _permute_and_pad_cuda(tokens, routing_map, probs, align, num_out_tokens)
    return reference.permute_and_pad(tokens, routing_map, probs, align, num_out_tokens)


def _scatter_rows_cuda(x, row_map, num_tokens, num_rows):
    rows = row_view(x.reshape(num_tokens, -1) if x.dim() != 2 else x)
    out = torch.empty((num_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    esize = x.element_size()
    row_bytes = rows.shape[1] * esize
    vb = _vec_bytes(1, row_bytes, rows.stride(0) * esize, rows.data_ptr(), out.data_ptr())
    num_experts = row_map.shape[1]
    aligned = _aligned_layout(row_map, num_tokens)
    launch(
        "permute", f"moe_raw::scatter_rows<{vb}>", x.device,
        num_tokens + cdiv(num_rows, _TAIL_ROWS) + (_pad_blocks(num_experts) if aligned else 0), _ROW_THREADS,
        (ptr(rows), rows.stride(0) * esize, ptr(out), row_bytes, num_tokens, num_experts, num_rows, ptr(row_map),
         ptr(row_map[num_tokens + 1]) if aligned else 0),
        shared_mem=4 * num_experts,
    )  # fmt: skip
    return out


def _scatter_rows(x, row_map, num_rows):
    """permute_with_row_map on the tensors' device: one scatter_rows launch, or its torch twin (the reference,
    which also serves empty x on CUDA)."""
    if _launch.runs_kernels(x) and x.numel() > 0:
        return _scatter_rows_cuda(x, row_map, x.shape[0], num_rows)
    return reference.permute_with_row_map(x, row_map, num_rows)


def _chunk_sort_cuda(x, probs, split_sizes, sorted_idxs, gather: bool):
    """One chunk_sort launch: (out [N, ...], probs_out [N] | None). gather=False is the forward regrouping, True its
    inverse (the backward). x's rows must have a contiguous last dim; any row stride."""
    n_rows = x.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    probs_out = torch.empty(n_rows, dtype=probs.dtype, device=x.device) if probs is not None else None
    if n_rows == 0:
        return out, probs_out
    rows_in = x.reshape(n_rows, math.prod(x.shape[1:]))
    if rows_in.shape[1] and rows_in.stride(1) != 1:
        rows_in = rows_in.contiguous()
    rows_out = out.view(n_rows, rows_in.shape[1])
    esize = x.element_size()
    row_bytes = rows_in.shape[1] * esize
    in_stride = rows_in.stride(0) * esize
    vb = _vec_bytes(1, row_bytes, in_stride, rows_out.stride(0) * esize, rows_in.data_ptr(), rows_out.data_ptr())
    n_splits = split_sizes.shape[0]
    launch(
        "chunks", f"moe_raw::chunk_sort<{vb}>", x.device, -(-n_rows // _CHUNK_ROWS), _CHUNK_THREADS,
        (ptr(rows_in), in_stride, ptr(rows_out), rows_out.stride(0) * esize, n_rows, row_bytes,
         ptr(split_sizes), split_sizes.element_size(), ptr(sorted_idxs), sorted_idxs.element_size(), n_splits,
         ptr(probs), probs.stride(0) if probs is not None else 0, ptr(probs_out),
         probs.element_size() if probs is not None else 0, int(gather)),
        shared_mem=8 * n_splits,
    )  # fmt: skip
    return out, probs_out


def _chunk_sort(x, probs, split_sizes, sorted_idxs, gather: bool):
    """The regrouping (gather=False) or its inverse (True, the backward) on the tensors' device: one chunk_sort
    launch, or its torch twin (the reference, which reads the sizes on the host)."""
    if _launch.runs_kernels(x):
        return _chunk_sort_cuda(x, probs, split_sizes, sorted_idxs, gather)
    if gather:  # the regrouped chunks have sizes sizes[order]; chunk i goes back to position argsort(order)[i]
        return reference.sort_chunks_by_idxs(x, split_sizes[sorted_idxs], torch.argsort(sorted_idxs), probs)
    return reference.sort_chunks_by_idxs(x, split_sizes, sorted_idxs, probs)


def _first_of_each_expert(topk_indices):
    """[T, K] bool: False where the same index appeared earlier in the row (K x K compare; K is small)."""
    k = topk_indices.shape[1]
    same = topk_indices.unsqueeze(2) == topk_indices.unsqueeze(1)  # [T, K, K]: same[t, i, j] = idx[i] == idx[j]
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_indices.device).tril(-1)
    return ~(same & earlier).any(2)


def _dense_cuda(topk_indices, num_experts, topk_probs):
    """One topk_dense launch: (routing_map [T, E] bool view, probs [T, E] | None)."""
    num_tokens, k = topk_indices.shape
    idx = topk_indices.contiguous()
    width = -(-num_experts // 16) * 16
    dev = idx.device
    routing_map = torch.empty((num_tokens, width), dtype=torch.bool, device=dev)
    probs = p = None
    if topk_probs is not None:
        p = topk_probs.detach().contiguous()
        probs = torch.empty((num_tokens, num_experts), dtype=p.dtype, device=dev)
    if num_tokens:
        index = "int32_t" if idx.dtype == torch.int32 else "int64_t"
        word = _WORDS[p.element_size()] if p is not None else "uint32_t"
        launch(
            "topk", f"moe_raw::topk_dense<{index}, {word}>", dev, -(-num_tokens // _TOKENS_PER_BLOCK),
            32 * _TOKENS_PER_BLOCK,
            (ptr(idx), ptr(p), num_tokens, k, num_experts, ptr(routing_map), width, ptr(probs)),
        )  # fmt: skip
    return routing_map[:, :num_experts], probs


def _unpermute_backward(grad_out, rows, row_map, sorted_indices, probs, n_rows, need_dprobs):
    """unpermute's backward, for the autograd Function and the custom op alike: (d_rows [N, H], dprobs [T, E] |
    None). T = 0: zero rows (and a zero [0, E] dprobs). row_map None: the CSR path over sorted_indices (each row
    takes its token's gradient; no probs). Else unpermute_bwd on the tensors' device; rows are read (dprobs) only
    when need_dprobs."""
    num_tokens, hidden = grad_out.shape
    if num_tokens == 0:
        dprobs = torch.zeros_like(probs) if need_dprobs else None
        return grad_out.new_zeros((n_rows, hidden)), dprobs
    if row_map is None:
        return _csr_rows_grad(grad_out, sorted_indices), None
    return _unpermute_bwd(grad_out, rows, row_map.contiguous(), n_rows, probs, need_dprobs)
