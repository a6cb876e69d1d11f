"""The gated activations moe_raw replaces: SwiGLU, the tanh-GELU GEGLU, Megatron-LM's Quick-GEGLU and gpt-oss's
clamped SwiGLU, with their weighted forms, backward functions, autograd Functions and ``weighted_bias_*_impl``.

``y [..., 2F]`` holds ``[gate | up]`` (``torch.chunk(y, 2, -1)``); ``weights [N, 1]``. Every one is
``gate' * sigmoid(alpha * (gate' + cubic gate'^3)) * (linear' + linear_offset)`` with an optional clamp, its
constants an ``act`` ``Act(alpha, linear_offset, limit, cubic)`` (SwiGLU is ``(1, 0, None, 0)``). CUDA tensors
in float32 / float16 / bfloat16 run the Numba kernels (``moe_raw._kernels.glu_launch``); CPU tensors and float64
run the same formulas in torch, in fp32 (fp64 for fp64). One autograd node per call when an input requires grad
(``_GluFn``); none otherwise.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moe_raw import _ops, reference
from moe_raw import _validate as V
from moe_raw._kernels.glu_codegen import _GEGLU, _SWIGLU, Act
from moe_raw._kernels.glu_launch import _as_2d, _glu_back_torch, _glu_bwd, _glu_fwd, _weighted_fn_backward

# The public names are listed once, in moe_raw/__init__.py.


class _GluFn(torch.autograd.Function):
    """Autograd of every gated activation (weighted or not): y [N, 2F], weights [N, 1] or None -> [N, F] in
    y.dtype; backward from one kernel pass (or its torch twin off the kernels). Not twice differentiable."""

    @staticmethod
    def forward(ctx, y, weights, act):
        ctx.save_for_backward(y, weights)
        ctx.act = act
        return _glu_fwd(y, weights, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, weights = ctx.saved_tensors
        dy, dweights = _glu_bwd(grad_out, y, weights, ctx.act, y.dtype)
        return (dy if ctx.needs_input_grad[0] else None), (dweights if ctx.needs_input_grad[1] else None), None


def _needs_grad(*tensors) -> bool:
    # a loop, not any() over a generator: this runs on every call (0.1 against 0.26 us a call on CI's CPU)
    for t in tensors:
        if t is not None and t.requires_grad:
            return torch.is_grad_enabled()
    return False


def _gated(op: str, y, weights, weighted: bool, act: tuple) -> torch.Tensor:
    """Validated forward of the activation ``act``: y [..., 2F] -> [..., F], or with weights y [N, 2F] and
    weights [N, 1] -> [N, F] in y.dtype. Differentiable w.r.t. y and weights (one autograd node, built only when
    one of them requires grad)."""
    if not weighted:
        f = V.glu_input(y, op, two_d=False)
        if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
            return _ops.glu(y, *act)
        y2 = y if y.dim() == 2 else _as_2d(y)
        out = _GluFn.apply(y2, None, act) if _needs_grad(y) else _glu_fwd(y2, None, act)
        return out if y.dim() == 2 else out.view(*y.shape[:-1], f)
    V.glu_input(y, op, two_d=True)
    V.glu_weights(weights, y, op)
    if torch.compiler.is_compiling():
        return _ops.weighted_glu(y, weights, *act)
    if _needs_grad(y, weights):
        return _GluFn.apply(y, weights, act)
    return _glu_fwd(y, weights, act)


def _weighted_forward(y, weights, act: tuple) -> torch.Tensor:
    """act(y) * weights [N, F] for an autograd Function's forward, whose own checks have run (not twice per call):
    the custom op when torch.compile traces the Function, else the kernels (no grad inside forward: no node)."""
    if torch.compiler.is_compiling():
        return _ops.weighted_glu(y, weights, *act)
    return _glu_fwd(y, weights, act)


def _gated_back(op: str, g, y, weights, weighted: bool, act: tuple, need_weight_grad: bool = True):
    """Validated backward of ``act``: dy [..., 2F] in promote(g, y); with weights (2-D) (dy in y.dtype, dweights
    [N, 1] in weights.dtype, or None when not need_weight_grad). Differentiable (twice-differentiable activations):
    when an input requires grad this runs the torch formula in fp32, whose autograd gives the second derivatives, on
    every device."""
    if weighted and not need_weight_grad:
        return _gated_back(op, g, y, weights, True, act)[0], None
    if not weighted:
        f = V.glu_input(y, op, two_d=False)
        V.glu_grad(g, y, f, op)
        if torch.compiler.is_compiling():
            return _ops.glu_back(g, y, *act)
        out_dtype = y.dtype if g.dtype is y.dtype else torch.promote_types(g.dtype, y.dtype)
        if _needs_grad(g, y):
            return _glu_back_torch(g, y, None, act, out_dtype)[0]
        if y.dim() == 2:
            return _glu_bwd(g, y, None, act, out_dtype)[0]
        return _glu_bwd(_as_2d(g), _as_2d(y), None, act, out_dtype)[0].view(y.shape)
    f = V.glu_input(y, op, two_d=True)
    V.glu_grad(g, y, f, op)
    V.glu_weights(weights, y, op)
    if torch.compiler.is_compiling():
        return _ops.weighted_glu_back(g, y, weights, *act)
    if _needs_grad(g, y, weights):
        return _glu_back_torch(g, y, weights, act, y.dtype)
    return _glu_bwd(g, y, weights, act, y.dtype)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up.

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference), ``[gate | up]`` halves; any
            leading strides, the last dim read contiguously (else copied).

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    return _gated("moe_raw.swiglu", y, None, False, _SWIGLU)


def weighted_swiglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """swiglu(y) * weights, returned in y.dtype.

    Args:
        y: [N, 2F] float32 | float16 | bfloat16 (float64: the torch reference); rows may be strided.
        weights: [N, 1] float32 | float16 | bfloat16, any strides (one weight per row, e.g. the router prob).

    Returns:
        [N, F] in y.dtype, computed in fp32 (silu(gate) * up * weight) and rounded once. Differentiable w.r.t. y
        and weights (backward: one kernel pass).
    """
    return _gated("moe_raw.weighted_swiglu", y, weights, True, _SWIGLU)


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of swiglu: dy = [g * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))) * up | g * silu(gate)].

    Args:
        g: [..., F] float, the gradient of swiglu(y) (any strides).
        y: [..., 2F] float, the forward input.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype) (the seed's dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    return _gated_back("moe_raw.swiglu_back", g, y, None, False, _SWIGLU)


def weighted_swiglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, need_weight_grad: bool = True):
    """Gradients of weighted_swiglu, in one pass over g and y.

    Args:
        g: [N, F] float, the gradient of weighted_swiglu(y, weights) (any strides).
        y: [N, 2F] float, the forward input.
        weights: [N, 1] float.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype, or None with need_weight_grad=False, as NeMo
        Automodel's). dy is swiglu_back(g * weights, y);
        dweights[n] = sum_f swiglu(y)[n, f] * g[n, f], reduced in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    return _gated_back(
        "moe_raw.weighted_swiglu_back",
        g,
        y,
        weights,
        True,
        _SWIGLU,
        V.flag(need_weight_grad, "need_weight_grad", "moe_raw.weighted_swiglu_back"),
    )


# ----------------------------------------------------------------------------------------------------------------
# GEGLU with the tanh GELU (NeMo Automodel 0.7, Gemma4 MoE experts): the same kernels with act _GEGLU


def geglu(y: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up (NeMo Automodel's ``geglu``; torch's ``F.gelu(gate, approximate="tanh")``).

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference), ``[gate | up]`` halves; any
            leading strides, the last dim read contiguously (else copied).

    Returns:
        [..., F] in y.dtype, computed in fp32 (as gate * sigmoid(2 z), z = sqrt(2 / pi) (gate + 0.044715 gate^3),
        which is 0.5 gate (1 + tanh z)) and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    return _gated("moe_raw.geglu", y, None, False, _GEGLU)


def weighted_geglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """geglu(y) * weights, returned in y.dtype. y: [N, 2F] float (rows may be strided); weights: [N, 1] float.
    Returns [N, F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y and weights."""
    return _gated("moe_raw.weighted_geglu", y, weights, True, _GEGLU)


def geglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of geglu: dy = [g * gelu_tanh'(gate) * up | g * gelu_tanh(gate)].

    Args:
        g: [..., F] float, the gradient of geglu(y) (any strides). y: [..., 2F] float, the forward input.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype), computed in fp32. Differentiable w.r.t. g and y
        (with either requiring grad this runs torch ops in fp32, whose autograd gives the second derivatives).
    """
    return _gated_back("moe_raw.geglu_back", g, y, None, False, _GEGLU)


def weighted_geglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, need_weight_grad: bool = True):
    """Gradients of weighted_geglu in one pass over g [N, F] and y [N, 2F], weights [N, 1].

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype, or None with need_weight_grad=False). dy is
        geglu_back(g * weights, y); dweights[n] = sum_f geglu(y)[n, f] * g[n, f], reduced in fp32 in a fixed order
        (bitwise deterministic). Differentiable w.r.t. g, y and weights (torch ops in fp32 when one requires grad).
    """
    op = "moe_raw.weighted_geglu_back"
    return _gated_back(op, g, y, weights, True, _GEGLU, V.flag(need_weight_grad, "need_weight_grad", op))


# ----------------------------------------------------------------------------------------------------------------
# Quick-GEGLU (Megatron-LM / NeMo Automodel) and gpt-oss's clamped SwiGLU: the same kernels with another act


_QUICK_GELU_ALPHA = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x), Megatron's constant


def _quick(linear_offset, op: str) -> tuple:
    return Act(_QUICK_GELU_ALPHA, V.act_constant(linear_offset, "linear_offset", op), None)


def _clamped(alpha, limit, op: str) -> tuple:
    return Act(V.act_constant(alpha, "alpha", op), 1.0, V.act_limit(limit, "limit", op))


def quick_geglu(y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """Megatron-LM's quick_geglu: quick_gelu(gate) * (linear + linear_offset), quick_gelu(x) = x * sigmoid(1.702 x).

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference), ``[gate | linear]`` halves
            (torch.chunk, as swiglu); any leading strides, the last dim read contiguously (else copied).
        linear_offset: float added to the linear half; compiled into the kernel (one compile, about a second, per
            distinct value and dtype combination).

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    op = "moe_raw.quick_geglu"
    act = _quick(linear_offset, op)
    return _gated(op, y, None, False, act)


def weighted_quick_geglu(y: torch.Tensor, weights: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """quick_geglu(y, linear_offset) * weights, returned in y.dtype (Megatron-LM's weighted_quick_geglu).

    Args:
        y: [N, 2F] float32 | float16 | bfloat16 (float64: the torch reference); rows may be strided.
        weights: [N, 1] float32 | float16 | bfloat16, any strides.
        linear_offset: float added to the linear half (as quick_geglu).

    Returns:
        [N, F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y and weights.
    """
    op = "moe_raw.weighted_quick_geglu"
    act = _quick(linear_offset, op)
    return _gated(op, y, weights, True, act)


def quick_geglu_back(g: torch.Tensor, y: torch.Tensor, linear_offset: float = 0.0) -> torch.Tensor:
    """Gradient of quick_geglu: with s = sigmoid(1.702 gate),
    dy = [g * s * (1 + 1.702 gate * (1 - s)) * (linear + linear_offset) | g * gate * s].

    Args:
        g: [..., F] float, the gradient of quick_geglu(y, linear_offset) (any strides).
        y: [..., 2F] float, the forward input.
        linear_offset: the forward's.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.quick_geglu_back"
    act = _quick(linear_offset, op)
    return _gated_back(op, g, y, None, False, act)


def weighted_quick_geglu_back(
    g: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    linear_offset: float = 0.0,
    *,
    need_weight_grad: bool = True,
):
    """Gradients of weighted_quick_geglu, in one pass over g and y.

    Args:
        g: [N, F] float, the gradient of weighted_quick_geglu(y, weights, linear_offset) (any strides).
        y: [N, 2F] float, the forward input.
        weights: [N, 1] float.
        linear_offset: the forward's.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype): dy = quick_geglu_back(g * weights, y);
        dweights[n] = sum_f quick_geglu(y)[n, f] * g[n, f], reduced in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.weighted_quick_geglu_back"
    act = _quick(linear_offset, op)
    return _gated_back(op, g, y, weights, True, act, V.flag(need_weight_grad, "need_weight_grad", op))


def clamped_swiglu(y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: gate' * sigmoid(alpha * gate') * (linear' + 1), gate' = gate.clamp(max=limit),
    linear' = linear.clamp(-limit, limit).

    Megatron-LM expresses it as quick_geglu with linear_offset=1 and clamp_value=limit (alpha fixed at 1.702):
    ``weighted_bias_quick_geglu_impl`` here takes both, and alpha. The layout is ``[gate | linear]`` halves
    (torch.chunk, as Megatron and NeMo Automodel's swiglu_oai); gpt-oss's own checkpoints interleave gate and
    linear columns (y[..., ::2], y[..., 1::2]), so de-interleave those projection columns once when loading.

    Args:
        y: [..., 2F] float32 | float16 | bfloat16 (float64: the torch reference); last dim read contiguously.
        alpha: the gate's sigmoid scale; limit: the clamp (> 0). Both compiled into the kernel.

    Returns:
        [..., F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y (backward: one kernel pass).
    """
    op = "moe_raw.clamped_swiglu"
    act = _clamped(alpha, limit, op)
    return _gated(op, y, None, False, act)


def weighted_clamped_swiglu(y: torch.Tensor, weights: torch.Tensor, alpha: float = 1.702, limit: float = 7.0):
    """clamped_swiglu(y, alpha, limit) * weights, returned in y.dtype (NeMo Automodel's swiglu_oai_deepep).

    Args:
        y: [N, 2F] float32 | float16 | bfloat16; weights: [N, 1] float; alpha, limit: as clamped_swiglu.

    Returns:
        [N, F] in y.dtype, computed in fp32 and rounded once. Differentiable w.r.t. y and weights.
    """
    op = "moe_raw.weighted_clamped_swiglu"
    act = _clamped(alpha, limit, op)
    return _gated(op, y, weights, True, act)


def clamped_swiglu_back(g: torch.Tensor, y: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Gradient of clamped_swiglu: quick_geglu's at the clamped values (alpha for 1.702, offset 1), zero where the
    clamp is active (gate > limit; |linear| > limit); at the bounds themselves it passes, as torch.clamp's.

    Args:
        g: [..., F] float (any strides); y: [..., 2F] float, the forward input; alpha, limit: the forward's.

    Returns:
        dy [..., 2F] in torch.promote_types(g.dtype, y.dtype), computed in fp32.
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.clamped_swiglu_back"
    act = _clamped(alpha, limit, op)
    return _gated_back(op, g, y, None, False, act)


def weighted_clamped_swiglu_back(
    g, y, weights, alpha: float = 1.702, limit: float = 7.0, *, need_weight_grad: bool = True
):
    """Gradients of weighted_clamped_swiglu, in one pass over g and y.

    Args:
        g: [N, F] float; y: [N, 2F] float; weights: [N, 1] float; alpha, limit: the forward's.

    Returns:
        (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype): dy = clamped_swiglu_back(g * weights, y);
        dweights[n] = sum_f clamped_swiglu(y)[n, f] * g[n, f], in fp32 in a fixed order (bitwise deterministic).
        Differentiable w.r.t. g and y (and weights): with any of them requiring grad this runs torch ops in
        fp32, whose autograd gives the second derivatives.
    """
    op = "moe_raw.weighted_clamped_swiglu_back"
    act = _clamped(alpha, limit, op)
    return _gated_back(op, g, y, weights, True, act, V.flag(need_weight_grad, "need_weight_grad", op))


def _weighted_glu_function(name: str, act: Act, doc: str) -> type:
    """The seed's ``Weighted<Act>Function`` for ``act``: ``forward(ctx, input [N, 2F], weights [N, 1],
    fp8_input_store)`` -> [N, F] in input.dtype; ``backward`` -> (d input [N, 2F] in input.dtype, d weights [N, 1]
    in weights.dtype, None) from one kernel pass (or its torch twin). One class body for every such activation."""
    op = f"moe_raw.{name}"

    def forward(ctx, input, weights, fp8_input_store):
        V.glu_input(input, op, two_d=True, arg="input")
        V.glu_weights(weights, input, op)
        V.fp8_flag(fp8_input_store, op)
        saved = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(saved, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = bool(fp8_input_store)
        return _weighted_forward(input, weights, act)

    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        grads = _weighted_fn_backward(grad_output, input, weights, act, ctx.ori_input_dtype, ctx.needs_input_grad)
        return (*grads, None)

    # type(), not a class statement, so that the Function and its autograd node carry the public name
    # (grad_fn=<WeightedSwiGLUFunctionBackward>).
    namespace = {"__doc__": doc, "__module__": __name__, "forward": staticmethod(forward),
                 "backward": staticmethod(once_differentiable(backward))}  # fmt: skip
    return type(name, (torch.autograd.Function,), namespace)


_FP8_DOC = """
    fp8_input_store=True saves ``input`` for backward as ``torch.float8_e4m3fn`` (half the memory of bf16) and
    upcasts it in backward, as the seed does. The precision cost falls on the gradients only (the forward output
    uses the full input): e4m3 keeps 3 mantissa bits, so each saved value carries a relative rounding error of up
    to 2^-4 (6.25%); magnitudes above 448 saturate to +-448 and below 2^-10 become 0 (torch's cast); values under
    2^-6 are subnormal with fewer bits still.
    """

WeightedSwiGLUFunction = _weighted_glu_function(
    "WeightedSwiGLUFunction",
    _SWIGLU,
    """Autograd of weighted_swiglu (the seed's ``WeightedSwiGLUFunction``): input [N, 2F], weights [N, 1].

    ``forward(ctx, input, weights, fp8_input_store)`` returns weighted_swiglu(input, weights) [N, F];
    ``backward`` returns (d input [N, 2F] in input.dtype, d weights [N, 1] in weights.dtype, None) from one
    kernel pass. Not twice differentiable.
    """
    + _FP8_DOC,
)

WeightedGEGLUFunction = _weighted_glu_function(
    "WeightedGEGLUFunction",
    _GEGLU,
    """Autograd of weighted_geglu (NeMo Automodel's ``WeightedGEGLUFunction``): input [N, 2F], weights [N, 1].

    ``forward(ctx, input, weights, fp8_input_store)`` returns weighted_geglu(input, weights) [N, F];
    ``backward`` returns (d input [N, 2F] in input.dtype, d weights [N, 1] in weights.dtype, or None when weights
    needs no gradient, None) from one kernel pass. Not twice differentiable.
    """
    + _FP8_DOC,
)


def _weighted_impl(op: str, function: type, act: Act, input, weights, fp8_input_store):
    """The seed's ``weighted_bias_<act>_impl`` body: input [N, 2F] or [S, B, 2F] -> [N, F] or [S, B, F] through
    ``function`` (or, traced by torch.compile, the custom op)."""
    if isinstance(fp8_input_store, torch.Tensor):
        raise NotImplementedError(
            f"{op}: bias is not supported for this weighted fusion (as in the seed); the signature is "
            "(input, weights, fp8_input_store=False), so a third tensor argument looks like Megatron's "
            "(input, bias, weights) call"
        )
    V.fp8_flag(fp8_input_store, op)
    V.glu_input(input, op, two_d=False, arg="input")  # before the reshape, so errors name this function's argument
    ori_shape = input.shape
    if len(ori_shape) not in (2, 3):
        raise ValueError(f"{op}: input must be 2-D [N, 2F] or 3-D [S, B, 2F], got shape {tuple(ori_shape)}")
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        V.glu_weights(weights, _as_2d(input), f"moe_raw.{function.__name__}")  # what the Function checks
        output = _ops.weighted_glu_fn(_as_2d(input), weights, bool(fp8_input_store), *act)
    else:
        output = function.apply(_as_2d(input), weights, bool(fp8_input_store))
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], output.shape[1])


def weighted_bias_swiglu_impl(input: torch.Tensor, weights: torch.Tensor, fp8_input_store: bool = False):
    """Token-weighted SwiGLU with autograd (the seed's ``weighted_bias_swiglu_impl``; no bias).

    Args:
        input: [N, 2F] or [S, B, 2F] (N = S * B) float32 | float16 | bfloat16 (float64: the torch reference).
        weights: [N, 1] float, one weight per row.
        fp8_input_store: save the input for backward as float8_e4m3fn (see ``WeightedSwiGLUFunction`` for the
            precision this costs the gradients).

    Returns:
        [N, F] or [S, B, F] in input.dtype. Differentiable w.r.t. input and weights.

    A bias is not supported, as in the seed: a Megatron-style call ``(input, bias, weights)`` lands a tensor in
    ``fp8_input_store`` and raises NotImplementedError.
    """
    op = "moe_raw.weighted_bias_swiglu_impl"
    return _weighted_impl(op, WeightedSwiGLUFunction, _SWIGLU, input, weights, fp8_input_store)


def weighted_bias_geglu_impl(input: torch.Tensor, weights: torch.Tensor, fp8_input_store: bool = False):
    """Token-weighted GEGLU (tanh GELU) with autograd: NeMo Automodel's ``weighted_bias_geglu_impl`` (no bias).

    Args / returns: as ``weighted_bias_swiglu_impl`` (input [N, 2F] or [S, B, 2F], weights [N, 1]; output [N, F]
    or [S, B, F] in input.dtype), with GEGLU's activation.
    """
    op = "moe_raw.weighted_bias_geglu_impl"
    return _weighted_impl(op, WeightedGEGLUFunction, _GEGLU, input, weights, fp8_input_store)


class WeightedQuickGeGLUFunction(torch.autograd.Function):
    """Autograd of weighted Quick-GEGLU (Megatron-LM's ``WeightedQuickGeGLUFunction``): input [N, 2F], weights
    [N, 1] -> [N, F] in input.dtype; backward (d input [N, 2F] in input.dtype, d weights [N, 1] in weights.dtype)
    from one kernel pass. Not twice differentiable.

    ``forward(ctx, input, weights, fp8_input_store, linear_offset, clamp_value=None, alpha=1.702)``: Megatron's
    parameters (linear_offset a float or a 0-d CPU tensor; Megatron passes a tensor on the input's device, which
    would have to be read back here), then two of moe_raw's: clamp_value applies Megatron's clamp (gate <=
    clamp_value, |linear| <= clamp_value) inside the kernels instead of as torch ops before the Function, and alpha
    replaces quick_gelu's 1.702. fp8_input_store saves the (unclamped) input as float8_e4m3fn as
    ``WeightedSwiGLUFunction`` does, so the backward's clamp test also sees the fp8-rounded input: it can differ from
    Megatron's (which tests the full-precision input) for inputs within one e4m3 step (2^-4 relative) of the bound.
    """

    @staticmethod
    def forward(ctx, input, weights, fp8_input_store, linear_offset, clamp_value=None, alpha=_QUICK_GELU_ALPHA):
        op = "moe_raw.WeightedQuickGeGLUFunction"
        V.glu_input(input, op, two_d=True, arg="input")
        V.glu_weights(weights, input, op)
        V.fp8_flag(fp8_input_store, op)
        limit = V.act_limit(clamp_value, "clamp_value", op) if clamp_value is not None else None
        act = Act(V.act_constant(alpha, "alpha", op), V.act_constant(linear_offset, "linear_offset", op), limit)
        saved = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(saved, weights)
        ctx.ori_input_dtype = input.dtype
        ctx.fp8_input_store = bool(fp8_input_store)
        ctx.act = act
        return _weighted_forward(input, weights, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weights = ctx.saved_tensors
        grads = _weighted_fn_backward(grad_output, input, weights, ctx.act, ctx.ori_input_dtype, ctx.needs_input_grad)
        return (*grads, None, None, None, None)


def quick_gelu(y: torch.Tensor, alpha: float = 1.702) -> torch.Tensor:
    """NeMo Automodel / Megatron's sigmoid approximation of GELU: y [..., F] -> ``y * sigmoid(alpha * y)`` [..., F],
    same dtype (plain torch: the gated kernels apply it inside the activation; this is the elementwise helper of
    their ``moe_utils``)."""
    return y * torch.sigmoid(alpha * y)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y + bias in at least fp32: the packages add the bias inside torch.compile'd code, in fp32 registers, so a 16-bit
    y + bias is never rounded before the activation; here the kernels then run on the fp32 sum."""
    return y.float() + bias.float() if y.dtype.itemsize < 4 else y + bias


def weighted_bias_quick_geglu(
    y: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor, linear_offset: float = 0.0
) -> torch.Tensor:
    """NeMo Automodel's ``weighted_bias_quick_geglu``: ``weighted_quick_geglu(y + bias, weights, linear_offset)``.

    Args:
        y: [N, 2F] float; bias: broadcast to y (e.g. [2F]); weights: [N, 1]; linear_offset: as quick_geglu.

    Returns:
        [N, F] in y.dtype (the bias add is a torch op; the activation runs the kernels). Differentiable w.r.t. y,
        bias and weights.
    """
    op = "moe_raw.weighted_bias_quick_geglu"
    V.glu_input(y, op, two_d=True)
    V.glu_bias(bias, y, op)
    return weighted_quick_geglu(_plus_bias(y, bias), weights, linear_offset).to(y.dtype)


def weighted_bias_quick_geglu_back(g, y, bias, weights, linear_offset: float = 0.0):
    """NeMo Automodel's ``weighted_bias_quick_geglu_back``: gradients of weighted_bias_quick_geglu.

    Returns:
        (dy [N, 2F] in y.dtype, dbias in y.dtype, dweights [N, 1] in weights.dtype), from one kernel pass at
        x = y + bias. dbias is dy itself, unreduced, as the package returns it (autograd sums it to bias' shape).
    """
    op = "moe_raw.weighted_bias_quick_geglu_back"
    V.glu_input(y, op, two_d=True)
    V.glu_bias(bias, y, op)
    dy, dweights = weighted_quick_geglu_back(g, _plus_bias(y, bias), weights, linear_offset)
    dy = dy.to(y.dtype)
    return dy, dy, dweights


class WeightedBiasQuickGeGLUFunction(torch.autograd.Function):
    """Autograd of weighted Quick-GEGLU with a bias (NeMo Automodel's ``WeightedBiasQuickGeGLUFunction``):
    ``forward(ctx, input [N, 2F], bias, weights [N, 1], fp8_input_store, linear_offset)`` -> [N, F] in
    input.dtype; backward (d input, d bias (summed to bias' shape), d weights). linear_offset: a float or a 0-d CPU
    tensor (see ``WeightedQuickGeGLUFunction``). Not twice differentiable."""

    @staticmethod
    def forward(ctx, input, bias, weights, fp8_input_store, linear_offset):
        op = "moe_raw.WeightedBiasQuickGeGLUFunction"
        V.glu_input(input, op, two_d=True, arg="input")
        V.glu_bias(bias, input, op)
        V.glu_weights(weights, input, op)
        V.fp8_flag(fp8_input_store, op)
        act = Act(_QUICK_GELU_ALPHA, V.act_constant(linear_offset, "linear_offset", op), None)
        saved = input.to(torch.float8_e4m3fn) if fp8_input_store else input
        ctx.save_for_backward(saved, bias, weights)
        ctx.ori_input_dtype, ctx.act = input.dtype, act
        return _weighted_forward(_plus_bias(input, bias), weights, act).to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, bias, weights = ctx.saved_tensors
        x = _plus_bias(input.to(ctx.ori_input_dtype), bias)
        dx, dweights = _weighted_fn_backward(grad_output, x, weights, ctx.act, x.dtype, (True, ctx.needs_input_grad[2]))
        dinput = dx.to(ctx.ori_input_dtype) if ctx.needs_input_grad[0] else None
        dbias = dx.sum_to_size(bias.shape).to(bias.dtype) if ctx.needs_input_grad[1] else None
        return dinput, dbias, dweights, None, None


def weighted_bias_quick_geglu_impl(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor,
    fp8_input_store: bool = False,
    linear_offset: float = 0.0,
    clamp_value: float | None = None,
    alpha: float = _QUICK_GELU_ALPHA,
):
    """Token-weighted Quick-GEGLU with autograd: Megatron-LM's ``weighted_bias_quick_geglu_impl`` (NeMo Automodel's
    adds alpha, which its own body ignores; here it is used).

    gpt-oss experts (Megatron's quick_gelu with glu_linear_offset=1.0, activation_func_clamp_value=7.0):
    ``weighted_bias_quick_geglu_impl(x, None, probs, linear_offset=1.0, clamp_value=7.0)``.

    Args:
        input: [N, 2F] or [S, B, 2F] (N = S * B) float32 | float16 | bfloat16 (float64: the torch reference),
            ``[gate | linear]`` halves.
        bias: None, or a float tensor broadcast to input, added after the clamp as Megatron does. That path runs
            torch ops for the clamp and the add (autograd differentiates them; output in input.dtype) before the
            kernels; without a bias the clamp runs inside the kernels.
        weights: [N, 1] float, one weight per row.
        fp8_input_store: save the input for backward as float8_e4m3fn (see ``WeightedQuickGeGLUFunction``).
        linear_offset: float added to the linear half. clamp_value: None, or the clamp (> 0): gate <= clamp_value,
            |linear| <= clamp_value, zero gradient where active. alpha: quick_gelu's sigmoid scale.

    Returns:
        [N, F] or [S, B, F] in input.dtype. Differentiable w.r.t. input, bias and weights.
    """
    op = "moe_raw.weighted_bias_quick_geglu_impl"
    V.fp8_flag(fp8_input_store, op)
    V.glu_input(input, op, two_d=False, arg="input")  # before the reshape, so errors name this function's argument
    ori_shape, ori_dtype = input.shape, input.dtype
    if len(ori_shape) not in (2, 3):
        raise ValueError(f"{op}: input must be 2-D [N, 2F] or 3-D [S, B, 2F], got shape {tuple(ori_shape)}")
    if bias is not None:
        V.glu_bias(bias, input, op)
        if clamp_value is not None:
            input = reference.clamp_glu(input, V.act_limit(clamp_value, "clamp_value", op))
        input = _plus_bias(input, bias)
        clamp_value = None
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom op (moe_raw/_ops.py)
        fn_op = "moe_raw.WeightedQuickGeGLUFunction"  # what the Function checks
        V.glu_weights(weights, _as_2d(input), fn_op)
        limit = V.act_limit(clamp_value, "clamp_value", fn_op) if clamp_value is not None else None
        act = Act(V.act_constant(alpha, "alpha", fn_op), V.act_constant(linear_offset, "linear_offset", fn_op), limit)
        output = _ops.weighted_glu_fn(_as_2d(input), weights, bool(fp8_input_store), *act)
    else:
        output = WeightedQuickGeGLUFunction.apply(
            _as_2d(input), weights, bool(fp8_input_store), linear_offset, clamp_value, alpha
        )
    if output.dtype != ori_dtype:  # a wider bias promoted the sum; Megatron returns input.dtype
        output = output.to(ori_dtype)
    return output if len(ori_shape) == 2 else output.view(ori_shape[0], ori_shape[1], output.shape[1])
