"""torch.library custom ops: what the public functions call while ``torch.compile`` traces them.

Eager calls never come here (the dispatcher costs microseconds on a path measured in microseconds): each public
function validates its arguments, then, only under ``torch.compiler.is_compiling()``, returns the op below
instead of running its eager code. Each op has a fake (meta) implementation for tracing and, where the public
function is differentiable, an autograd formula whose backward is itself a custom op, so forward and backward
graphs both compile without graph breaks. The real implementations call the same device-dispatching helpers as
the eager autograd Functions (CUDA launchers, or their torch twins for other devices), so each forward and
backward formula exists once and ``torch.compile`` works end to end on CPU too.

Schemas have no optional outputs: a tensor the eager API returns as None (permuted_probs without probs, sorted
indices with fused=True) is an empty tensor here, mapped back to None / the right tensor by the caller.
"""

from __future__ import annotations

import torch

from moe_raw import _launch
from moe_raw import reference as R
from moe_raw._kernels import dispatch as D
from moe_raw._kernels import glu_launch as GL
from moe_raw._kernels import router as RK
from moe_raw._kernels.glu_codegen import Act

_EMPTY = (0,)


# ----------------------------------------------------------------------------------------------------------------
# permute


@torch.library.custom_op("moe_raw::permute", mutates_args=())
def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None,
    num_out_tokens: int | None,
    fused: bool,
    drop_and_pad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(permuted [N, H], permuted_probs [N] (empty without probs), row_map [T+1, E], sorted_indices [N] (empty with
    fused=True)). The row map is always returned: the backward reads it."""
    out, pprobs, index, row_map = D._permute_forward(tokens, probs, routing_map, num_out_tokens, drop_and_pad, fused)
    indices = index if not fused else torch.empty(_EMPTY, dtype=torch.int64, device=tokens.device)
    if pprobs is None:
        pprobs = torch.empty(_EMPTY, dtype=torch.float32, device=tokens.device)
    return out, pprobs, row_map, indices


@permute.register_fake
def _(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad):
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    if num_out_tokens is None:
        n_rows = torch.library.get_ctx().new_dynamic_size()  # the routed count: known only on the device
    elif drop_and_pad:
        n_rows = num_experts * torch.sym_min(num_out_tokens // num_experts, num_tokens)
    else:
        n_rows = num_out_tokens
    out = tokens.new_empty((n_rows, hidden))
    pprobs = probs.new_empty((n_rows,)) if probs is not None else tokens.new_empty(_EMPTY, dtype=torch.float32)
    row_map = tokens.new_empty((num_tokens + 1, num_experts), dtype=torch.int32)
    indices = tokens.new_empty(_EMPTY if fused else (n_rows,), dtype=torch.int64)
    return out, pprobs, row_map, indices


@torch.library.custom_op("moe_raw::permute_backward", mutates_args=())
def permute_backward(
    grad_permuted: torch.Tensor,
    grad_pprobs: torch.Tensor | None,
    row_map: torch.Tensor,
    probs_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d tokens [T, H], d probs [T, E] (empty without grad_pprobs)): each token's rows summed (padding copies too);
    dprobs[t, e] = grad_pprobs[row] at routed pairs, else 0."""
    num_tokens, num_experts = row_map.shape[0] - 1, row_map.shape[1]
    dev = grad_permuted.device
    g_pp = grad_pprobs.contiguous() if grad_pprobs is not None else None
    dtok, dprobs = D._gather(grad_permuted, row_map, num_tokens, g_pprobs=g_pp, dprobs_dtype=probs_dtype)
    if dprobs is None:  # no probs gradient asked for (empty), or T = 0
        shape = _EMPTY if grad_pprobs is None else (num_tokens, num_experts)
        dprobs = torch.zeros(shape, dtype=probs_dtype, device=dev)
    return dtok, dprobs


@permute_backward.register_fake
def _(grad_permuted, grad_pprobs, row_map, probs_dtype):
    num_tokens, num_experts = row_map.shape[0] - 1, row_map.shape[1]
    dtok = grad_permuted.new_empty((num_tokens, grad_permuted.shape[1]))
    shape = _EMPTY if grad_pprobs is None else (num_tokens, num_experts)
    return dtok, grad_permuted.new_empty(shape, dtype=probs_dtype)


def _permute_setup(ctx, inputs, output):
    tokens, _, probs = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(output[2])
    ctx.tokens_dtype = tokens.dtype
    ctx.probs_dtype = probs.dtype if probs is not None else torch.float32


def _permute_backward(ctx, grad_permuted, grad_pprobs, _grad_row_map, _grad_indices):
    (row_map,) = ctx.saved_tensors
    need_probs = ctx.needs_input_grad[2]
    # dprobs stays None when permuted_probs gets no gradient (as in the eager backward)
    g_pp = grad_pprobs if need_probs else None
    dtok, dprobs = permute_backward(grad_permuted, g_pp, row_map, ctx.probs_dtype)
    return (dtok if ctx.needs_input_grad[0] else None), None, (dprobs if need_probs else None), None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# ----------------------------------------------------------------------------------------------------------------
# unpermute


@torch.library.custom_op("moe_raw::unpermute", mutates_args=())
def unpermute(
    permuted: torch.Tensor,
    index: torch.Tensor,
    probs: torch.Tensor | None,
    routing_map: torch.Tensor | None,
    num_tokens: int,
    fused: bool,
    drop_and_pad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], row map built from routing_map (fused=False with routing_map; else empty)). index: the fused row
    map ([T+1, E] or [T+3, E]) or sorted_indices [N]."""
    n_rows = permuted.shape[0]
    built = None
    row_map, sorted_indices = (index.contiguous(), None) if fused else (None, index)
    if routing_map is not None and not fused:
        row_map = built = D._row_map_from_routing(routing_map, n_rows, drop_and_pad)
    out = D._unpermute_forward(permuted, probs, row_map, sorted_indices, num_tokens)
    if built is None:
        built = torch.empty((0, 0), dtype=torch.int32, device=permuted.device)
    return out, built


@unpermute.register_fake
def _(permuted, index, probs, routing_map, num_tokens, fused, drop_and_pad):
    out = permuted.new_empty((num_tokens, permuted.shape[1]))
    shape = (num_tokens + 1, routing_map.shape[1]) if (routing_map is not None and not fused) else (0, 0)
    return out, permuted.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("moe_raw::unpermute_backward", mutates_args=())
def unpermute_backward(
    grad_out: torch.Tensor,
    permuted: torch.Tensor | None,
    row_map: torch.Tensor | None,
    sorted_indices: torch.Tensor | None,
    probs: torch.Tensor | None,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [N, H], d probs [T, E] (empty unless permuted is given)). row_map None: the CSR path over
    sorted_indices (each row takes its token's gradient). permuted is given only when probs need a gradient."""
    need_dprobs = permuted is not None
    d_rows, dprobs = D._unpermute_backward(grad_out, permuted, row_map, sorted_indices, probs, n_rows, need_dprobs)
    if dprobs is None:  # custom ops return tensors: an empty one stands for "no probs gradient"
        dprobs = grad_out.new_empty(_EMPTY)
    return d_rows, dprobs


@unpermute_backward.register_fake
def _(grad_out, permuted, row_map, sorted_indices, probs, n_rows):
    d_rows = grad_out.new_empty((n_rows, grad_out.shape[1]))
    return d_rows, (probs.new_empty(probs.shape) if permuted is not None else grad_out.new_empty(_EMPTY))


def _unpermute_setup(ctx, inputs, output):
    permuted, index, probs, routing_map, num_tokens, fused, _ = inputs
    ctx.n_rows = permuted.shape[0]
    ctx.csr = not fused and routing_map is None
    row_map = index if fused else output[1]
    # the rows are read back only for the gradient of probs
    keep_rows = probs is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(row_map, index, probs, permuted if keep_rows else None)


def _unpermute_backward(ctx, grad_out, _grad_row_map):
    row_map, index, probs, permuted = ctx.saved_tensors
    need_probs = permuted is not None
    if ctx.csr:
        d_rows, _ = unpermute_backward(grad_out, None, None, index, None, ctx.n_rows)
    else:
        d_rows, dprobs = unpermute_backward(grad_out, permuted, row_map, None, probs, ctx.n_rows)
    return (d_rows if ctx.needs_input_grad[0] else None), None, (dprobs if need_probs else None), None, None, None, None


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ----------------------------------------------------------------------------------------------------------------
# Gated activations: one op per form for the whole family (SwiGLU, Quick-GEGLU, clamped SwiGLU), the activation
# given as (alpha, linear_offset, limit, cubic) as in moe_raw.activations (SwiGLU is (1, 0, None, 0)).


@torch.library.custom_op("moe_raw::glu", mutates_args=())
def glu(y: torch.Tensor, alpha: float, linear_offset: float, limit: float | None, cubic: float) -> torch.Tensor:
    """y [..., 2F] -> [..., F] in y.dtype (moe_raw.swiglu / quick_geglu / clamped_swiglu)."""
    out = GL._glu_fwd(GL._as_2d(y), None, Act(alpha, linear_offset, limit, cubic))
    return out.view(*y.shape[:-1], out.shape[1])


@glu.register_fake
def _(y, alpha, linear_offset, limit, cubic):
    return y.new_empty((*y.shape[:-1], y.shape[-1] // 2))


@torch.library.custom_op("moe_raw::weighted_glu", mutates_args=())
def weighted_glu(
    y: torch.Tensor, weights: torch.Tensor, alpha: float, linear_offset: float, limit: float | None, cubic: float
) -> torch.Tensor:
    """y [N, 2F], weights [N, 1] -> act(y) * weights [N, F] in y.dtype."""
    return GL._glu_fwd(y, weights, Act(alpha, linear_offset, limit, cubic))


@weighted_glu.register_fake
def _(y, weights, alpha, linear_offset, limit, cubic):
    return y.new_empty((y.shape[0], y.shape[1] // 2))


@torch.library.custom_op("moe_raw::glu_back", mutates_args=())
def glu_back(
    g: torch.Tensor, y: torch.Tensor, alpha: float, linear_offset: float, limit: float | None, cubic: float
) -> torch.Tensor:
    """dy [..., 2F] in promote(g.dtype, y.dtype)."""
    out_dtype = torch.promote_types(g.dtype, y.dtype)
    act = Act(alpha, linear_offset, limit, cubic)
    return GL._glu_bwd(GL._as_2d(g), GL._as_2d(y), None, act, out_dtype)[0].view(y.shape)


@glu_back.register_fake
def _(g, y, alpha, linear_offset, limit, cubic):
    return y.new_empty(y.shape, dtype=torch.promote_types(g.dtype, y.dtype))


@torch.library.custom_op("moe_raw::weighted_glu_back", mutates_args=())
def weighted_glu_back(
    g: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    linear_offset: float,
    limit: float | None,
    cubic: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype)."""
    return GL._glu_bwd(g, y, weights, Act(alpha, linear_offset, limit, cubic), y.dtype)


@weighted_glu_back.register_fake
def _(g, y, weights, alpha, linear_offset, limit, cubic):
    return y.new_empty(y.shape), weights.new_empty((y.shape[0], 1))


@torch.library.custom_op("moe_raw::weighted_glu_fn", mutates_args=())
def weighted_glu_fn(
    input: torch.Tensor,
    weights: torch.Tensor,
    fp8_input_store: bool,
    alpha: float,
    linear_offset: float,
    limit: float | None,
    cubic: float,
) -> torch.Tensor:
    """weighted_glu with autograd: WeightedSwiGLUFunction / WeightedQuickGeGLUFunction (weighted_bias_*_impl)."""
    return weighted_glu(input, weights, alpha, linear_offset, limit, cubic)


@weighted_glu_fn.register_fake
def _(input, weights, fp8_input_store, alpha, linear_offset, limit, cubic):
    return input.new_empty((input.shape[0], input.shape[1] // 2))


def _weighted_glu_setup(ctx, inputs, output):
    input, weights, fp8_input_store, *act = inputs
    # fp8_input_store: the input is kept for backward as float8_e4m3fn (half of bf16's memory), as the seed does
    ctx.save_for_backward(input.to(torch.float8_e4m3fn) if fp8_input_store else input, weights)
    ctx.input_dtype, ctx.act = input.dtype, tuple(act)


def _weighted_glu_backward(ctx, grad_output):
    input, weights = ctx.saved_tensors
    dinput, dweights = weighted_glu_back(grad_output, input.to(ctx.input_dtype), weights, *ctx.act)
    need = ctx.needs_input_grad
    return (dinput if need[0] else None), (dweights if need[1] else None), None, None, None, None, None


weighted_glu_fn.register_autograd(_weighted_glu_backward, setup_context=_weighted_glu_setup)


# ----------------------------------------------------------------------------------------------------------------
# sort_chunks_by_idxs, permute_and_pad, permute_with_row_map


@torch.library.custom_op("moe_raw::sort_chunks", mutates_args=())
def sort_chunks(
    x: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor, probs: torch.Tensor | None, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N, ...], probs [N] (empty without probs)) regrouped by sorted_idxs, or (inverse=True, the backward)
    put back where they came from. Split sizes and indices stay on the device."""
    out, pout = D._chunk_sort(x, probs, split_sizes, sorted_idxs, gather=inverse)
    return out, (pout if pout is not None else torch.empty(_EMPTY, dtype=torch.float32, device=x.device))


@sort_chunks.register_fake
def _(x, split_sizes, sorted_idxs, probs, inverse):
    pout = probs.new_empty(probs.shape) if probs is not None else x.new_empty(_EMPTY, dtype=torch.float32)
    return x.new_empty(x.shape), pout


def _sort_chunks_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.has_probs, ctx.inverse = inputs[3] is not None, inputs[4]


def _sort_chunks_backward(ctx, grad_out, grad_probs):
    split_sizes, sorted_idxs = ctx.saved_tensors
    d_x, d_probs = sort_chunks(
        grad_out, split_sizes, sorted_idxs, grad_probs if ctx.has_probs else None, not ctx.inverse
    )
    return d_x, None, None, (d_probs if ctx.has_probs else None), None


sort_chunks.register_autograd(_sort_chunks_backward, setup_context=_sort_chunks_setup)


@torch.library.custom_op("moe_raw::permute_and_pad", mutates_args=())
def permute_and_pad(
    tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor | None, align: int, num_out_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """permute_and_pad's five outputs (permuted_probs empty without probs)."""
    out, pprobs, row_map, tpe, padded = D._permute_and_pad_rows(tokens, routing_map, probs, align, num_out_tokens)
    if _launch.runs_kernels(tpe):
        tpe, padded = tpe.clone(), padded.clone()  # two rows of one buffer: custom-op outputs may not share storage
    if pprobs is None:
        pprobs = torch.empty(_EMPTY, dtype=torch.float32, device=tokens.device)
    return out, pprobs, row_map, tpe, padded


@permute_and_pad.register_fake
def _(tokens, routing_map, probs, align, num_out_tokens):
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    if num_out_tokens is None:
        n_rows = torch.library.get_ctx().new_dynamic_size()  # the padded total: known only on the device
    else:
        n_rows = num_out_tokens + num_experts * (align - 1)
    pprobs = probs.new_empty((n_rows,)) if probs is not None else tokens.new_empty(_EMPTY, dtype=torch.float32)
    counts = tokens.new_empty((num_experts,), dtype=torch.int64)
    row_map = tokens.new_empty((num_tokens + 3, num_experts), dtype=torch.int32)
    return tokens.new_empty((n_rows, hidden)), pprobs, row_map, counts, torch.empty_like(counts)


def _permute_and_pad_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.probs_dtype = inputs[2].dtype if inputs[2] is not None else torch.float32


def _permute_and_pad_backward(ctx, grad_out, grad_pprobs, *_):
    (row_map,) = ctx.saved_tensors
    need_probs = ctx.needs_input_grad[2]
    num_tokens = row_map.shape[0] - 3
    dtok, dprobs = permute_backward(
        grad_out, grad_pprobs if need_probs else None, row_map[: num_tokens + 1], ctx.probs_dtype
    )
    return (dtok if ctx.needs_input_grad[0] else None), None, (dprobs if need_probs else None), None, None


permute_and_pad.register_autograd(_permute_and_pad_backward, setup_context=_permute_and_pad_setup)


@torch.library.custom_op("moe_raw::permute_with_row_map", mutates_args=())
def permute_with_row_map(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x's rows [T, ...] where the row map puts each token's rows, zero elsewhere: [num_rows, ...]."""
    return D._scatter_rows(x, row_map, num_rows)


@permute_with_row_map.register_fake
def _(x, row_map, num_rows):
    return x.new_empty((num_rows, *x.shape[1:]))


def _permute_with_row_map_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.shape = inputs[0].shape


def _permute_with_row_map_backward(ctx, grad_out):
    (row_map,) = ctx.saved_tensors
    num_tokens = ctx.shape[0]
    g = grad_out.reshape(grad_out.shape[0], -1)
    d_x, _ = permute_backward(g, None, row_map[: num_tokens + 1], torch.float32)
    return d_x.reshape(ctx.shape), None, None


permute_with_row_map.register_autograd(_permute_with_row_map_backward, setup_context=_permute_with_row_map_setup)


# ----------------------------------------------------------------------------------------------------------------
# router (topk_routing_with_score_function, compute_routing_scores_for_aux_loss)


def _router_reference(logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, aux):
    """The torch formulas (moe_raw.reference, ties to the lower expert): (values, routing_map, indices [T, K])."""
    if aux:
        routing_map, scores = R.compute_routing_scores_for_aux_loss(logits, topk, score_function, None, R.stable_topk)
        return scores, routing_map, R.stable_topk(scores, topk)[1]
    probs, idx = R.topk_routing_with_score_function(
        logits, topk, pre_softmax, num_groups, group_topk, scaling, score_function, expert_bias, True, R.stable_topk
    )
    return probs, idx


@torch.library.custom_op("moe_raw::router", mutates_args=())
def router(
    logits: torch.Tensor, expert_bias: torch.Tensor | None, topk: int, score_function: str, pre_softmax: bool,
    num_groups: int | None, group_topk: int | None, scaling: float | None, dense: bool, aux: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(values, routing_map, indices [T, K] int64): values = probs [T, E] (dense) or [T, K], or aux scores [T, E]
    fp32; routing_map [T, E] bool (empty in the compact form). The kernel on CUDA within its limits, else the torch
    formulas, as the eager path."""
    if _launch.runs_kernels(logits) and RK.covers(logits.shape[1], topk, group_topk, num_groups):
        probs, routing_map, idx, scores = RK.forward(
            logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux
        )
        values = scores if aux else probs
    elif aux:
        values, routing_map, idx = _router_reference(
            logits, None, topk, score_function, pre_softmax, None, None, None, True
        )
    else:
        probs_k, idx = _router_reference(
            logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, False
        )
        values, routing_map = probs_k, None
        if dense:
            values = torch.zeros_like(logits).scatter(1, idx, probs_k)
            routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    if routing_map is None:
        routing_map = torch.empty(_EMPTY, dtype=torch.bool, device=logits.device)
    return values.contiguous(), routing_map, idx.contiguous()  # top-k slices of a sort are strided; the fake is not


@router.register_fake
def _(logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux):
    num_tokens, num_experts = logits.shape
    idx = logits.new_empty((num_tokens, topk), dtype=torch.int64)
    if aux:
        return logits.new_empty((num_tokens, num_experts), dtype=torch.float32), logits.new_empty(
            (num_tokens, num_experts), dtype=torch.bool), idx  # fmt: skip
    if dense:
        return logits.new_empty((num_tokens, num_experts)), logits.new_empty(
            (num_tokens, num_experts), dtype=torch.bool), idx  # fmt: skip
    return logits.new_empty((num_tokens, topk)), logits.new_empty(_EMPTY, dtype=torch.bool), idx


@torch.library.custom_op("moe_raw::router_backward", mutates_args=())
def router_backward(
    logits: torch.Tensor, expert_bias: torch.Tensor | None, idx: torch.Tensor, grad: torch.Tensor, topk: int,
    score_function: str, pre_softmax: bool, num_groups: int | None, group_topk: int | None, scaling: float | None,
    dense: bool, aux: bool,
) -> torch.Tensor:  # fmt: skip
    """d logits [T, E] from the gradient of router's values: the kernel on CUDA within its limits, else the torch
    formulas' own autograd (recomputed; their picks are the forward's: the same rule, the same inputs)."""
    if _launch.runs_kernels(logits) and RK.covers(logits.shape[1], topk, group_topk, num_groups):
        return RK.backward(logits, idx, grad, topk, score_function, pre_softmax, scaling, dense, aux)

    def values(x):  # autograd is off inside an op's implementation: torch.func's vjp does not need it
        out = _router_reference(x, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, aux)
        return torch.zeros_like(x).scatter(1, idx, out[0]) if dense and not aux else out[0]

    return torch.func.vjp(values, logits)[1](grad)[0]


@router_backward.register_fake
def _(logits, expert_bias, idx, grad, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux):
    return logits.new_empty(logits.shape)


def _router_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[2])
    ctx.cfg = inputs[2:]


def _router_backward(ctx, grad_values, _grad_map, _grad_idx):
    logits, expert_bias, idx = ctx.saved_tensors
    d_logits = router_backward(logits, expert_bias, idx, grad_values, *ctx.cfg)
    return (d_logits,) + (None,) * 9


router.register_autograd(_router_backward, setup_context=_router_setup)
