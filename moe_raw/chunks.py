"""sort_chunks_by_idxs: regroup the chunks an expert-parallel all-to-all delivers (kernels/chunks.cu), with autograd.

After the all-to-all, rank-major chunks [rank 0: expert 0, expert 1, ..., rank 1: expert 0, ...] must become
expert-major for the grouped GEMM, and back again before the return all-to-all. Megatron does it with
``torch.split(input, split_sizes.tolist())`` and a ``torch.cat`` in ``sorted_idxs.tolist()`` order: two host syncs
and S copies. Here it is one launch that reads both index tensors on the device.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _ops
from moe_raw import _validate as V
from moe_raw._kernels import dispatch as D

_INDEX_DTYPES = (torch.int32, torch.int64)

__all__ = ["sort_chunks_by_idxs"]


class _SortChunksFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, split_sizes, sorted_idxs):
        ctx.save_for_backward(split_sizes, sorted_idxs)
        ctx.has_probs = probs is not None
        return D._chunk_sort(x, probs, split_sizes, sorted_idxs, gather=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_probs):
        split_sizes, sorted_idxs = ctx.saved_tensors
        grad_in, grad_p = D._chunk_sort(
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
    if not 1 <= n_splits <= D.MAX_SPLITS:
        raise ValueError(f"{op}: split_sizes must have 1 to {D.MAX_SPLITS} entries, got {n_splits}")
    if input.shape[0] > V.MAX_ROWS:
        raise ValueError(f"{op}: at most {V.MAX_ROWS} rows are supported, input has {input.shape[0]}")
    if probs is not None:
        V.tensor(probs, "probs", op, 1, V.FLOAT_DTYPES)
        if probs.shape[0] != input.shape[0]:
            raise ValueError(f"{op}: probs must be [N] = [{input.shape[0]}], got {tuple(probs.shape)}")
        V.same_device(op, input=input, probs=probs)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
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
    return D._chunk_sort(input, probs, split_sizes, sorted_idxs, gather=False)
