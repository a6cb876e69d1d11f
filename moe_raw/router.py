"""The MoE router with Megatron-LM main's names and signatures (``megatron/core/transformer/moe/moe_utils.py``):
score function, (group-limited) top-k, expert bias, scaling, the dense map and probs, the aux-loss scores and the
load-balancing and z losses.

On CUDA ``topk_routing_with_score_function`` and ``compute_routing_scores_for_aux_loss`` are one kernel launch
forward and one backward each (kernels/router.cu: fp32 math for every logits dtype, as Megatron main; deterministic;
no host sync; under ``torch.compile`` the same launches as the custom ops ``moe_raw::router`` / ``router_backward``),
where Megatron's torch code takes 6-15 launches. Elsewhere (CPU, and past the kernel's limits: more than 1024
experts, top-k over 32, more than 64 groups) they run ``moe_raw.reference``'s transcription of Megatron as torch
ops. Both rank the same way: the larger score first and, among equal scores, the lower expert
index (``torch.topk``, which Megatron calls, leaves ties unspecified, so on exact ties the maps may differ from
Megatron's; without ties they are equal). The two losses are torch ops here too: each reads its input once in one
or two reductions, as Megatron's does.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _launch, _ops
from moe_raw import _validate as V
from moe_raw import reference as R
from moe_raw._kernels import router as K

__all__ = [
    "topk_routing_with_score_function",
    "compute_routing_scores_for_aux_loss",
    "switch_load_balancing_loss_func",
    "z_loss_func",
]

_SCORE_FUNCTIONS = tuple(K.SCORE_CODE)


class _RouterFunction(torch.autograd.Function):
    """One router_fwd launch; backward one router_bwd launch. cfg = (topk, score_function, pre_softmax, num_groups,
    group_topk, scaling, dense, aux). Outputs: (probs, map) dense, (probs [T, K], indices) compact, (map, scores)
    aux; the map and the indices carry no gradient, nor does expert_bias (it only ranks)."""

    @staticmethod
    def forward(ctx, logits, expert_bias, cfg):
        topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux = cfg
        probs, routing_map, idx, scores = K.forward(
            logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux
        )
        ctx.save_for_backward(logits, idx)
        ctx.cfg = cfg
        if aux:
            ctx.mark_non_differentiable(routing_map)
            return routing_map, scores
        ctx.mark_non_differentiable(routing_map if dense else idx)
        return (probs, routing_map) if dense else (probs, idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_first, grad_second):
        topk, score_function, pre_softmax, _, _, scaling, dense, aux = ctx.cfg
        grad = grad_second if aux else grad_first
        if grad is None:
            return None, None, None
        logits, idx = ctx.saved_tensors
        grad_logits = K.backward(logits, idx, grad, topk, score_function, pre_softmax, scaling, dense, aux)
        return grad_logits, None, None


def _route(logits, expert_bias, cfg):
    """The kernel's outputs as ``_RouterFunction`` returns them; without autograd (inference, no_grad, logits that
    need no gradient) the launch is called directly: the Function's bookkeeping is a fifth of the host time at T =
    16, and nothing would use what it saves."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _RouterFunction.apply(logits, expert_bias, cfg)
    topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux = cfg
    probs, routing_map, idx, scores = K.forward(
        logits, expert_bias, topk, score_function, pre_softmax, num_groups, group_topk, scaling, dense, aux
    )
    if aux:
        return routing_map, scores
    return (probs, routing_map) if dense else (probs, idx)


def _use_kernel(logits: torch.Tensor, topk: int, group_topk, num_groups) -> bool:
    if not _launch.runs_kernels(logits) or torch.compiler.is_compiling():
        return False
    return K.covers(logits.shape[1], topk, group_topk, num_groups)


def _check_router(op, logits, topk, score_function) -> tuple[int, int]:
    V.tensor(logits, "logits", op, 2, V.FLOAT_DTYPES)
    num_tokens, num_experts = logits.shape
    topk = V.size_arg(topk, "topk", op, allow_none=False)
    if not 1 <= topk <= num_experts:
        raise ValueError(f"{op}: topk must be in [1, E = {num_experts}], got {topk}")
    if score_function not in _SCORE_FUNCTIONS:
        raise ValueError(f"{op}: score_function must be one of {_SCORE_FUNCTIONS}, got {score_function!r}")
    return num_experts, topk


def _check_groups(op, num_experts, topk, num_groups, group_topk):
    if not group_topk:  # Megatron routes by groups only when group_topk is set
        return
    num_groups = V.size_arg(num_groups, "num_groups", op, allow_none=False)
    group_topk = V.size_arg(group_topk, "group_topk", op, allow_none=False)
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{op}: num_groups must divide E = {num_experts}, got {num_groups}")
    if not 1 <= group_topk <= min(num_groups, topk):
        raise ValueError(f"{op}: group_topk must be in [1, min(num_groups, topk)], got {group_topk}")
    if group_topk * (num_experts // num_groups) < topk:
        raise ValueError(
            f"{op}: {group_topk} groups of {num_experts // num_groups} experts cannot hold topk = {topk} picks"
        )


def _check_padding_mask(op, padding_mask, num_tokens, like):
    if padding_mask is None:
        return
    V.tensor(padding_mask, "padding_mask", op, 1, (torch.bool,))
    if padding_mask.shape[0] != num_tokens:
        raise ValueError(f"{op}: padding_mask must be [T] = [{num_tokens}], got {tuple(padding_mask.shape)}")
    V.same_device(op, padding_mask=padding_mask, **like)


def topk_routing_with_score_function(
    logits: torch.Tensor,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: str = "softmax",
    expert_bias: torch.Tensor | None = None,
    fused: bool = False,
    router_replay=None,
    dense_output: bool = False,
):
    """Megatron's top-k router on the gating logits.

    Args:
        logits: [T, E] float (fp32 / bf16 / fp16 / fp64), contiguous or not.
        topk: K experts a token, 1 <= K <= E.
        use_pre_softmax: softmax: rank softmax(logits) (True) or the logits, then softmax over the K picks (False).
        num_groups, group_topk: group-limited routing (DeepSeek-V3: 8 groups, 4 kept) when group_topk is set:
            E / num_groups consecutive experts a group; a group scores the sum of its top (K / group_topk) keys.
        scaling_factor: multiplies the probs (None or 0: not applied, as Megatron's ``if scaling_factor``).
        score_function: "softmax", "sigmoid" or "sqrtsoftplus".
        expert_bias: optional [E] float, added to sigmoid / sqrtsoftplus scores for ranking only (not to the probs;
            with softmax it is ignored, as Megatron ignores it). Gets no gradient.
        fused: accepted for Megatron's signature; moe_raw always runs its fused kernel.
        router_replay: must be None (Megatron's record / replay debugging is not implemented here).
        dense_output: return [T, K] probs and indices instead of the [T, E] probs and map.

    Returns:
        (probs [T, E] in the logits' dtype, zero off the picks; routing_map [T, E] bool), or with dense_output
        (probs [T, K]; indices [T, K] int64, larger key first). Differentiable w.r.t. logits (float dtypes).
    """
    op = "moe_raw.topk_routing_with_score_function"
    num_experts, topk = _check_router(op, logits, topk, score_function)
    _check_groups(op, num_experts, topk, num_groups, group_topk)
    V.flag(use_pre_softmax, "use_pre_softmax", op)
    V.flag(fused, "fused", op)
    V.flag(dense_output, "dense_output", op)
    if router_replay is not None:
        raise ValueError(f"{op}: router_replay is not supported; call Megatron's own function to record or replay")
    if scaling_factor is not None and not isinstance(scaling_factor, (int, float)):
        raise TypeError(f"{op}: scaling_factor must be a float or None, got {type(scaling_factor).__name__}")
    if expert_bias is not None:
        V.tensor(expert_bias, "expert_bias", op, 1, V.FLOAT_DTYPES)
        if expert_bias.shape[0] != num_experts:
            raise ValueError(f"{op}: expert_bias must be [E] = [{num_experts}], got {tuple(expert_bias.shape)}")
        V.same_device(op, logits=logits, expert_bias=expert_bias)
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        values, routing_map, idx = _ops.router(
            logits.contiguous(), expert_bias, topk, score_function, use_pre_softmax, num_groups if group_topk else None,
            group_topk or None, float(scaling_factor) if scaling_factor else None, not dense_output, False,
        )  # fmt: skip
        return (values, idx) if dense_output else (values, routing_map)
    if not _use_kernel(logits, topk, group_topk, num_groups):  # dense rows: torch's CPU loops round by layout
        return R.topk_routing_with_score_function(
            logits.contiguous(), topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function,
            expert_bias, dense_output, select=R.stable_topk,
        )  # fmt: skip
    bias = expert_bias.detach().contiguous() if expert_bias is not None else None
    cfg = (topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor, not dense_output, False)
    return _route(logits.contiguous(), bias, cfg)


def compute_routing_scores_for_aux_loss(
    logits: torch.Tensor,
    topk: int,
    score_function: str,
    fused: bool = False,
    padding_mask: torch.Tensor | None = None,
):
    """Megatron's scores for the aux loss: (routing_map [T, E] bool, scores [T, E] fp32).

    scores = softmax(logits), or sigmoid / sqrt(softplus) over its row sum + 1e-20; routing_map = their top-k (no
    bias, no groups). ``padding_mask`` [T] bool, True = a padding token (its row of both is zeroed), as Megatron's
    code reads it. Differentiable w.r.t. logits through the scores."""
    op = "moe_raw.compute_routing_scores_for_aux_loss"
    num_tokens = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 0
    _, topk = _check_router(op, logits, topk, score_function)
    V.flag(fused, "fused", op)
    _check_padding_mask(op, padding_mask, num_tokens, {"logits": logits})
    if torch.compiler.is_compiling():  # the custom op (moe_raw/_ops.py)
        scores, routing_map, _ = _ops.router(
            logits.contiguous(), None, topk, score_function, True, None, None, None, True, True
        )
    elif not _use_kernel(logits, topk, None, None):
        return R.compute_routing_scores_for_aux_loss(
            logits.contiguous(), topk, score_function, padding_mask, R.stable_topk
        )
    else:
        cfg = (topk, score_function, True, None, None, None, True, True)
        routing_map, scores = _route(logits.contiguous(), None, cfg)
    if padding_mask is not None:
        valid = (~padding_mask).unsqueeze(-1)
        routing_map, scores = routing_map & valid, scores * valid
    return routing_map, scores


def switch_load_balancing_loss_func(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    total_num_tokens: int,
    topk: int,
    num_experts: int,
    moe_aux_loss_coeff: float,
    fused: bool = False,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Megatron's Switch load-balancing loss: sum_e(sum_t probs[t, e] * tokens_per_expert[e]) * E * coeff /
    (K * total_num_tokens^2), a 0-d tensor in the probs' dtype. probs [T, E] float; tokens_per_expert [E];
    ``padding_mask`` [T] bool, True = a valid token (Megatron reads this function's mask that way round)."""
    op = "moe_raw.switch_load_balancing_loss_func"
    V.tensor(probs, "probs", op, 2, V.FLOAT_DTYPES)
    V.tensor(tokens_per_expert, "tokens_per_expert", op, 1)
    if tokens_per_expert.shape[0] != probs.shape[1]:
        shape = tuple(tokens_per_expert.shape)
        raise ValueError(f"{op}: tokens_per_expert must be [E] = [{probs.shape[1]}], got {shape}")
    V.same_device(op, probs=probs, tokens_per_expert=tokens_per_expert)
    V.flag(fused, "fused", op)
    _check_padding_mask(op, padding_mask, probs.shape[0], {"probs": probs})
    return R.switch_load_balancing_loss_func(
        probs, tokens_per_expert, total_num_tokens, topk, num_experts, moe_aux_loss_coeff, padding_mask
    )


def z_loss_func(logits: torch.Tensor, z_loss_coeff: float, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Megatron's router z-loss: mean over tokens of logsumexp(logits [T, E])^2 times the coefficient, a 0-d tensor;
    ``padding_mask`` [T] bool, True = padding (excluded from the mean)."""
    op = "moe_raw.z_loss_func"
    V.tensor(logits, "logits", op, 2, V.FLOAT_DTYPES)
    _check_padding_mask(op, padding_mask, logits.shape[0], {"logits": logits})
    return R.z_loss_func(logits, z_loss_coeff, padding_mask)
