"""The SwiGLU family: swiglu, weighted_swiglu, their backward, WeightedSwiGLUFunction, weighted_bias_swiglu_impl.

y [..., 2F] holds [gate | up] (torch.chunk(y, 2, -1)); weights [N, 1].
The Numba CUDA kernels are issue #4. Until they land, every device runs the seed's torch functions
(``moe_raw.reference``) behind the seed's exact signatures, so callers can switch to moe_raw today.
"""

from __future__ import annotations

import torch

from moe_raw import reference


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. y: [..., 2F] float. Returns [..., F] in y.dtype."""
    return reference.swiglu(y)


def weighted_swiglu(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """swiglu(y) * weights, returned in y.dtype. y: [N, 2F], weights: [N, 1]."""
    return reference.weighted_swiglu(y, weights)


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of swiglu. g: [..., F], y: [..., 2F]. Returns dy [..., 2F]."""
    return reference.swiglu_back(g, y)


def weighted_swiglu_back(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
    """Gradients of weighted_swiglu. g: [N, F], y: [N, 2F], weights: [N, 1].

    Returns (dy [N, 2F] in y.dtype, dweights [N, 1] in weights.dtype).
    """
    return reference.weighted_swiglu_back(g, y, weights)


WeightedSwiGLUFunction = reference.WeightedSwiGLUFunction


def weighted_bias_swiglu_impl(input: torch.Tensor, weights: torch.Tensor, fp8_input_store: bool = False):
    """Token-weighted SwiGLU with autograd. input: [N, 2F] or [S, B, 2F]; weights: [N, 1] (N = S * B).

    Returns [N, F] or [S, B, F] in input.dtype. fp8_input_store=True saves the input as float8_e4m3fn for backward.
    """
    return reference.weighted_bias_swiglu_impl(input, weights, fp8_input_store)
