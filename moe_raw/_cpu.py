"""The row kernels' torch twins: what kernels/permute.cu computes, for tensors that are not on a CUDA device.

The autograd Functions of ``permutation`` / ``padding`` call these in place of the CUDA launchers, so a CPU tensor
takes the same code path, the same autograd graph and the same gradients as a CUDA one (issue 13: the CPU path used
to be the torch reference under torch's autograd, which kept an fp32 ``[T, H]`` tensor per expert alive and ran out
of memory on the README's example). Each function returns what its CUDA launcher returns, with the same rules:

* rows summed in fp32 (fp64 for fp64) in ascending expert order, starting from 0, rounded once (``index_add_`` on
  CPU adds the pairs in index order, so the order is fixed: deterministic);
* a row id outside ``[0, N)`` is skipped (summed into no token, zero gradient), as the kernels' bounds checks do;
* probs are read only at routed pairs; padding copies count only in an unweighted sum.

Memory is O(T * H + N * H): no per-expert tensors, no Python loop over experts or tokens. The per-pair fp32 rows
are made in chunks of at most ``_CHUNK_BYTES``.

The row map format is documented in ``moe_raw.reference``.
"""

from __future__ import annotations

import torch

from moe_raw import reference

_CHUNK_BYTES = 64 << 20  # fp32 rows made at a time: bounds the temporaries whatever N * H is


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spans(n_pairs: int, row_elems: int):
    """Slices of [0, n_pairs) holding at most _CHUNK_BYTES of fp32 rows each (at least one pair)."""
    step = max(1, _CHUNK_BYTES // max(1, 4 * row_elems))
    return [slice(i, min(i + step, n_pairs)) for i in range(0, n_pairs, step)]


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """1-byte tensors (fp8) as uint8: index_select has no kernel for every 1-byte float type; a move is a move."""
    return x.view(torch.uint8) if x.element_size() == 1 and x.dtype != torch.uint8 else x


def decode(row_map: torch.Tensor, num_tokens: int, n_rows: int):
    """The row map's first T lines [T, E] decoded: (row of each entry (int64), routed?, padding copy?), with row
    ids outside [0, n_rows) neither routed nor padding."""
    body = row_map[:num_tokens].long()
    pad_row = -2 - body
    rows = torch.where(body >= 0, body, pad_row)
    routed = (body >= 0) & (body < n_rows)
    padded = (body <= -2) & (pad_row < n_rows)
    return rows, routed, padded


def row_map(routing_map, n_rows, drop_and_pad):
    """The row map [T+1, E] int32 of permute(routing_map, num_out_tokens=n_rows, drop_and_pad)."""
    return reference.build_row_map(routing_map, n_rows, drop_and_pad)[0]


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    """(permuted [N, H], permuted_probs [N] | None, row_map [T+1, E] int32, sorted_indices [N] int64): the outputs
    of kernels/permute.cu's routing_pack + routing_scan + permute_scatter. Spare rows are zero, prob 0, index 0."""
    num_tokens, hidden = tokens.shape
    row_map, n_rows = reference.build_row_map(routing_map, num_out_tokens, drop_and_pad)
    rows, _, _ = decode(row_map, num_tokens, n_rows)
    owned = row_map[:num_tokens] != -1  # routed or padding entries: each owns one row
    t_idx, e_idx = owned.nonzero(as_tuple=True)
    dst = rows[t_idx, e_idx]
    out = torch.zeros((n_rows, hidden), dtype=tokens.dtype, device=tokens.device)
    src_b, out_b = _bytes(tokens), _bytes(out)
    for s in _spans(dst.numel(), hidden):
        out_b.index_copy_(0, dst[s], src_b.index_select(0, t_idx[s]))
    indices = torch.zeros(n_rows, dtype=torch.int64, device=tokens.device)
    indices.index_copy_(0, dst, t_idx)
    pprobs = None
    if probs is not None:
        pprobs = torch.zeros(n_rows, dtype=probs.dtype, device=tokens.device)
        routed = row_map[t_idx, e_idx] >= 0  # padding copies get prob 0
        picked = probs[t_idx, e_idx]
        pprobs.index_copy_(0, dst, torch.where(routed, picked, torch.zeros((), dtype=probs.dtype)))
    return out, pprobs, row_map, indices


def _sum_into_tokens(rows, num_tokens, t_idx, src, weights=None):
    """out [T, H] = sum over pairs j (in order) of weights[j] * rows[src[j]] into token t_idx[j]; fp32 (fp64 for
    fp64) accumulation, rounded once to rows.dtype."""
    hidden = rows.shape[1]
    acc = _acc(rows.dtype)
    out = torch.zeros((num_tokens, hidden), dtype=acc, device=rows.device)
    for s in _spans(src.numel(), hidden):
        part = rows.index_select(0, src[s]).to(acc)
        if weights is not None:
            part.mul_(weights[s].unsqueeze(1))
        out.index_add_(0, t_idx[s], part)
    return out.to(rows.dtype)


def gather(rows, row_map, num_tokens, probs=None, g_pprobs=None, dprobs_dtype=None):
    """Twin of gather_reduce: (out [T, H] | None, dprobs [T, E] | None).

    out[t] = sum of token t's rows in ascending expert order: routed rows times probs[t, e] (probs given), or routed
    and padding rows with weight 1. rows None computes dprobs only. dprobs[t, e] = g_pprobs[row] at routed pairs,
    else 0 (permute's probs gradient).
    """
    n_rows = rows.shape[0] if rows is not None else g_pprobs.shape[0]
    rmap, routed, padded = decode(row_map, num_tokens, n_rows)
    dprobs = None
    if g_pprobs is not None:
        dprobs = torch.zeros(rmap.shape, dtype=dprobs_dtype, device=row_map.device)
        if n_rows:  # (with no rows nothing is routed)
            picked = g_pprobs.index_select(0, torch.where(routed, rmap, 0).flatten()).view(rmap.shape)
            dprobs = torch.where(routed, picked.to(dprobs_dtype), dprobs)
    if rows is None:
        return None, dprobs
    take = routed if probs is not None else routed | padded
    t_idx, e_idx = take.nonzero(as_tuple=True)  # token-major, ascending expert: the kernel's sum order
    weights = probs[t_idx, e_idx].to(_acc(rows.dtype)) if probs is not None else None
    return _sum_into_tokens(rows, num_tokens, t_idx, rmap[t_idx, e_idx], weights), dprobs


def gather_csr(rows, sorted_indices, num_tokens):
    """Twin of gather_reduce over sorted_indices [N] (unpermute without routing_map): out[t] = sum of the rows whose
    index is t, in ascending row order; rows whose index is outside [0, T) are summed into no token."""
    index = sorted_indices.long()
    src = ((index >= 0) & (index < num_tokens)).nonzero().squeeze(1)
    return _sum_into_tokens(rows, num_tokens, index[src], src)


def unpermute_bwd(grad_out, rows, row_map, n_rows, probs, need_dprobs):
    """Twin of unpermute_bwd: (d_rows [N, H], dprobs [T, E] | None).

    d_rows[r] = grad_out[t] * probs[t, e] for token t's routed row r (weight 1 without probs); a padding row gets
    grad_out[t] without probs and 0 with them; rows of no token are 0. dprobs[t, e] = dot(grad_out[t], rows[r]) in
    fp32 at routed pairs, else 0.
    """
    num_tokens, hidden = grad_out.shape
    dtype, acc = grad_out.dtype, _acc(grad_out.dtype)
    rmap, routed, padded = decode(row_map, num_tokens, n_rows)
    t_idx, e_idx = (routed | padded).nonzero(as_tuple=True)
    dst = rmap[t_idx, e_idx]
    weights = None
    if probs is not None:
        is_routed = routed[t_idx, e_idx]
        weights = torch.where(is_routed, probs[t_idx, e_idx].to(acc), torch.zeros((), dtype=acc))
    d_rows = torch.zeros((n_rows, hidden), dtype=dtype, device=grad_out.device)
    for s in _spans(dst.numel(), hidden):
        part = grad_out.index_select(0, t_idx[s])
        if weights is not None:
            w = weights[s].unsqueeze(1)
            # w == 0 gives an exact 0 (as the kernel), even where the gradient is inf or NaN
            part = torch.where(w == 0, torch.zeros((), dtype=acc), part.to(acc) * w).to(dtype)
        d_rows.index_copy_(0, dst[s], part)
    dprobs = None
    if need_dprobs:
        dprobs = torch.zeros((num_tokens, rmap.shape[1]), dtype=acc, device=grad_out.device)
        rt, re = routed.nonzero(as_tuple=True)
        r_src = rmap[rt, re]
        dots = torch.empty(rt.numel(), dtype=acc, device=grad_out.device)
        for s in _spans(rt.numel(), 2 * hidden):
            g = grad_out.index_select(0, rt[s]).to(acc)
            dots[s] = (g * rows.index_select(0, r_src[s]).to(acc)).sum(1)
        dprobs[rt, re] = dots
        dprobs = dprobs.to(probs.dtype)
    return d_rows, dprobs
