"""Input validation shared by every public op. Errors name the argument and what was expected; nothing is cast.

The checks that always run read types, shapes, dtypes, layouts and devices only: none of them syncs the host with
the GPU. Checks of tensor *values* (an integer routing map holding only 0 / 1, sorted_indices within [0, T), a fused
row map's codes within the N rows) need a device-to-host read, so they run only with ``MOE_RAW_DEBUG=1`` in the
environment, read once when moe_raw is imported (``DEBUG`` below; tests set it directly). Without it, bad values
never reach memory they shouldn't: the kernels bound-check every row id and skip the ones out of range.
"""

from __future__ import annotations

import math
import numbers

import torch

from moe_raw import _env
from moe_raw import reference_fp8 as RF

DEBUG = _env.DEBUG  # MOE_RAW_DEBUG=1 (moe_raw/_env.py)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# 1-byte token dtypes that permute moves as bytes (fp8 activations); arithmetic ops reject them.
BYTE_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
) + (torch.uint8, torch.int8)
TOKEN_DTYPES = FLOAT_DTYPES + BYTE_DTYPES  # what permute moves
QUANT_DTYPES = RF.INPUT_DTYPES  # what permute_quantized quantizes (fp32 / fp16 / bf16; fp64 would be a silent cast)
MAP_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_EXPERTS = 4096  # the row kernels keep a token's row list (one int per expert) in shared memory
MAX_ROWS = 2**31 - 3  # row ids are int32, and -2 - row must fit too


def _name(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, arg: str, op: str, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not torch.strided:
        dense(x, arg, op)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {arg} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: {arg} must have dtype in ({_name(dtypes)}), got {x.dtype}")
    return x


def same_device(op: str, **tensors) -> None:
    """All the tensors given (None skipped) on one device. Compares device indices (ints) for CUDA tensors and the
    devices themselves otherwise: a torch.device per tensor costs more than the rest of a small call's checks."""
    first = first_name = index = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first, first_name, index = t, name, t.get_device()
        elif (t.get_device() != index) if index >= 0 else (t.device != first.device):
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; all tensors must share a device"
            )


def size_arg(x, arg: str, op: str, allow_none: bool = True) -> int | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or isinstance(x, torch.Tensor) or not hasattr(x, "__index__"):
        # a tensor would need a host read to become a size; a bool is almost surely a misplaced flag
        raise TypeError(f"{op}: {arg} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < 0:
        raise ValueError(f"{op}: {arg} must be >= 0, got {x}")
    return x


def flag(x, arg: str, op: str) -> bool:
    if x is True or x is False:
        return x
    # bool(x) of a CUDA tensor would sync, and of a string or None would hide a misplaced argument
    if isinstance(x, torch.Tensor) or not isinstance(x, int):
        raise TypeError(f"{op}: {arg} must be a bool, got {type(x).__name__}")
    return bool(x)


def routing(op: str, routing_map, num_tokens: int, num_experts: int | None = None) -> torch.Tensor:
    tensor(routing_map, "routing_map", op, 2, MAP_DTYPES)
    if routing_map.shape[0] != num_tokens:
        raise ValueError(
            f"{op}: routing_map has {routing_map.shape[0]} rows but there are {num_tokens} tokens "
            f"(routing_map must be [num_tokens, num_experts])"
        )
    if num_experts is not None and routing_map.shape[1] != num_experts:
        raise ValueError(f"{op}: routing_map must have {num_experts} columns, got shape {tuple(routing_map.shape)}")
    if routing_map.shape[1] == 0:
        raise ValueError(
            f"{op}: routing_map must have at least one expert column, got shape {tuple(routing_map.shape)}"
        )
    if routing_map.shape[1] > MAX_EXPERTS:
        raise ValueError(f"{op}: at most {MAX_EXPERTS} experts are supported, routing_map has {routing_map.shape[1]}")
    return routing_map


def probs(op: str, p, num_tokens: int, num_experts: int, arg: str = "probs") -> torch.Tensor:
    tensor(p, arg, op, 2, FLOAT_DTYPES)
    if p.shape != (num_tokens, num_experts):
        raise ValueError(
            f"{op}: {arg} must be [num_tokens, num_experts] = [{num_tokens}, {num_experts}], got {tuple(p.shape)}"
        )
    return p


def restore_shape(op: str, shape, hidden: int) -> tuple[int, int]:
    if isinstance(shape, tuple) and len(shape) == 2 and type(shape[0]) is int and type(shape[1]) is int:
        dims = shape  # the common case (a torch.Size too), checked in a fraction of a microsecond
    else:
        # ints only: int() of a float or a str entry would be a silent cast, of a CUDA tensor a host sync
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"{op}: restore_shape must be a (num_tokens, hidden) tuple, got {type(shape).__name__}")
        if any(isinstance(d, (bool, torch.Tensor)) or not hasattr(d, "__index__") for d in shape):
            kinds = ", ".join(type(d).__name__ for d in shape)
            raise TypeError(f"{op}: restore_shape must hold ints (num_tokens, hidden), got ({kinds})")
        dims = tuple(d.__index__() for d in shape)
    if len(dims) != 2 or dims[0] < 0 or dims[1] < 0:
        raise ValueError(f"{op}: restore_shape must be (num_tokens, hidden) with sizes >= 0, got {tuple(dims)}")
    if dims[1] != hidden:
        raise ValueError(f"{op}: restore_shape hidden {dims[1]} != permuted_tokens.shape[1] = {hidden}")
    return dims


# ----------------------------------------------------------------------------------------------------------------
# Value checks: MOE_RAW_DEBUG=1 only (each reads the device: a host sync).


def routing_values(op: str, routing_map: torch.Tensor) -> None:
    """An integer map must hold 0 / 1. The kernels and the reference take any nonzero as routed, but another value
    usually means expert ids or counts were passed as the map."""
    if routing_map.dtype == torch.bool:
        return
    bad = ((routing_map != 0) & (routing_map != 1)).nonzero()
    if len(bad):
        t, e = bad[0].tolist()
        raise ValueError(
            f"{op}: routing_map must hold only 0 and 1, got {routing_map[t, e].item()} at [{t}, {e}] "
            f"({len(bad)} such entries; checked because MOE_RAW_DEBUG=1)"
        )


def index_values(op: str, sorted_indices: torch.Tensor, num_tokens: int) -> None:
    """sorted_indices (fused=False) must be token ids in [0, T). With T = 0 nothing is gathered (spare rows of an
    empty permute have index 0)."""
    if num_tokens == 0 or sorted_indices.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(sorted_indices)).tolist()
    if lo < 0 or hi >= num_tokens:
        raise ValueError(
            f"{op}: sorted_indices must be token ids in [0, {num_tokens}) (restore_shape[0] = {num_tokens}), got "
            f"values in [{lo}, {hi}] (checked because MOE_RAW_DEBUG=1)"
        )


def fused_row_map(op: str, row_map, num_tokens: int, arg: str, t_from: str, when: str = "") -> int:
    """permute(fused=True)'s int32 [T + 1, E] row map (or permute_and_pad's [T + 3, E]) for T = num_tokens (named
    ``t_from`` in the message); returns E."""
    tensor(row_map, arg, op)
    if row_map.dim() != 2 or row_map.dtype != torch.int32:
        raise TypeError(
            f"{op}: {when}{arg} must be permute(fused=True)'s row map (int32 [T+1, E]), got {row_map.dtype} of shape "
            f"{tuple(row_map.shape)}"
        )
    if row_map.shape[0] not in (num_tokens + 1, num_tokens + 3):  # [T + 3, E]: permute_and_pad's
        raise ValueError(
            f"{op}: {when}{arg} must be permute(fused=True)'s row map [T+1, E] (or permute_and_pad's [T+3, E]) "
            f"with T = {t_from} = {num_tokens}, got shape {tuple(row_map.shape)}"
        )
    num_experts = row_map.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:  # the kernels keep a token's row list in shared memory
        raise ValueError(
            f"{op}: {when}{arg} must have 1 to {MAX_EXPERTS} expert columns, got shape {tuple(row_map.shape)}"
        )
    return num_experts


def row_map_values(op: str, row_map: torch.Tensor, n_rows: int) -> None:
    """A fused row map [T + 1, E] for N = n_rows permuted rows: codes r in [0, N), -1, or -2 - r (padding) in
    [-1 - N, -2]; row_map[T, 0], the rows kept, in [0, N]."""
    kept = int(row_map[-1, 0])
    lo, hi = torch.stack(torch.aminmax(row_map[:-1])).tolist() if row_map.shape[0] > 1 else (-1, -1)
    if lo < -1 - n_rows or hi >= n_rows or not 0 <= kept <= n_rows:
        raise ValueError(
            f"{op}: the row map must be that of {n_rows} permuted rows: codes in "
            f"[{-1 - n_rows}, {n_rows - 1}] and row_map[T, 0] in [0, {n_rows}], got codes in [{lo}, {hi}] and "
            f"row_map[T, 0] = {kept} (checked because MOE_RAW_DEBUG=1)"
        )


def no_byte_grad(x: torch.Tensor, arg: str, op: str) -> None:
    """1-byte tokens (fp8) are moved as bytes; their gradient would be a sum of fp8 rows, which cannot be exact."""
    if x.dtype in BYTE_DTYPES and x.requires_grad and torch.is_grad_enabled():
        raise TypeError(
            f"{op}: {arg} is {x.dtype} with requires_grad=True; 1-byte tokens are moved as bytes and have no exact "
            f"gradient (it would sum {x.dtype} rows). Detach them, or permute a float16 / bfloat16 / float32 copy"
        )


def permute_inputs(op: str, tokens, routing_map, router_probs) -> tuple[int, int]:
    """tokens [T, H] (float or 1-byte, no 1-byte gradient), routing_map [T, E], probs [T, E] or None -> (T, E)."""
    tensor(tokens, "tokens", op, 2, TOKEN_DTYPES)
    no_byte_grad(tokens, "tokens", op)
    num_tokens = tokens.shape[0]
    routing(op, routing_map, num_tokens)
    num_experts = routing_map.shape[1]
    if router_probs is not None:
        probs(op, router_probs, num_tokens, num_experts)
    return num_tokens, num_experts


def permute_args(op: str, tokens, routing_map, router_probs, num_out_tokens, fused, drop_and_pad):
    """Every metadata check of ``moe_raw.permute``; returns (T, E, num_out_tokens as int or None, fused,
    drop_and_pad as bools). A call whose signature passed them before returns at once (``_signature``)."""
    sig = None
    if (
        fused.__class__ is bool
        and drop_and_pad.__class__ is bool
        and (num_out_tokens is None or num_out_tokens.__class__ is int)  # a bool would share 1's signature
    ):
        sig = _signature(op, (num_out_tokens, fused, drop_and_pad), tokens, routing_map, router_probs)
        hit = _checked.get(sig) if sig is not None else None  # traced (sig None): no read a guard could watch
        if hit is not None:
            return hit
    num_tokens, num_experts = permute_inputs(op, tokens, routing_map, router_probs)
    n_out = size_arg(num_out_tokens, "num_out_tokens", op)
    fused, drop_and_pad = flag(fused, "fused", op), flag(drop_and_pad, "drop_and_pad", op)
    if drop_and_pad and n_out is None:
        raise ValueError(f"{op}: drop_and_pad=True needs num_out_tokens (the capacity is num_out_tokens // E)")
    same_device(op, tokens=tokens, routing_map=routing_map, probs=router_probs)
    result = (num_tokens, num_experts, n_out, fused, drop_and_pad)
    if sig is not None and tokens.dtype not in BYTE_DTYPES:  # 1-byte tokens: the gradient check reads grad mode
        _remember(sig, result)
    return result


def unpermute_args(op: str, permuted_tokens, sorted_indices, shape, router_probs, routing_map, fused, drop_and_pad):
    """Every metadata check of ``moe_raw.unpermute`` (``shape``: its restore_shape); returns (T, N, fused,
    drop_and_pad as bools). A call whose signature passed them before returns at once (``_signature``)."""
    sig = None
    if (
        fused.__class__ is bool
        and drop_and_pad.__class__ is bool
        and shape.__class__ in (tuple, torch.Size)
        and len(shape) == 2
        and shape[0].__class__ is int
        and shape[1].__class__ is int
    ):
        sig = _signature(op, (shape, fused, drop_and_pad), permuted_tokens, sorted_indices, router_probs,
                         routing_map)  # fmt: skip
        hit = _checked.get(sig) if sig is not None else None
        if hit is not None:
            return hit
    tensor(permuted_tokens, "permuted_tokens", op, 2, FLOAT_DTYPES)
    n_rows, hidden = permuted_tokens.shape
    num_tokens, _ = restore_shape(op, shape, hidden)
    fused, drop_and_pad = flag(fused, "fused", op), flag(drop_and_pad, "drop_and_pad", op)
    if fused:
        num_experts = fused_row_map(
            op, sorted_indices, num_tokens, "sorted_indices", "restore_shape[0]", "with fused=True "
        )
    else:
        tensor(sorted_indices, "sorted_indices", op, 1, (torch.int64, torch.int32))
        if sorted_indices.shape[0] != n_rows:
            raise ValueError(
                f"{op}: sorted_indices has {sorted_indices.shape[0]} entries but permuted_tokens has {n_rows} rows"
            )
        num_experts = routing_map.shape[1] if isinstance(routing_map, torch.Tensor) and routing_map.dim() == 2 else None
    if routing_map is not None:
        routing(op, routing_map, num_tokens, num_experts)
        num_experts = routing_map.shape[1]
    if router_probs is not None:
        if num_experts is None:
            raise ValueError(f"{op}: routing_map is required when probs is given with fused=False (as in the seed)")
        probs(op, router_probs, num_tokens, num_experts)
    same_device(
        op, permuted_tokens=permuted_tokens, sorted_indices=sorted_indices, probs=router_probs, routing_map=routing_map
    )
    result = (num_tokens, n_rows, fused, drop_and_pad)
    if sig is not None:
        _remember(sig, result)
    return result


# Signatures of permute / unpermute calls whose metadata checks passed, and what the checks returned. Those checks
# read each tensor's class, shape, dtype, layout and device and the scalar arguments' values, all of which the
# signature holds, so a signature seen before cannot fail them: the call skips them (about 2 us of a small call's
# host time each, issue 16). Value checks (MOE_RAW_DEBUG=1) still run on every call.
_checked: dict = {}
_CHECKED_MAX = 1024  # a training run sees a few signatures; T changes every step after an expert-parallel all-to-all


def _signature(op: str, scalars: tuple, *tensors):
    """A hashable signature of a call (its scalar arguments, each tensor's metadata), or None where one could hide a
    failing check: a tensor subclass (torch.compile's fake tensors, a user's wrapper), a non-tensor where a tensor
    goes, or a call being traced by torch.compile. The callers admit scalars only of exact classes (a flag exactly
    a bool, a size exactly an int), as True == 1 would otherwise give a bad call a good call's signature."""
    if torch.compiler.is_compiling():
        return None
    parts = [op, scalars]
    for t in tensors:
        if t is None:
            parts.append(None)
        elif t.__class__ is torch.Tensor:
            parts.append((t.shape, t.dtype, t.layout, t.device))
        else:
            return None
    return tuple(parts)


def _remember(sig: tuple, result: tuple) -> None:
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    _checked[sig] = result


# ----------------------------------------------------------------------------------------------------------------
# Gated activations (moe_raw.activations): y [..., 2F] = [gate | up], weights [N, 1], g [..., F]


def dense(x, arg: str, op: str) -> None:
    # sparse / mkldnn tensors have no strides or data pointer to hand the kernels
    if x.layout is not torch.strided:
        raise TypeError(f"{op}: {arg} must be a dense (strided) tensor, got layout {x.layout}")


def glu_input(y, op: str, two_d: bool, arg: str = "y") -> int:
    """F of a valid y; else the error naming y. Every check reads metadata only (no host sync)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(y).__name__}")
    dense(y, arg, op)
    shape = y.shape
    if len(shape) != 2:
        if two_d:
            raise ValueError(f"{op}: {arg} must be 2-D [N, 2F], got shape {tuple(shape)}")
        if not shape:
            raise ValueError(f"{op}: {arg} must have a last dimension [..., 2F], got a 0-d tensor")
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32, float16, bfloat16 or float64, got {y.dtype}")
    last = shape[-1]
    if last & 1:
        raise ValueError(f"{op}: the last dim of {arg} must be even ([gate | up] halves), got shape {tuple(shape)}")
    return last >> 1


def same_device_as(x, y, arg: str, op: str) -> None:
    index = y.get_device()  # a CUDA index, or -1 (CPU and other devices: compare the devices themselves)
    if x.get_device() != index if index >= 0 else x.device != y.device:
        raise ValueError(f"{op}: {arg} is on {x.device} but y is on {y.device}; all tensors must share a device")


def glu_weights(weights, y, op: str, arg: str = "weights") -> None:
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor [N, 1], got {type(weights).__name__}")
    dense(weights, arg, op)
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32, float16, bfloat16 or float64, got {weights.dtype}")
    shape, n_rows = weights.shape, y.shape[0]
    if len(shape) != 2 or shape[1] != 1 or shape[0] != n_rows:
        raise ValueError(f"{op}: {arg} must be [N, 1] with N = {n_rows} (rows of y), got {tuple(shape)}")
    same_device_as(weights, y, arg, op)


def glu_grad(g, y, f: int, op: str) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: g must be a torch.Tensor, got {type(g).__name__}")
    dense(g, "g", op)
    if g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: g must be float32, float16, bfloat16 or float64, got {g.dtype}")
    g_shape, y_shape = g.shape, y.shape
    if len(g_shape) == 2 == len(y_shape):  # the common case, without building torch.Size slices
        bad = g_shape[0] != y_shape[0] or g_shape[1] != f
    else:
        bad = len(g_shape) != len(y_shape) or g_shape[-1] != f or g_shape[:-1] != y_shape[:-1]
    if bad:
        expected = (*y_shape[:-1], f)
        raise ValueError(f"{op}: g must be [..., F] = {expected} for y {tuple(y_shape)}, got {tuple(g_shape)}")
    same_device_as(g, y, "g", op)


def act_constant(value, arg: str, op: str) -> float:
    """A finite float from a Python number or a 0-d CPU tensor (Megatron's Function takes linear_offset as a
    tensor). It is compiled into the kernel: a CUDA tensor (reading it would sync the host) and NaN / inf (never
    equal to themselves, so never a cache hit) are refused."""
    if value.__class__ is not float:  # a plain float, the common case, skips these checks (~1 us a call)
        if isinstance(value, torch.Tensor):
            if value.dim() != 0 or value.device.type != "cpu":
                raise TypeError(
                    f"{op}: {arg} must be a Python float or a 0-d CPU tensor (it is compiled into the kernel; reading "
                    f"a CUDA tensor would sync the host), got a tensor of shape {tuple(value.shape)} on {value.device}"
                )
            value = value.item()
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {arg} must be a float, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {arg} must be finite, got {value}")
    return value


def act_limit(value, arg: str, op: str) -> float:
    limit = act_constant(value, arg, op)
    if limit <= 0:
        raise ValueError(f"{op}: {arg} must be > 0 (the clamp is [-{arg}, {arg}] on the linear half), got {limit}")
    return limit


def fp8_flag(fp8_input_store, op: str) -> None:
    # bool() of a CUDA tensor would sync, of a string would hide a misplaced argument
    if isinstance(fp8_input_store, torch.Tensor) or not isinstance(fp8_input_store, (bool, int)):
        raise TypeError(f"{op}: fp8_input_store must be a bool, got {type(fp8_input_store).__name__}")


def glu_bias(bias, input, op: str) -> None:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    dense(bias, "bias", op)
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: bias must be float32, float16, bfloat16 or float64, got {bias.dtype}")
    try:
        fits = torch.broadcast_shapes(bias.shape, input.shape) == input.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: bias must broadcast to input {tuple(input.shape)}, got {tuple(bias.shape)}")
    same_device_as(bias, input, "bias", op)


# ----------------------------------------------------------------------------------------------------------------
# FP8 quantization (moe_raw.quantize): recipes and dtypes of moe_raw.reference_fp8


def fp8_recipe(recipe, fp8_dtype, hidden: int, op: str) -> None:
    """recipe one of RF.RECIPES, fp8_dtype float8_e4m3fn / float8_e5m2, and H % 32 == 0 for "mxfp8"."""
    if not isinstance(recipe, str):
        raise TypeError(f"{op}: recipe must be a str, one of {RF.RECIPES}, got {type(recipe).__name__}")
    if recipe not in RF.RECIPES:
        raise ValueError(f"{op}: recipe must be one of {RF.RECIPES}, got {recipe!r}")
    if not isinstance(fp8_dtype, torch.dtype) or fp8_dtype not in RF.FP8_MAX:
        raise TypeError(f"{op}: fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype!r}")
    if recipe == "mxfp8" and hidden % RF.MX_BLOCK:
        raise ValueError(
            f"{op}: recipe 'mxfp8' needs the hidden size to be a multiple of {RF.MX_BLOCK} (one E8M0 scale per "
            f"{RF.MX_BLOCK} elements), got H = {hidden}"
        )


def fp8_layout(scale_layout, recipe: str, op: str) -> None:
    """scale_layout one of RF.SCALE_LAYOUTS and fitting the recipe ("column-major": blockwise, "swizzled": mxfp8)."""
    if not isinstance(scale_layout, str):
        raise TypeError(
            f"{op}: scale_layout must be a str, one of {RF.SCALE_LAYOUTS}, got {type(scale_layout).__name__}"
        )
    error = RF.layout_error(scale_layout, recipe)
    if error:
        raise ValueError(f"{op}: {error}")


def fp8_scales(q, scales, recipe, op: str, scale_layout="row-major") -> None:
    """q [N, H] float8_e4m3fn / float8_e5m2 and the scales its recipe gives (shape and dtype: RF.scale_shape), in
    scale_layout: "column-major" a [N, G] view with unit row stride and column stride >= N; "swizzled" [R, C] or its
    flat [R * C] (RF.layout_shape)."""
    tensor(q, "q", op, 2, tuple(RF.FP8_MAX))
    if not isinstance(recipe, str) or recipe not in RF.RECIPES:
        raise ValueError(f"{op}: recipe must be one of {RF.RECIPES}, got {recipe!r}")
    fp8_layout(scale_layout, recipe, op)
    num_rows, hidden = q.shape
    if recipe == "mxfp8" and hidden % RF.MX_BLOCK:
        raise ValueError(f"{op}: recipe 'mxfp8' needs q.shape[1] % {RF.MX_BLOCK} == 0, got H = {hidden}")
    tensor(scales, "scales", op, None, (RF.scale_dtype(recipe),))
    expected = RF.layout_shape(num_rows, hidden, recipe, scale_layout)
    shape = tuple(scales.shape)
    if scale_layout == "swizzled":
        if shape not in (expected, (expected[0] * expected[1],)):
            raise ValueError(
                f"{op}: swizzled mxfp8 scales must be [ceil(N / 128) * 128, ceil(H / 32 / 4) * 4] = {list(expected)} "
                f"(or its {expected[0] * expected[1]} bytes flat) for q {tuple(q.shape)}, got {shape}"
            )
    elif shape != expected:
        what = {"rowwise": "[N]", "blockwise": "[N, ceil(H / 128)]", "mxfp8": "[N, H / 32]"}[recipe]
        raise ValueError(f"{op}: {recipe} scales must be {what} = {list(expected)} for q {tuple(q.shape)}, got {shape}")
    if scale_layout == "column-major":
        rows_ok = num_rows <= 1 or scales.stride(0) == 1
        cols_ok = expected[1] <= 1 or scales.stride(1) >= num_rows
        if not (rows_ok and cols_ok):
            raise ValueError(
                f"{op}: column-major scales must be a [N, G] view with strides (1, >= N) (N_pad = ceil(N / 4) * 4 as "
                f"permute_quantized makes them), got strides {scales.stride()}"
            )
    same_device(op, q=q, scales=scales)
