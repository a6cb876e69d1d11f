"""moe_raw: no-compile GPU kernels for Mixture-of-Experts token dispatch.

A drop-in for the permute / unpermute / SwiGLU / GEGLU / Quick-GEGLU functions of Megatron-style ``moe_utils``.
CUDA tensors run moe_raw's kernels (compiled at first use by NVRTC through CuPy, launched on torch's current
stream); CPU tensors run the pure-torch reference (``moe_raw.reference``). ``import moe_raw`` needs neither a
GPU nor CuPy.
"""

__version__ = "0.2.0"

from moe_raw.activations import (
    WeightedBiasQuickGeGLUFunction,
    WeightedGEGLUFunction,
    WeightedQuickGeGLUFunction,
    WeightedSwiGLUFunction,
    clamped_swiglu,
    clamped_swiglu_back,
    geglu,
    geglu_back,
    quick_geglu,
    quick_geglu_back,
    quick_gelu,
    swiglu,
    swiglu_back,
    weighted_bias_geglu_impl,
    weighted_bias_quick_geglu,
    weighted_bias_quick_geglu_back,
    weighted_bias_quick_geglu_impl,
    weighted_bias_swiglu_impl,
    weighted_clamped_swiglu,
    weighted_clamped_swiglu_back,
    weighted_geglu,
    weighted_geglu_back,
    weighted_quick_geglu,
    weighted_quick_geglu_back,
    weighted_swiglu,
    weighted_swiglu_back,
)
from moe_raw.aux_loss import MoEAuxLossAutoScaler
from moe_raw.chunks import sort_chunks_by_idxs
from moe_raw.dispatcher import MoEAlltoAllDispatcher
from moe_raw.padding import permute_and_pad, permute_with_row_map
from moe_raw.permutation import permute, unpermute
from moe_raw.quantize import dequantize, permute_quantized, unpermute_grad_quantized
from moe_raw.router import (
    compute_routing_scores_for_aux_loss,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)
from moe_raw.topk import permute_topk, topk_to_routing, unpermute_topk

__all__ = [
    "MoEAlltoAllDispatcher",
    "permute",
    "unpermute",
    "sort_chunks_by_idxs",
    "topk_to_routing",
    "permute_topk",
    "unpermute_topk",
    "permute_and_pad",
    "permute_with_row_map",
    "permute_quantized",
    "unpermute_grad_quantized",
    "dequantize",
    "swiglu",
    "weighted_swiglu",
    "swiglu_back",
    "weighted_swiglu_back",
    "WeightedSwiGLUFunction",
    "weighted_bias_swiglu_impl",
    "geglu",
    "weighted_geglu",
    "geglu_back",
    "weighted_geglu_back",
    "WeightedGEGLUFunction",
    "weighted_bias_geglu_impl",
    "quick_geglu",
    "weighted_quick_geglu",
    "quick_geglu_back",
    "weighted_quick_geglu_back",
    "WeightedQuickGeGLUFunction",
    "weighted_bias_quick_geglu_impl",
    "quick_gelu",
    "weighted_bias_quick_geglu",
    "weighted_bias_quick_geglu_back",
    "WeightedBiasQuickGeGLUFunction",
    "MoEAuxLossAutoScaler",
    "topk_routing_with_score_function",
    "compute_routing_scores_for_aux_loss",
    "switch_load_balancing_loss_func",
    "z_loss_func",
    "clamped_swiglu",
    "weighted_clamped_swiglu",
    "clamped_swiglu_back",
    "weighted_clamped_swiglu_back",
]
