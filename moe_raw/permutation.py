"""permute / unpermute: the seed's API on moe_raw's CUDA kernels (kernels/permute.cu), with autograd.

Layering: kernel -> ``_launch.launch`` -> ``_permute_cuda`` / ``_gather_cuda`` / ``_unpermute_bwd_cuda`` (size and
allocate, never validate) -> ``_permute_forward`` / ``_gather`` / ``_unpermute_bwd`` (the tensors' device picks the
CUDA launcher or its torch twin in ``moe_raw._cpu``) -> ``_PermuteFn`` / ``_UnpermuteFn`` -> ``permute`` /
``unpermute`` (validate). CPU and CUDA tensors take the same Functions, so they get the same autograd graph and the
same gradients, empty inputs included.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _cpu
from moe_raw import _validate as V
from moe_raw._launch import CTYPES, SCALAR_CODE, launch, ptr

_TILE_TOKENS = 256  # kernels/permute.cu kTileTokens
_ROW_THREADS = 128  # kRowThreads
_TAIL_ROWS = 32  # kTailRows
_STAGE_BYTES = 16384  # kStageBytes
# Bytes past the row lists of gather_reduce / unpermute_bwd: nvcc loads the lists up to 4 entries ahead of the loop
# bound (two float weights as one 8-byte load, past a 1-expert list: compute-sanitizer memcheck on an H100), so the
# allocation covers 4 more fp64 entries.
_SMEM_SLACK = 32
# Diagnostic switch, read at import: compute-sanitizer initcheck does not see writes made by the bulk-copy engine
# (permute_scatter's sm_90 path for 16-byte rows) and reports every row written that way as uninitialized when it
# is read. MOE_RAW_NO_BULK_COPY=1 writes those rows with plain 8-byte stores instead (a few % slower).
_BULK_COPY = os.environ.get("MOE_RAW_NO_BULK_COPY", "0") in ("", "0")


def _scatter_vec_bytes(vb: int) -> int:
    """permute_scatter's vector width: 16 takes the bulk-copy path on sm_90, unless MOE_RAW_NO_BULK_COPY=1."""
    return vb if vb != 16 or _BULK_COPY else 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _vec_bytes(elem: int, *byte_quantities: int) -> int:
    """Widest vector (16, 8, 4, 2 or 1 bytes, at least one element) dividing every row size, stride and address."""
    q = 0
    for b in byte_quantities:
        q |= b  # a power of two divides every quantity iff it divides their bitwise OR
    vb = 16
    while vb > elem and q % vb:
        vb >>= 1
    return vb


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows the kernels can read: last dim contiguous (any row stride, even 0), else a contiguous copy."""
    return x if x.stride(-1) == 1 and x.stride(0) >= 0 else x.contiguous()


def _scalar_args(p: torch.Tensor | None):
    """(address, dtype code, stride 0, stride 1) of a [T, E] scalar tensor, or nulls."""
    if p is None:
        return (0, 0, 0, 0)
    return (p.data_ptr(), SCALAR_CODE[p.dtype], p.stride(0), p.stride(1))


def _workspace_ints(num_tokens: int, num_experts: int) -> int:
    """int32 words of kernels/permute.cu's routing workspace."""
    n_words, n_tiles = _cdiv(num_tokens, 32), _cdiv(num_tokens, _TILE_TOKENS)
    return 2 * num_experts * (n_words + n_tiles) + num_experts + 1


def _tables(routing_map: torch.Tensor, ws: int) -> None:
    """Launch routing_pack (+ routing_scan) filling the int32 workspace at device address ``ws``. No host sync."""
    num_tokens, num_experts = routing_map.shape
    n_tiles = _cdiv(num_tokens, _TILE_TOKENS)
    # One block does everything for T <= 256 (one launch); otherwise tiles x 32-expert groups, then the scan.
    grid = (1, 1) if n_tiles == 1 else (n_tiles, _cdiv(num_experts, 32))
    dev = routing_map.device
    launch(
        "permute", "moe_raw::routing_pack<256>", dev, grid, _TILE_TOKENS,
        (routing_map.data_ptr(), routing_map.element_size(), routing_map.stride(0), routing_map.stride(1),
         num_tokens, num_experts, ws),
    )  # fmt: skip
    if n_tiles > 1:
        launch("permute", "moe_raw::routing_scan<1024>", dev, 1, 1024, (ws, num_tokens, num_experts))


def _map_and_workspace(routing_map: torch.Tensor):
    """One int32 allocation: the row map [T+1, E] (returned as a view) and, after it, the routing workspace
    (returned as its device address, plus the tensor holding it). One allocation and one view per call: on the
    small-call path each costs microseconds."""
    num_tokens, num_experts = routing_map.shape
    extra_rows = _cdiv(_workspace_ints(num_tokens, num_experts), num_experts)
    buf = torch.empty((num_tokens + 1 + extra_rows, num_experts), dtype=torch.int32, device=routing_map.device)
    ws = buf.data_ptr() + 4 * (num_tokens + 1) * num_experts
    return buf[: num_tokens + 1], ws, buf


def _permute_cuda(tokens, routing_map, probs, num_out_tokens, drop_and_pad, want_rows=True, want_indices=True):
    """(permuted [N, H] | None, permuted_probs [N] | None, row_map [T+1, E] int32, sorted_indices [N] | None)."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    dev = tokens.device
    row_map, ws, buf = _map_and_workspace(routing_map)
    _tables(routing_map, ws)
    n_rows = num_out_tokens
    if n_rows is None:
        # the routed count (expert_start[E], the workspace's last word): the one device-to-host read
        n_rows = int(buf.view(-1)[(num_tokens + 1) * num_experts + _workspace_ints(num_tokens, num_experts) - 1].item())
        if n_rows > V.MAX_ROWS:
            raise ValueError(f"moe_raw.permute: {n_rows} routed pairs exceed the {V.MAX_ROWS} rows supported")
    capacity = 0
    if drop_and_pad:
        capacity = min(n_rows // num_experts, num_tokens)  # the seed slices argsort(...)[:, :capacity]
        n_rows = num_experts * capacity
    tail_blocks = _cdiv(n_rows, _TAIL_ROWS) if (num_out_tokens is not None and not drop_and_pad) else 0
    out = torch.empty((n_rows, hidden), dtype=tokens.dtype, device=dev) if want_rows else None
    indices = torch.empty(n_rows, dtype=torch.int64, device=dev) if want_indices else None
    pprobs = torch.empty(n_rows, dtype=probs.dtype, device=dev) if probs is not None else None
    src, row_bytes, vb = None, 0, 16
    if want_rows:
        src = _rows(tokens)
        esize = tokens.element_size()
        row_bytes = hidden * esize
        vb = _scatter_vec_bytes(_vec_bytes(1, row_bytes, src.stride(0) * esize, src.data_ptr(), out.data_ptr()))
    launch(
        "permute", f"moe_raw::permute_scatter<{vb}>", dev, num_tokens + tail_blocks, _ROW_THREADS,
        (ptr(src), (src.stride(0) * src.element_size() if src is not None else 0), ptr(out), (row_bytes),
         (num_tokens), (num_experts), (n_rows), (drop_and_pad), (capacity),
         ptr(routing_map), (routing_map.element_size()), (routing_map.stride(0)), (routing_map.stride(1)),
         ws, row_map.data_ptr(), ptr(indices), *_scalar_args(probs), ptr(pprobs), (n_rows), 0),
        # the row list and scratch, plus (16-byte rows) the kernel's 128-aligned stage of up to 16 KiB of the row
        shared_mem=8 * num_experts + (128 + min(row_bytes, _STAGE_BYTES) if vb == 16 and want_rows else 0),
    )  # fmt: skip
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
        rows = _rows(rows)
        dtype = rows.dtype
        if dtype not in CTYPES:
            raise TypeError(f"moe_raw: summing rows needs a float dtype ({', '.join(map(str, CTYPES))}), got {dtype}")
        n_rows, hidden = rows.shape
        esize = rows.element_size()
        out = torch.empty((num_tokens, hidden), dtype=dtype, device=dev)
        rows_stride = rows.stride(0)
        vb = _vec_bytes(esize, hidden * esize, rows_stride * esize, rows.data_ptr(), out.data_ptr())
    smem = 4 * (num_experts + (num_experts & 1)) + num_experts * _acc_size(dtype) + _SMEM_SLACK
    launch(
        "permute", f"moe_raw::gather_reduce<{CTYPES[dtype]}, {vb}>", dev, num_tokens, _ROW_THREADS,
        (ptr(rows), (rows_stride), (n_rows), ptr(out), (hidden), (hidden), (num_tokens),
         (num_experts), ptr(row_map), ptr(csr[0] if csr else None), ptr(csr[1] if csr else None),
         *_scalar_args(probs), ptr(g_pprobs), (SCALAR_CODE[g_pprobs.dtype] if g_pprobs is not None else 0),
         ptr(dprobs), (SCALAR_CODE[dprobs_dtype] if dprobs is not None else 0)),
        shared_mem=smem,
    )  # fmt: skip
    return out, dprobs


def _unpermute_bwd_cuda(grad_out, rows, row_map, n_rows, probs, need_dprobs, need_drows=True):
    """Returns (d_rows [N, H], dprobs [T, E] | None); spare rows (and the aligned layout's padding rows) of d_rows are
    zero."""
    num_tokens, hidden = grad_out.shape
    num_experts = row_map.shape[1]
    aligned = row_map.shape[0] == num_tokens + 3  # permute_and_pad's layout: E more blocks zero the padding rows
    dev = grad_out.device
    g = _rows(grad_out)
    dtype = g.dtype
    esize = g.element_size()
    d_rows = torch.empty((n_rows, hidden), dtype=dtype, device=dev)
    rows = _rows(rows) if need_dprobs else None
    dprobs = torch.empty((num_tokens, num_experts), dtype=probs.dtype, device=dev) if need_dprobs else None
    quantities = [hidden * esize, g.stride(0) * esize, g.data_ptr(), d_rows.data_ptr()]
    if rows is not None:
        quantities += [rows.stride(0) * esize, rows.data_ptr()]
    vb = _vec_bytes(esize, *quantities)
    smem = 8 * (num_experts + (num_experts & 1)) + num_experts * _acc_size(dtype) + _SMEM_SLACK
    launch(
        "permute", f"moe_raw::unpermute_bwd<{CTYPES[dtype]}, {vb}>", dev,
        num_tokens + _cdiv(n_rows, _TAIL_ROWS) + (num_experts if aligned else 0), _ROW_THREADS,
        (ptr(g), (g.stride(0)), ptr(rows), (rows.stride(0) if rows is not None else 0), ptr(d_rows),
         (n_rows), (hidden), (num_tokens), (num_experts), ptr(row_map), *_scalar_args(probs),
         ptr(dprobs), (SCALAR_CODE[probs.dtype] if need_dprobs else 0),
         (row_map[num_tokens + 1].data_ptr() if aligned else 0)),
        shared_mem=smem,
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
    if row_map.is_cuda:
        return _gather_cuda(rows, row_map, num_tokens, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=dprobs_dtype)
    if rows is not None and rows.dtype not in CTYPES:
        raise TypeError(f"moe_raw: summing rows needs a float dtype ({', '.join(map(str, CTYPES))}), got {rows.dtype}")
    return _cpu.gather(rows, row_map, num_tokens, probs=probs, g_pprobs=g_pprobs, dprobs_dtype=dprobs_dtype)


def _unpermute_bwd(grad_out, rows, row_map, n_rows, probs, need_dprobs):
    """unpermute_bwd on the tensors' device: (d_rows [N, H], dprobs [T, E] | None)."""
    if grad_out.is_cuda:
        return _unpermute_bwd_cuda(grad_out, rows, row_map, n_rows, probs, need_dprobs)
    return _cpu.unpermute_bwd(grad_out, rows, row_map, n_rows, probs, need_dprobs)


def _permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):
    """Returns (permuted, permuted_probs, index returned to the user, row map), on the tensors' device."""
    if tokens.shape[0] == 0:
        out, pprobs, row_map, indices = _permute_empty(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    elif tokens.is_cuda:
        out, pprobs, row_map, indices = _permute_cuda(
            tokens, routing_map, probs, num_out_tokens, drop_and_pad, want_indices=not fused
        )
    else:
        out, pprobs, row_map, indices = _cpu.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    if not fused:
        # unpermute(fused=False, routing_map=...) reuses this row map instead of rebuilding it (three launches),
        # if it gets the same routing_map object, unmodified (same _version), with the same row count and mode.
        indices._moe_raw_row_map = (routing_map, routing_map._version, out.shape[0], drop_and_pad, row_map)
    return out, pprobs, (row_map if fused else indices), row_map


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused):
        out, pprobs, index, row_map = _permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(row_map)
        ctx.tokens_dtype = tokens.dtype
        ctx.probs_dtype = probs.dtype if probs is not None else None
        return out, pprobs, index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_permuted, grad_pprobs, _grad_index):
        (row_map,) = ctx.saved_tensors
        num_tokens = row_map.shape[0] - 1
        need_tokens, need_probs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_tokens and ctx.tokens_dtype not in CTYPES:
            raise TypeError(f"moe_raw.permute: no gradient for {ctx.tokens_dtype} tokens (a pure byte move)")
        if num_tokens == 0:
            dtok = grad_permuted.new_zeros((0, grad_permuted.shape[1])) if need_tokens else None
            dprobs = (
                torch.zeros((0, row_map.shape[1]), dtype=ctx.probs_dtype, device=row_map.device) if need_probs else None
            )
            return dtok, dprobs, None, None, None, None
        rows = grad_permuted if need_tokens else None
        dtok, dprobs = _gather(
            rows, row_map, num_tokens,
            g_pprobs=grad_pprobs.contiguous() if (need_probs and grad_pprobs is not None) else None,
            dprobs_dtype=ctx.probs_dtype,
        )  # fmt: skip
        # dprobs stays None when permuted_probs got no gradient: autograd reads None as zero, and a zero tensor
        # would cost a fill plus an add into probs.grad (the round trip's probs get their gradient from unpermute).
        if need_tokens and dtok is None:
            dtok = torch.zeros((num_tokens, grad_permuted.shape[1]), dtype=ctx.tokens_dtype, device=row_map.device)
        return dtok, dprobs, None, None, None, None


def _unpermute_forward(permuted, probs, row_map, sorted_indices, num_tokens):
    """row_map given: the row-map path; else the CSR path over sorted_indices (no probs)."""
    if num_tokens == 0:
        return permuted.new_zeros((0, permuted.shape[1]))
    if row_map is not None:
        return _gather(permuted, row_map, num_tokens, probs=probs)[0]
    if not permuted.is_cuda:
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


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, probs, row_map, sorted_indices, num_tokens):
        ctx.num_tokens = num_tokens
        ctx.n_rows = permuted.shape[0]
        ctx.probs_needs_grad = probs is not None and ctx.needs_input_grad[1]
        out = _unpermute_forward(permuted, probs, row_map, sorted_indices, num_tokens)
        ctx.save_for_backward(row_map, sorted_indices, probs, permuted if ctx.probs_needs_grad else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        row_map, sorted_indices, probs, permuted = ctx.saved_tensors
        need_rows = ctx.needs_input_grad[0]
        if ctx.num_tokens == 0:
            d_rows = grad_out.new_zeros((ctx.n_rows, grad_out.shape[1])) if need_rows else None
            dprobs = torch.zeros_like(probs) if (probs is not None and ctx.needs_input_grad[1]) else None
            return d_rows, dprobs, None, None, None
        if row_map is None:  # CSR path: every row takes its token's gradient
            return (_csr_rows_grad(grad_out, sorted_indices) if need_rows else None), None, None, None, None
        d_rows, dprobs = _unpermute_bwd(grad_out, permuted, row_map, ctx.n_rows, probs, ctx.probs_needs_grad)
        return (d_rows if need_rows else None), dprobs, None, None, None


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Group tokens by expert: rows in expert-major, token-ascending order (what grouped GEMM slices).

    Args:
        tokens: [T, H] float32 | float16 | bfloat16 | float64, or a 1-byte dtype (float8_*, uint8, int8: a pure
            byte move, not differentiable). Rows may be strided; the last dim is read contiguously (else copied).
        routing_map: [T, E] bool or integer multi-hot (nonzero = routed), any strides. With MOE_RAW_DEBUG=1 an
            integer map holding anything but 0 and 1 raises ValueError (a host sync; see "Bad input" below).
        probs: optional [T, E] float router probabilities (dense, zero off-route); read only where routed.
        num_out_tokens: output rows N. None: N = routing_map.sum(), which costs one device-to-host read (a host
            sync). Given: no host sync at all (CUDA-graph capturable); routed pairs past N (expert-major tail) are
            dropped, and rows past the routed count are zero with prob 0 and index 0.
        fused: False returns the seed's int64 ``sorted_indices``; True returns moe_raw's row map (int32 [T+1, E],
            format in ``moe_raw.reference``), which ``unpermute(fused=True)`` reads. Both run the same kernels.
        drop_and_pad: with num_out_tokens, capacity C = min(num_out_tokens // E, T) rows per expert, N = E * C:
            the first C routed tokens of each expert (ascending), then the lowest unrouted token ids as padding
            (copies of those tokens with prob 0), as the seed's stable argsort lays them out.

    Returns:
        permuted [N, H] (tokens.dtype), permuted_probs [N] (probs.dtype) or None, and sorted_indices [N] int64
        (the token id of each row, bit-identical to the seed) or, with fused=True, the row map [T+1, E] int32.
        Differentiable w.r.t. tokens and probs.

    Bad input: a wrong type, rank, shape, dtype, layout or device raises TypeError / ValueError naming the argument,
    before anything is launched, without a host sync. Values are checked only when the environment has
    MOE_RAW_DEBUG=1 at import (each check is a device-to-host read).
    """
    op = "moe_raw.permute"
    num_tokens, num_experts = V.permute_inputs(op, tokens, routing_map, probs)
    n_out = V.size_arg(num_out_tokens, "num_out_tokens", op)
    fused, drop_and_pad = V.flag(fused, "fused", op), V.flag(drop_and_pad, "drop_and_pad", op)
    if drop_and_pad and n_out is None:
        raise ValueError(f"{op}: drop_and_pad=True needs num_out_tokens (the capacity is num_out_tokens // E)")
    V.same_device(op, tokens=tokens, routing_map=routing_map, probs=probs)
    if V.DEBUG:
        V.routing_values(op, routing_map)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        out, pprobs, row_map, indices = _ops.permute(tokens, routing_map, probs, n_out, fused, drop_and_pad)
        return out, (pprobs if probs is not None else None), (row_map if fused else indices)
    if num_tokens * num_experts > 2**31 - 1:
        raise ValueError(f"{op}: T * E = {num_tokens * num_experts} routing-map entries exceed 2^31 - 1")
    if n_out is not None and n_out > V.MAX_ROWS:
        raise ValueError(f"{op}: num_out_tokens = {n_out} exceeds the {V.MAX_ROWS} rows supported")
    if torch.is_grad_enabled() and (tokens.requires_grad or (probs is not None and probs.requires_grad)):
        return _PermuteFn.apply(tokens, probs, routing_map, n_out, drop_and_pad, fused)
    return _permute_forward(tokens, probs, routing_map, n_out, drop_and_pad, fused)[:3]


def _row_map_from_routing(routing_map: torch.Tensor, n_rows: int, drop_and_pad: bool) -> torch.Tensor:
    """The row map that permute(routing_map, num_out_tokens=n_rows, drop_and_pad) produced, rebuilt without data."""
    num_tokens, num_experts = routing_map.shape
    if num_tokens == 0:
        return torch.zeros((1, num_experts), dtype=torch.int32, device=routing_map.device)
    if drop_and_pad:
        n_rows = num_experts * (n_rows // num_experts)
    if not routing_map.is_cuda:
        return _cpu.row_map(routing_map, n_rows, drop_and_pad)
    _, _, row_map, _ = _permute_cuda(
        routing_map.new_empty((num_tokens, 0), dtype=torch.uint8), routing_map, None, n_rows, drop_and_pad,
        want_rows=False, want_indices=False,
    )  # fmt: skip
    return row_map


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape,
    probs: torch.Tensor | None = None,
    routing_map: torch.Tensor | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Sum every permuted row back into its token, each multiplied by its prob when ``probs`` is given.

    Args:
        permuted_tokens: [N, H] float32 | float16 | bfloat16 | float64 (permute's output, or the experts' output).
        sorted_indices: fused=False: [N] int64 / int32 token id of each row (permute's third output). Read only
            without routing_map; a row whose id is outside [0, T) is then summed into no token and gets a zero
            gradient (on every device). fused=True: permute(fused=True)'s row map, int32 [T+1, E] (any strides), or
            permute_and_pad's [T+3, E] (padding rows get no weight and a zero gradient); codes naming a row outside
            [0, N) are skipped. With MOE_RAW_DEBUG=1 either kind out of range raises ValueError
            (a host sync).
        restore_shape: (T, H) of the output.
        probs: optional [T, E] float; read only at routed pairs (a NaN off-route never reaches the output; its
            gradient there is exactly 0). With fused=False, routing_map is then required, as in the seed.
        routing_map: [T, E], the map given to permute (fused=False only; fused maps already know each row).
            Without it (and without probs) every row is summed into ``sorted_indices[row]`` as the seed's
            scatter_add does: spare rows (num_out_tokens above the routed count) have index 0 and are zero after
            permute; if your experts can make them nonzero (a bias), pass routing_map or use fused=True, which
            skip spare rows.
        drop_and_pad: as given to permute (capacity = N // E).

    Returns:
        [T, H] in permuted_tokens.dtype, accumulated in fp32 (fp64 for fp64) in ascending expert order:
        bitwise deterministic, no atomics, no fp32 copy of the rows. Differentiable w.r.t. permuted_tokens and probs.
        fused=False without routing_map groups rows by token with a stable device sort of sorted_indices.

    Bad input: as for ``permute``; with MOE_RAW_DEBUG=1 also the values of sorted_indices and routing_map. Without
    the flag, out-of-range indices are skipped on every device (CPU and CUDA alike).
    """
    op = "moe_raw.unpermute"
    V.tensor(permuted_tokens, "permuted_tokens", op, 2, V.FLOAT_DTYPES)
    n_rows, hidden = permuted_tokens.shape
    num_tokens, _ = V.restore_shape(op, restore_shape, hidden)
    fused, drop_and_pad = V.flag(fused, "fused", op), V.flag(drop_and_pad, "drop_and_pad", op)
    if fused:
        V.tensor(sorted_indices, "sorted_indices", op)
        if sorted_indices.dim() != 2 or sorted_indices.dtype != torch.int32:
            raise TypeError(
                f"{op}: with fused=True sorted_indices must be permute(fused=True)'s row map (int32 [T+1, E]), "
                f"got {sorted_indices.dtype} of shape {tuple(sorted_indices.shape)}"
            )
        if sorted_indices.shape[0] not in (num_tokens + 1, num_tokens + 3):  # [T + 3, E]: permute_and_pad's
            raise ValueError(
                f"{op}: with fused=True sorted_indices must be permute(fused=True)'s row map [T+1, E] (or "
                f"permute_and_pad's [T+3, E]) with T = restore_shape[0] = {num_tokens}, got shape "
                f"{tuple(sorted_indices.shape)}"
            )
        num_experts = sorted_indices.shape[1]
        if not 1 <= num_experts <= V.MAX_EXPERTS:  # the kernels keep a token's row list in shared memory
            raise ValueError(
                f"{op}: with fused=True sorted_indices must have 1 to {V.MAX_EXPERTS} expert columns, got shape "
                f"{tuple(sorted_indices.shape)}"
            )
    else:
        V.tensor(sorted_indices, "sorted_indices", op, 1, (torch.int64, torch.int32))
        if sorted_indices.shape[0] != n_rows:
            raise ValueError(
                f"{op}: sorted_indices has {sorted_indices.shape[0]} entries but permuted_tokens has {n_rows} rows"
            )
        num_experts = routing_map.shape[1] if isinstance(routing_map, torch.Tensor) and routing_map.dim() == 2 else None
    if routing_map is not None:
        V.routing(op, routing_map, num_tokens, num_experts)
        num_experts = routing_map.shape[1]
    if probs is not None:
        if num_experts is None:
            raise ValueError(f"{op}: routing_map is required when probs is given with fused=False (as in the seed)")
        V.probs(op, probs, num_tokens, num_experts)
    V.same_device(
        op, permuted_tokens=permuted_tokens, sorted_indices=sorted_indices, probs=probs, routing_map=routing_map
    )
    if V.DEBUG:
        if fused:
            V.row_map_values(op, sorted_indices[: num_tokens + 1], n_rows)
        else:
            V.index_values(op, sorted_indices, num_tokens)
        if routing_map is not None:
            V.routing_values(op, routing_map)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        return _ops.unpermute(permuted_tokens, sorted_indices, probs, routing_map, num_tokens, fused, drop_and_pad)[0]
    if fused:
        # the kernels index the row map as contiguous [T + 1, E]; a strided view (a transpose, an expand) is copied
        row_map, index = sorted_indices.contiguous(), None
    elif routing_map is not None:
        cached = getattr(sorted_indices, "_moe_raw_row_map", None)
        if (
            cached is not None
            and cached[0] is routing_map
            and cached[1] == routing_map._version
            and cached[2] == n_rows
            and cached[3] == drop_and_pad
        ):
            row_map = cached[4]
        else:
            row_map = _row_map_from_routing(routing_map, n_rows, drop_and_pad)
        index = sorted_indices
    else:
        row_map, index = None, sorted_indices
    if torch.is_grad_enabled() and (permuted_tokens.requires_grad or (probs is not None and probs.requires_grad)):
        return _UnpermuteFn.apply(permuted_tokens, probs, row_map, index, num_tokens)
    return _unpermute_forward(permuted_tokens, probs, row_map, index, num_tokens)  # no autograd node: less host time


# Last: _ops reads this module's functions when its ops run (and imports the other op modules).
from moe_raw import _ops  # noqa: E402
