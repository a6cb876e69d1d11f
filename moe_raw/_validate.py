"""Input validation shared by every public op. Errors name the argument and what was expected; nothing is cast.

All checks read shapes, dtypes and devices only: none of them syncs the host with the GPU.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# 1-byte token dtypes that permute moves as bytes (fp8 activations); arithmetic ops reject them.
BYTE_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
) + (torch.uint8, torch.int8)
MAP_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_EXPERTS = 4096  # the row kernels keep a token's row list (one int per expert) in shared memory
MAX_ROWS = 2**31 - 3  # row ids are int32, and -2 - row must fit too


def _name(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x, arg: str, op: str, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {arg} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: {arg} must have dtype in ({_name(dtypes)}), got {x.dtype}")
    return x


def same_device(op: str, **tensors) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(
                f"{op}: {k} is on {v.device} but {items[0][0]} is on {dev}; all tensors must share a device"
            )
    return dev


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
    if tuple(p.shape) != (num_tokens, num_experts):
        raise ValueError(
            f"{op}: {arg} must be [num_tokens, num_experts] = [{num_tokens}, {num_experts}], got {tuple(p.shape)}"
        )
    return p


def restore_shape(op: str, shape, hidden: int) -> tuple[int, int]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"{op}: restore_shape must be a (num_tokens, hidden) sequence, got {shape!r}") from None
    if len(dims) != 2 or min(dims) < 0:
        raise ValueError(f"{op}: restore_shape must be (num_tokens, hidden) with sizes >= 0, got {tuple(shape)}")
    if dims[1] != hidden:
        raise ValueError(f"{op}: restore_shape hidden {dims[1]} != permuted_tokens.shape[1] = {hidden}")
    return dims
