"""Pure-torch reference of every moe_raw op: the seed's (Megatron / NeMo Automodel ``moe_utils``) semantics.

Used as the oracle of the tests (called on ``.double()`` inputs for an fp64 reference), as the "seed" provider of
the benchmark, and by the CPU path where its formula is the kernel's (``moe_raw._cpu`` builds row maps with it; the
activations run its formulas in fp32). It runs on any device.

Where the seed (the functions moe_raw replaces) is silent or differs from moe_raw's contract, this module
follows the contract (the README's API section):

* ``num_out_tokens`` without ``drop_and_pad``: the seed's unfused path ignores it. Here the output has exactly
  ``num_out_tokens`` rows: surplus routed pairs at the tail (expert-major order) are dropped, spare rows are zero
  with prob 0 and index 0. When ``num_out_tokens`` equals the routed count, the results are the seed's, bit for bit.
* ``drop_and_pad`` permute: padding rows (an expert with fewer than ``capacity`` routed tokens is padded with the
  lowest unrouted token ids, as the seed's stable argsort does) copy the padding token, as the seed does, but their
  permuted prob is 0 (``probs`` is read only at routed positions).
* ``unpermute`` with probs reads ``probs`` only at routed positions; padding rows are multiplied by 0 and skipped,
  so a NaN or inf anywhere off-route never reaches the output.
* ``fused=True`` returns moe_raw's row map (below) instead of Transformer Engine's; ``unpermute(fused=True)`` reads it.

The row map (``fused=True`` index format), int32, shape ``[T + 1, E]``:

* ``row_map[t, e] = r >= 0``: token ``t`` routed to expert ``e`` sits in permuted row ``r``;
* ``row_map[t, e] = -1``: not routed, or routed but dropped (over ``num_out_tokens`` or over capacity);
* ``row_map[t, e] = -2 - r``: token ``t`` is a padding copy in row ``r`` of expert ``e`` (``drop_and_pad`` only);
* ``row_map[T, 0]``: the number of leading permuted rows that hold a routed or padding token; rows after it are
  spare (zero) rows. ``row_map[T, 1:]`` is 0.
* Aligned layout (``permute_and_pad``), shape ``[T + 3, E]``: each expert's rows are followed by zero padding rows up
  to a multiple of ``align_size``; ``row_map[T, 0]`` is the padded total, and ``row_map[T + 1, e]`` /
  ``row_map[T + 2, e]`` are the first / one-past-last padding row of expert ``e``. The first ``T + 1`` lines are
  an ordinary row map of the padded rows, so ``unpermute(fused=True)`` reads it as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _capacity(num_out_tokens: int, num_tokens: int, num_experts: int) -> int:
    # The seed slices argsort(...)[:, :capacity]; a slice past the end keeps num_tokens columns.
    return min(num_out_tokens // num_experts, num_tokens)


def _routed_order(routing_map: torch.Tensor):
    """Token ids and expert ids of the routed pairs in expert-major, token-ascending order (the seed's order)."""
    num_tokens, num_experts = routing_map.shape
    mask_t = routing_map.bool().T.contiguous()
    tokens = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(num_experts, -1)
    experts = torch.arange(num_experts, device=routing_map.device).unsqueeze(1).expand(-1, num_tokens)
    return tokens.masked_select(mask_t), experts.masked_select(mask_t)


def _padded_order(routing_map: torch.Tensor, capacity: int):
    """Token ids [E * capacity] of the seed's drop_and_pad layout and whether each row is a routed pair."""
    num_tokens, num_experts = routing_map.shape
    mask_t = routing_map.bool().T.contiguous().to(torch.int8)
    token_ids = mask_t.argsort(dim=-1, descending=True, stable=True)[:, :capacity].contiguous()
    routed = torch.gather(mask_t, 1, token_ids).bool()
    return token_ids.reshape(-1), routed.reshape(-1)


def build_row_map(routing_map: torch.Tensor, num_out_tokens: int | None = None, drop_and_pad: bool = False):
    """The row map (module docstring) of ``routing_map [T, E]``. Returns ``(row_map [T+1, E] int32, n_rows)``."""
    num_tokens, num_experts = routing_map.shape
    dev = routing_map.device
    row_map = torch.full((num_tokens + 1, num_experts), -1, dtype=torch.int32, device=dev)
    row_map[num_tokens] = 0
    if drop_and_pad:
        if num_out_tokens is None:
            raise ValueError("drop_and_pad=True needs num_out_tokens")
        capacity = _capacity(num_out_tokens, num_tokens, num_experts)
        token_ids, routed = _padded_order(routing_map, capacity)
        rows = torch.arange(token_ids.numel(), device=dev, dtype=torch.int32)
        experts = torch.arange(num_experts, device=dev).repeat_interleave(capacity)
        row_map[token_ids, experts] = torch.where(routed, rows, -2 - rows)
        n_rows = num_experts * capacity
        row_map[num_tokens, 0] = n_rows
        return row_map, n_rows
    tokens, experts = _routed_order(routing_map)
    n_rows = tokens.numel() if num_out_tokens is None else num_out_tokens
    kept = min(tokens.numel(), n_rows)
    rows = torch.arange(kept, device=dev, dtype=torch.int32)
    row_map[tokens[:kept], experts[:kept]] = rows
    row_map[num_tokens, 0] = kept
    return row_map, n_rows


def permute_and_pad(tokens, routing_map, probs=None, align_size=16, num_out_tokens=None):
    """Reference of ``moe_raw.permute_and_pad``: returns (permuted [N, H], permuted_probs [N] or None, row_map
    [T + 3, E] int32 (aligned layout, module docstring), tokens_per_expert [E] int64, padded_tokens_per_expert [E]
    int64). Expert e keeps c_e of the first num_out_tokens routed pairs (expert-major) and gets roundup(c_e, align)
    rows, the real ones first. N = the padded total, or with num_out_tokens num_out_tokens + E * (align - 1)."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    dev = tokens.device
    tok_ids, exp_ids = _routed_order(routing_map)
    n_keep = tok_ids.numel() if num_out_tokens is None else min(num_out_tokens, tok_ids.numel())
    tok_ids, exp_ids = tok_ids[:n_keep], exp_ids[:n_keep]
    counts = torch.bincount(exp_ids, minlength=num_experts).to(torch.int64)
    padded = (counts + align_size - 1) // align_size * align_size
    pad_start = torch.cumsum(padded, 0) - padded  # first row of each expert
    expert_start = torch.cumsum(counts, 0) - counts
    rows = torch.arange(n_keep, device=dev) - expert_start[exp_ids] + pad_start[exp_ids]
    total = int(padded.sum())
    n_rows = total if num_out_tokens is None else num_out_tokens + num_experts * (align_size - 1)
    permuted = tokens.new_zeros((n_rows, hidden))
    permuted[rows] = tokens.index_select(0, tok_ids)
    permuted_probs = None
    if probs is not None:
        permuted_probs = torch.zeros(n_rows, dtype=probs.dtype, device=dev)
        permuted_probs[rows] = probs[tok_ids, exp_ids]
    row_map = torch.full((num_tokens + 3, num_experts), -1, dtype=torch.int32, device=dev)
    row_map[tok_ids, exp_ids] = rows.to(torch.int32)
    row_map[num_tokens] = 0
    row_map[num_tokens, 0] = total
    row_map[num_tokens + 1] = (pad_start + counts).to(torch.int32)
    row_map[num_tokens + 2] = (pad_start + padded).to(torch.int32)
    return permuted, permuted_probs, row_map, counts, padded


def permute_with_row_map(x, row_map, num_rows):
    """Reference of ``moe_raw.permute_with_row_map``: out [num_rows, ...] with out[r] = x[t] for every row r of token
    t in the row map (routed ``r``, padding copy ``-2 - r``), zero elsewhere. row_map: [T + 1, E] or the aligned
    [T + 3, E]; x: [T, ...]."""
    num_tokens = x.shape[0]
    body = row_map[:num_tokens].long()
    rows = torch.where(body >= 0, body, -2 - body)
    valid = (body != -1) & (rows < num_rows)
    token = torch.arange(num_tokens, device=x.device).unsqueeze(1).expand_as(body)
    out = x.new_zeros((num_rows, *x.shape[1:]))
    out[rows[valid]] = x[token[valid]]
    return out


def _sorted_indices_from_row_map(row_map: torch.Tensor, n_rows: int) -> torch.Tensor:
    num_tokens = row_map.shape[0] - 1
    body = row_map[:num_tokens].long()
    rows = torch.where(body >= 0, body, -2 - body)  # padding rows decoded; -1 entries become -1
    token = torch.arange(num_tokens, device=row_map.device).unsqueeze(1).expand_as(rows)
    valid = body != -1
    sorted_indices = torch.zeros(n_rows, dtype=torch.int64, device=row_map.device)
    sorted_indices[rows[valid]] = token[valid]
    return sorted_indices


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Reference permute; see ``moe_raw.permute`` for the contract. Returns (permuted, permuted_probs, indices)."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    dev = tokens.device
    if drop_and_pad and num_out_tokens is not None:
        capacity = _capacity(num_out_tokens, num_tokens, num_experts)
        sorted_indices, routed = _padded_order(routing_map, capacity)
        permuted = tokens.index_select(0, sorted_indices)
        permuted_probs = None
        if probs is not None:
            experts = torch.arange(num_experts, device=dev).repeat_interleave(capacity)
            picked = probs[sorted_indices, experts]
            permuted_probs = torch.where(routed, picked, torch.zeros_like(picked))
        n_rows = num_experts * capacity
    else:
        tok_ids, exp_ids = _routed_order(routing_map)
        n_rows = tok_ids.numel() if num_out_tokens is None else num_out_tokens
        kept = min(tok_ids.numel(), n_rows)
        sorted_indices = torch.zeros(n_rows, dtype=torch.int64, device=dev)
        sorted_indices[:kept] = tok_ids[:kept]
        permuted = tokens.new_zeros((n_rows, hidden))
        permuted[:kept] = tokens.index_select(0, sorted_indices[:kept])
        permuted_probs = None
        if probs is not None:
            permuted_probs = torch.zeros(n_rows, dtype=probs.dtype, device=dev)
            permuted_probs[:kept] = probs[tok_ids[:kept], exp_ids[:kept]]
    if fused:
        row_map, _ = build_row_map(routing_map, num_out_tokens, drop_and_pad and num_out_tokens is not None)
        return permuted, permuted_probs, row_map
    return permuted, permuted_probs, sorted_indices


def _unpermute_row_map(permuted_tokens, row_map, restore_shape, probs):
    num_tokens, hidden = restore_shape
    body = row_map[:num_tokens].long()
    out = torch.zeros(
        (num_tokens, hidden),
        dtype=torch.float64 if permuted_tokens.dtype == torch.float64 else torch.float32,
        device=permuted_tokens.device,
    )
    num_experts = body.shape[1]
    # Fixed order (ascending expert), fp32 accumulation: what the kernel does.
    for e in range(num_experts):
        col = body[:, e]
        routed = col >= 0
        padded = col <= -2
        take = routed if probs is not None else (routed | padded)
        rows = torch.where(routed, col, -2 - col).clamp(min=0)
        if permuted_tokens.shape[0] == 0:  # nothing to gather: every entry is -1
            continue
        contrib = permuted_tokens.index_select(0, rows.clamp(max=permuted_tokens.shape[0] - 1)).to(out.dtype)
        if probs is not None:
            w = torch.where(routed, probs[:, e].to(out.dtype), torch.zeros((), dtype=out.dtype, device=out.device))
            contrib = contrib * w.unsqueeze(1)
        out += torch.where(take.unsqueeze(1), contrib, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(permuted_tokens.dtype)


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape,
    probs: torch.Tensor | None = None,
    routing_map: torch.Tensor | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
):
    """Reference unpermute; see ``moe_raw.unpermute``. Sums every permuted row back into its token."""
    num_tokens, hidden = restore_shape
    if fused:
        return _unpermute_row_map(permuted_tokens, sorted_indices, restore_shape, probs)
    input_dtype = permuted_tokens.dtype
    if num_tokens == 0:  # a slice, not new_zeros: stays in the autograd graph (zero gradient), as on CUDA
        return permuted_tokens[:0] * 0
    if probs is not None and routing_map is None:
        raise ValueError("unpermute: routing_map is required when probs is given with fused=False")
    if routing_map is not None:
        # The routing map says which rows are routed, padding or spare (spare rows are skipped, as on CUDA).
        num_experts = routing_map.shape[1]
        n_rows = sorted_indices.numel()
        row_map, _ = build_row_map(
            routing_map, num_experts * (n_rows // num_experts) if drop_and_pad else n_rows, drop_and_pad
        )
        return _unpermute_row_map(permuted_tokens, row_map, restore_shape, probs)
    # The seed: scatter-add every row into its token (padding rows, and spare rows into token 0), in the tokens'
    # dtype. Spare rows are zero after permute, so they change nothing unless the experts make them nonzero.
    out = torch.zeros((num_tokens, hidden), dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    out.scatter_add_(0, sorted_indices.long().unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return out.to(input_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Chunk regrouping after an expert-parallel all-to-all (Megatron's sort_chunks_by_idxs, plus moe_raw's contract:
# rows past sum(split_sizes) stay in place instead of being cut off).


def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
    """input [N, ...] holds len(split_sizes) chunks back to back; returns (cat of the chunks in sorted_idxs order,
    then input's rows past sum(split_sizes) unchanged; probs [N] moved the same way, or None). Reads the sizes and
    indices on the host. ``fused`` is accepted for Megatron's signature and changes nothing."""
    sizes = [int(s) for s in split_sizes.tolist()]
    order = [int(i) for i in sorted_idxs.tolist()]
    total = sum(sizes)
    if min(sizes, default=0) < 0 or total > input.shape[0]:
        raise ValueError(f"sort_chunks_by_idxs: split_sizes must be >= 0 and sum to at most {input.shape[0]} rows")
    if sorted(order) != list(range(len(sizes))):
        raise ValueError(f"sort_chunks_by_idxs: sorted_idxs must be a permutation of 0..{len(sizes) - 1}")

    def regroup(x):
        chunks = torch.split(x[:total], sizes, dim=0)
        return torch.cat([chunks[i] for i in order] + [x[total:]], dim=0) if sizes else x.clone()

    return regroup(input), (regroup(probs) if probs is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU family: the seed's functions, eager (the seed wraps them in torch.compile; the benchmark does too).


def swiglu(y: torch.Tensor) -> torch.Tensor:
    y_1, y_2 = torch.chunk(y, 2, -1)
    return F.silu(y_1) * y_2


def weighted_swiglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    dtype = y.dtype
    res = swiglu(y) * weights
    return res.to(dtype)


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_1, y_2 = torch.chunk(y, 2, -1)
    return torch.cat(
        (g * torch.sigmoid(y_1) * (1 + y_1 * (1 - torch.sigmoid(y_1))) * y_2, g * F.silu(y_1)),
        -1,
    )


def weighted_swiglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, need_weight_grad: bool = True):
    input_dtype = y.dtype
    w_dtype = weights.dtype
    input_grad = swiglu_back(g * weights, y)
    if not need_weight_grad:
        return input_grad.to(input_dtype), None
    weights_grad = swiglu(y) * g.to(w_dtype)
    weights_grad = torch.sum(weights_grad, dim=-1, keepdim=True)
    return input_grad.to(input_dtype), weights_grad.to(w_dtype)


def _weighted_function(name, forward_fn, backward_fn):
    """The seed's Weighted<Act>Function for a weighted forward / backward pair (SwiGLU's; Automodel's GEGLU one is
    the same body with need_weight_grad)."""

    def forward(ctx, input, weights, fp8_input_store):
        input_for_backward = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(input_for_backward, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = fp8_input_store
        return forward_fn(input, weights)

    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        input = input.to(ctx.ori_input_dtype) if ctx.fp8_input_store else input
        tmp, wgrad = backward_fn(grad_output, input, weights, need_weight_grad=ctx.needs_input_grad[1])
        return tmp, wgrad, None

    namespace = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), namespace)


def _weighted_impl(function, input, weights, fp8_input_store):
    ori_shape = input.shape
    assert len(ori_shape) in [2, 3]
    input = input.view(-1, ori_shape[-1])
    output = function.apply(input, weights, fp8_input_store)
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], -1)


WeightedSwiGLUFunction = _weighted_function("WeightedSwiGLUFunction", weighted_swiglu, weighted_swiglu_back)


def weighted_bias_swiglu_impl(input, weights, fp8_input_store=False):
    return _weighted_impl(WeightedSwiGLUFunction, input, weights, fp8_input_store)


# Quick-GEGLU family (Megatron-LM megatron/core/fusions/fused_bias_geglu.py, NeMo Automodel's moe_utils) and gpt-oss's
# clamped SwiGLU: one gated form on the [gate | linear] halves of y (torch.chunk, as SwiGLU):
#   quick_glu(y) = gate' * sigmoid(alpha * gate') * (linear' + linear_offset),
#   gate' = gate.clamp(max=limit), linear' = linear.clamp(-limit, limit) (no clamp when limit is None).
# quick_geglu: alpha 1.702, no clamp. clamped_swiglu (gpt-oss): linear_offset 1. The clamp is Megatron's clamp_value
# (weighted_bias_quick_geglu_impl), whose gradient is torch.clamp's: passed where lo <= x <= hi, else 0.


def quick_gelu(y: torch.Tensor, alpha: float = 1.702) -> torch.Tensor:
    return y * torch.sigmoid(alpha * y)


def clamp_glu(y: torch.Tensor, limit: float) -> torch.Tensor:
    """[gate.clamp(max=limit) | linear.clamp(-limit, limit)]: Megatron's clamp_value, gpt-oss's limit."""
    y_1, y_2 = torch.chunk(y, 2, -1)
    return torch.cat((y_1.clamp(min=None, max=limit), y_2.clamp(min=-limit, max=limit)), -1)


def _clamp_grad(dy: torch.Tensor, y: torch.Tensor, limit: float) -> torch.Tensor:
    y_1, y_2 = torch.chunk(y, 2, -1)
    passed = torch.cat((y_1 <= limit, (y_2 >= -limit) & (y_2 <= limit)), -1)
    return torch.where(passed, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))


# cubic (moe_raw's kernels' form of the tanh-GELU gate, below): the gate is a * sigmoid(alpha * (a + cubic a^3)).


def quick_glu(y, alpha=1.702, linear_offset=0.0, limit=None, cubic=0.0):
    if limit is not None:
        y = clamp_glu(y, limit)
    y_1, y_2 = torch.chunk(y, 2, -1)
    arg = y_1 + cubic * y_1.pow(3) if cubic else y_1
    return y_1 * torch.sigmoid(alpha * arg) * (y_2 + linear_offset)


def weighted_quick_glu(y, weights, alpha=1.702, linear_offset=0.0, limit=None, cubic=0.0):
    return (quick_glu(y, alpha, linear_offset, limit, cubic) * weights).to(y.dtype)


def quick_glu_back(g, y, alpha=1.702, linear_offset=0.0, limit=None, cubic=0.0):
    y_c = clamp_glu(y, limit) if limit is not None else y
    y_1, y_2 = torch.chunk(y_c, 2, -1)
    arg = y_1 + cubic * y_1.pow(3) if cubic else y_1
    sigmoid_out = torch.sigmoid(alpha * arg)
    slope = alpha * y_1 * (1 + 3 * cubic * y_1.pow(2)) if cubic else alpha * y_1  # y_1 * d(alpha * arg)/dy_1
    dy_1 = g * sigmoid_out * (1 + slope * (1 - sigmoid_out)) * (y_2 + linear_offset)
    dy = torch.cat((dy_1, g * y_1 * sigmoid_out), -1)
    return _clamp_grad(dy, y, limit) if limit is not None else dy


def weighted_quick_glu_back(
    g, y, weights, alpha=1.702, linear_offset=0.0, limit=None, cubic=0.0, *, need_weight_grad=True
):
    input_grad = quick_glu_back(g * weights, y, alpha, linear_offset, limit, cubic)
    if not need_weight_grad:
        return input_grad.to(y.dtype), None
    weights_grad = quick_glu(y, alpha, linear_offset, limit, cubic) * g.to(weights.dtype)
    weights_grad = torch.sum(weights_grad, dim=-1, keepdim=True)
    return input_grad.to(y.dtype), weights_grad.to(weights.dtype)


def quick_geglu(y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    return quick_glu(y, 1.702, linear_offset)


def weighted_quick_geglu(y: torch.Tensor, weights: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    return weighted_quick_glu(y, weights, 1.702, linear_offset)


def quick_geglu_back(g: torch.Tensor, y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    return quick_glu_back(g, y, 1.702, linear_offset)


def weighted_quick_geglu_back(
    g: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    linear_offset: float = 0.0,
    *,
    need_weight_grad: bool = True,
):
    return weighted_quick_glu_back(g, y, weights, 1.702, linear_offset, need_weight_grad=need_weight_grad)


class WeightedQuickGeGLUFunction(torch.autograd.Function):
    # Megatron's (input, weights, fp8_input_store, linear_offset), plus moe_raw's alpha; its clamp stays outside.
    @staticmethod
    def forward(ctx, input, weights, fp8_input_store, linear_offset, alpha=1.702):
        input_for_backward = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(input_for_backward, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = fp8_input_store
        ctx.act = (alpha, float(linear_offset))
        return weighted_quick_glu(input, weights, alpha, float(linear_offset))

    @staticmethod
    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        input = input.to(ctx.ori_input_dtype) if ctx.fp8_input_store else input
        input_grad, wgrad = weighted_quick_glu_back(grad_output, input, weights, *ctx.act)
        return input_grad, wgrad, None, None, None


def weighted_bias_quick_geglu_impl(
    input, bias, weights, fp8_input_store=False, linear_offset=0.0, clamp_value=None, alpha=1.702
):
    # Megatron's order: clamp (torch ops, autograd), then the bias, then the weighted Quick-GEGLU, in input.dtype.
    # Megatron adds the bias inside WeightedBiasQuickGeGLUFunction: the same values and gradients (its fp8 copy is of
    # the input before the bias).
    ori_shape, ori_dtype = input.shape, input.dtype
    assert len(ori_shape) in [2, 3]
    if clamp_value is not None:
        input = clamp_glu(input, clamp_value)
    if bias is not None:
        input = input + bias
    input = input.reshape(-1, ori_shape[-1])
    output = WeightedQuickGeGLUFunction.apply(input, weights, fp8_input_store, linear_offset, alpha).to(ori_dtype)
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], -1)


def clamped_swiglu(y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    return quick_glu(y, alpha, 1.0, limit)


def weighted_clamped_swiglu(y: torch.Tensor, weights: torch.Tensor, alpha: float = 1.702, limit: float = 7.0):
    return weighted_quick_glu(y, weights, alpha, 1.0, limit)


def clamped_swiglu_back(g: torch.Tensor, y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    return quick_glu_back(g, y, alpha, 1.0, limit)


def weighted_clamped_swiglu_back(g, y, weights, alpha: float = 1.702, limit: float = 7.0, *, need_weight_grad=True):
    return weighted_quick_glu_back(g, y, weights, alpha, 1.0, limit, need_weight_grad=need_weight_grad)


# GEGLU (tanh-approximated GELU gate; NeMo Automodel 0.7's moe_utils, used by Gemma4 MoE experts). Written as the
# package writes it (F.gelu(approximate="tanh") and its explicit derivative); moe_raw's kernels compute the same
# function as quick_glu with alpha = 2 sqrt(2 / pi), cubic = 0.044715 (0.5 (1 + tanh(z)) = sigmoid(2 z)).


def geglu(y: torch.Tensor) -> torch.Tensor:
    y_1, y_2 = torch.chunk(y, 2, -1)
    return F.gelu(y_1, approximate="tanh") * y_2


def weighted_geglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (geglu(y) * weights).to(y.dtype)


def geglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_1, y_2 = torch.chunk(y, 2, -1)
    k, c = 0.7978845608028654, 0.044715
    tanh_inner = torch.tanh(k * (y_1 + c * y_1.pow(3)))
    gelu_grad = 0.5 * (1.0 + tanh_inner) + 0.5 * y_1 * (1.0 - tanh_inner.pow(2)) * k * (1.0 + 3.0 * c * y_1.pow(2))
    return torch.cat((g * gelu_grad * y_2, g * F.gelu(y_1, approximate="tanh")), -1)


def weighted_geglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, need_weight_grad: bool = True):
    input_grad = geglu_back(g * weights, y)
    if not need_weight_grad:
        return input_grad.to(y.dtype), None
    weights_grad = torch.sum(geglu(y) * g.to(weights.dtype), dim=-1, keepdim=True)
    return input_grad.to(y.dtype), weights_grad.to(weights.dtype)


WeightedGEGLUFunction = _weighted_function("WeightedGEGLUFunction", weighted_geglu, weighted_geglu_back)


def weighted_bias_geglu_impl(input, weights, fp8_input_store=False):
    return _weighted_impl(WeightedGEGLUFunction, input, weights, fp8_input_store)


# ----------------------------------------------------------------------------------------------------------------
# Router (Megatron-LM main's moe_utils): score function, (group-limited) top-k, the aux-loss scores and losses.
# ``select(scores, k) -> (values, indices)`` ranks: torch.topk (Megatron's, whose choice among equal values is
# unspecified) or ``stable_topk`` (moe_raw's CPU path and kernel: the lower expert index first among equal values).


def stable_topk(scores: torch.Tensor, k: int):
    """torch.topk's values and indices, larger first, the lower index first among equal values (NaN first)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _torch_topk(scores: torch.Tensor, k: int):
    return torch.topk(scores, k=k, dim=-1)


def group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk, select=_torch_topk):
    """Top-k inside the ``group_topk`` groups (of E / num_groups consecutive experts) whose top (topk / group_topk)
    scores sum highest: (values [T, K], indices [T, K])."""
    # Megatron views [T, G, -1], which fails at T = 0; the group size is spelled out here
    group_scores = select(scores.view(num_tokens, num_groups, num_experts // num_groups), topk // group_topk)[0]
    group_scores = group_scores.sum(dim=-1)
    group_idx = select(group_scores, group_topk)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups)
    masked = scores.masked_fill(~score_mask.reshape(num_tokens, num_experts).bool(), float("-inf"))
    return select(masked, topk)


def _scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """sigmoid or sqrt(softplus) of the logits, in fp32."""
    if score_function == "sigmoid":
        return torch.sigmoid(logits.float())
    return F.softplus(logits.float()).sqrt()


def topk_routing_with_score_function(
    logits, topk, use_pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None,
    score_function="softmax", expert_bias=None, dense_output=False, select=_torch_topk,
):  # fmt: skip
    """Megatron main: (probs [T, E], routing_map [T, E] bool), or with dense_output (probs [T, K], indices [T, K]).
    fp32 in between, probs in the logits' dtype; expert_bias ranks sigmoid / sqrtsoftplus scores only."""
    num_tokens, num_experts = logits.shape

    def pick(scores):
        if group_topk:
            return group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk, select)
        return select(scores, topk)

    if score_function == "softmax":
        if use_pre_softmax:
            probs, top_indices = pick(torch.softmax(logits, dim=-1, dtype=torch.float32))
        else:
            scores, top_indices = pick(logits)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        scores = _scores(logits, score_function)
        if expert_bias is not None:
            top_indices = pick(scores + expert_bias.float())[1]
            scores = torch.gather(scores, dim=1, index=top_indices)
        else:
            scores, top_indices = pick(scores)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    if scaling_factor:
        probs = probs * scaling_factor
    probs = probs.type_as(logits)
    if dense_output:
        return probs, top_indices
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def compute_routing_scores_for_aux_loss(logits, topk, score_function, padding_mask=None, select=_torch_topk):
    """Megatron main: (routing_map [T, E] bool, scores [T, E] fp32): softmax, or the score over its row sum + 1e-20,
    and the map of its top-k. ``padding_mask`` [T] bool, True = padding (the row is zeroed), as Megatron's code."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = _scores(logits, score_function)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    top_indices = select(scores, topk)[1]
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    if padding_mask is not None:
        valid = (~padding_mask).unsqueeze(-1)
        routing_map, scores = routing_map * valid, scores * valid
    return routing_map, scores


def switch_load_balancing_loss_func(
    probs, tokens_per_expert, total_num_tokens, topk, num_experts, moe_aux_loss_coeff, padding_mask=None
):
    """Megatron: sum_e(sum_t probs[t, e] * tokens_per_expert[e]) * E * coeff / (K * T^2). ``padding_mask`` [T] bool,
    True = a valid token here (Megatron's two functions read the mask with opposite meanings; both are kept)."""
    if padding_mask is not None:
        probs = probs * padding_mask.unsqueeze(-1)
    scale = num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(probs.sum(dim=0) * tokens_per_expert) * scale


def z_loss_func(logits, z_loss_coeff, padding_mask=None):
    """Megatron: mean over tokens of logsumexp(logits)^2, times the coefficient; ``padding_mask`` True = padding."""
    z = torch.square(torch.logsumexp(logits, dim=-1))
    if padding_mask is None:
        return torch.mean(z) * z_loss_coeff
    valid = ~padding_mask
    return (z * valid).sum() / torch.clamp(valid.sum(), min=1.0) * z_loss_coeff
