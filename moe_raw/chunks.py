"""sort_chunks_by_idxs: regroup the chunks an expert-parallel all-to-all delivers (kernels/chunks.cu), with autograd.

After the all-to-all, rank-major chunks [rank 0: expert 0, expert 1, ..., rank 1: expert 0, ...] must become
expert-major for the grouped GEMM, and back again before the return all-to-all. Megatron does it with
``torch.split(input, split_sizes.tolist())`` and a ``torch.cat`` in ``sorted_idxs.tolist()`` order: two host syncs
and S copies. Here it is one launch that reads both index tensors on the device.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _validate as V
from moe_raw import reference
from moe_raw._launch import launch, ptr
from moe_raw.permutation import _vec_bytes

MAX_SPLITS = 4096  # kernels/chunks.cu: two int32 tables of S entries in shared memory
_CHUNK_ROWS = 32  # kChunkRows
_CHUNK_THREADS = 256  # kChunkThreads
_INDEX_DTYPES = (torch.int32, torch.int64)

__all__ = ["sort_chunks_by_idxs"]


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
    if x.is_cuda:
        return _chunk_sort_cuda(x, probs, split_sizes, sorted_idxs, gather)
    if gather:  # the regrouped chunks have sizes sizes[order]; chunk i goes back to position argsort(order)[i]
        return reference.sort_chunks_by_idxs(x, split_sizes[sorted_idxs], torch.argsort(sorted_idxs), probs)
    return reference.sort_chunks_by_idxs(x, split_sizes, sorted_idxs, probs)


class _SortChunksFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, split_sizes, sorted_idxs):
        ctx.save_for_backward(split_sizes, sorted_idxs)
        ctx.has_probs = probs is not None
        return _chunk_sort(x, probs, split_sizes, sorted_idxs, gather=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_probs):
        split_sizes, sorted_idxs = ctx.saved_tensors
        grad_in, grad_p = _chunk_sort(
            grad_out, grad_probs if ctx.has_probs else None, split_sizes, sorted_idxs, gather=True
        )
        return grad_in, grad_p, None, None


def _check_values(split_sizes, sorted_idxs, n_rows: int, op: str) -> None:
    """MOE_RAW_DEBUG=1 only (a device-to-host read): sizes >= 0 summing to at most n_rows, indices a permutation."""
    sizes = split_sizes.tolist()
    if any(s < 0 for s in sizes) or sum(sizes) > n_rows:
        raise ValueError(
            f"{op}: split_sizes must be >= 0 and sum to at most input.shape[0] = {n_rows}, got sum {sum(sizes)} "
            f"(min {min(sizes)}; checked because MOE_RAW_DEBUG=1)"
        )
    if sorted(sorted_idxs.tolist()) != list(range(len(sizes))):
        raise ValueError(
            f"{op}: sorted_idxs must be a permutation of 0..{len(sizes) - 1} (checked because MOE_RAW_DEBUG=1)"
        )


def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
    """Regroup chunks of rows: Megatron's ``sort_chunks_by_idxs`` in one kernel, no host sync, differentiable.

    Args:
        input: [N, ...] tokens, any dtype (rows are moved as bytes: fp8 and integer dtypes too), any row stride.
        split_sizes: [S] int32 / int64, the rows of each chunk in input order (1 <= S <= 4096). On the device;
            a CPU tensor is copied to input's device first.
        sorted_idxs: [S] int32 / int64, a permutation of 0..S-1: output chunk j is input chunk sorted_idxs[j].
            Same device rule as split_sizes.
        probs: optional [N] per-row probabilities (any float dtype), moved with their rows.
        fused: accepted for Megatron's signature; the kernel path is always fused.

    Returns:
        (output [N, ...] same dtype as input, permuted_probs [N] or None). Rows past sum(split_sizes) are copied
        in place. Gradients flow to input and probs (the inverse regrouping).

    The values are not checked by default (that needs a device-to-host read): sizes must be >= 0 and sum to at
    most N, sorted_idxs a permutation; bad values give wrong rows, never an out-of-bounds access. With
    MOE_RAW_DEBUG=1 they are checked and raise ValueError. CPU tensors run ``moe_raw.reference``.
    """
    op = "sort_chunks_by_idxs"
    V.tensor(input, "input", op)
    if input.dim() < 1:
        raise ValueError(f"{op}: input must have at least 1 dimension (rows), got a 0-d tensor")
    V.tensor(split_sizes, "split_sizes", op, 1, _INDEX_DTYPES)
    V.tensor(sorted_idxs, "sorted_idxs", op, 1, _INDEX_DTYPES)
    n_splits = split_sizes.shape[0]
    if sorted_idxs.shape[0] != n_splits:
        raise ValueError(f"{op}: sorted_idxs has {sorted_idxs.shape[0]} entries but split_sizes has {n_splits}")
    if not 1 <= n_splits <= MAX_SPLITS:
        raise ValueError(f"{op}: split_sizes must have 1 to {MAX_SPLITS} entries, got {n_splits}")
    if input.shape[0] > V.MAX_ROWS:
        raise ValueError(f"{op}: at most {V.MAX_ROWS} rows are supported, input has {input.shape[0]}")
    if probs is not None:
        V.tensor(probs, "probs", op, 1, V.FLOAT_DTYPES)
        if probs.shape[0] != input.shape[0]:
            raise ValueError(f"{op}: probs must be [N] = [{input.shape[0]}], got {tuple(probs.shape)}")
        V.same_device(op, input=input, probs=probs)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        from moe_raw import _ops

        sizes, order = split_sizes.to(input.device), sorted_idxs.to(input.device)
        out, pout = _ops.sort_chunks(input, sizes, order, probs, False)
        return out, (pout if probs is not None else None)
    if not input.is_cuda:
        V.same_device(op, input=input, split_sizes=split_sizes, sorted_idxs=sorted_idxs)
    for name, t in (("split_sizes", split_sizes), ("sorted_idxs", sorted_idxs)):
        if t.is_cuda and t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    split_sizes = split_sizes.to(input.device, non_blocking=True).contiguous()
    sorted_idxs = sorted_idxs.to(input.device, non_blocking=True).contiguous()
    if V.DEBUG:
        _check_values(split_sizes, sorted_idxs, input.shape[0], op)
    if torch.is_grad_enabled() and (input.requires_grad or (probs is not None and probs.requires_grad)):
        return _SortChunksFn.apply(input, probs, split_sizes, sorted_idxs)
    return _chunk_sort(input, probs, split_sizes, sorted_idxs, gather=False)
