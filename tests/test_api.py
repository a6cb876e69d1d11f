"""Public API (CPU, runs in CI): moe_raw is a drop-in for the seed's ``moe_utils`` functions, so every public
function keeps the seed's parameter names, order, kinds and defaults (the seed: NeMo Automodel's
``moe_utils`` API, transcribed below), and documents its shapes.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import pytest
import torch

import moe_raw
import moe_raw.reference

_ = inspect.Parameter.empty

# name -> [(parameter, default)], all positional-or-keyword as in the seed.
SEED_SIGNATURES = {
    "permute": [
        ("tokens", _),
        ("routing_map", _),
        ("probs", None),
        ("num_out_tokens", None),
        ("fused", False),
        ("drop_and_pad", False),
    ],
    "unpermute": [
        ("permuted_tokens", _),
        ("sorted_indices", _),
        ("restore_shape", _),
        ("probs", None),
        ("routing_map", None),
        ("fused", False),
        ("drop_and_pad", False),
    ],
    "swiglu": [("y", _)],
    "weighted_swiglu": [("y", _), ("weights", _)],
    "swiglu_back": [("g", _), ("y", _)],
    # NeMo Automodel 0.7 added the keyword-only need_weight_grad
    "weighted_swiglu_back": [
        ("g", _),
        ("y", _),
        ("weights", _),
        ("need_weight_grad", True, inspect.Parameter.KEYWORD_ONLY),
    ],
    "weighted_bias_swiglu_impl": [("input", _), ("weights", _), ("fp8_input_store", False)],
    # Megatron moe_utils (issue #7): the regrouping after the expert-parallel all-to-all.
    "sort_chunks_by_idxs": [("input", _), ("split_sizes", _), ("sorted_idxs", _), ("probs", None), ("fused", False)],
}
# moe_raw's own additions (issue #7), no seed counterpart: their docstrings must state shapes too. The activation
# variants keep Megatron-LM's names and parameters (checked in tests/test_activations.py).
EXTRAS = (
    "topk_to_routing",
    "permute_topk",
    "unpermute_topk",
    "permute_and_pad",
    "permute_with_row_map",
    "quick_geglu",
    "weighted_quick_geglu",
    "quick_geglu_back",
    "weighted_quick_geglu_back",
    "WeightedQuickGeGLUFunction",
    "weighted_bias_quick_geglu_impl",
    "clamped_swiglu",
    "weighted_clamped_swiglu",
    "clamped_swiglu_back",
    "weighted_clamped_swiglu_back",
    # NeMo Automodel 0.7's moe_utils (issue 17)
    "quick_gelu",
    "weighted_bias_quick_geglu",
    "weighted_bias_quick_geglu_back",
    "WeightedBiasQuickGeGLUFunction",
    "MoEAuxLossAutoScaler",
    "geglu",
    "weighted_geglu",
    "geglu_back",
    "weighted_geglu_back",
    "WeightedGEGLUFunction",
    "weighted_bias_geglu_impl",
    # Megatron-LM main's router functions (issue 18)
    "topk_routing_with_score_function",
    "compute_routing_scores_for_aux_loss",
    "switch_load_balancing_loss_func",
    "z_loss_func",
    # FP8 quantize-on-permute (issue 19)
    "permute_quantized",
    "unpermute_grad_quantized",
    "dequantize",
)
PUBLIC = set(SEED_SIGNATURES) | {"WeightedSwiGLUFunction", "MoEAlltoAllDispatcher"} | set(EXTRAS)

# A bracketed shape naming a dimension letter: "[T, H]", "[N, 1]", "[..., 2F]", "[T + 1, E]".
SHAPE = re.compile(r"\[[^\]\n]*[TNHEKF][^\]\n]*\]")


def _params(fn) -> list[tuple]:
    # repr() keeps False apart from 0 and None apart from a missing default.
    return [(p.name, repr(p.default), p.kind) for p in inspect.signature(fn).parameters.values()]


def _seed(name: str) -> list[tuple]:
    return [
        (p[0], repr(p[1]), p[2] if len(p) > 2 else inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in SEED_SIGNATURES[name]
    ]


def test_all_is_exactly_the_public_api():
    assert len(moe_raw.__all__) == len(set(moe_raw.__all__)), "duplicates in moe_raw.__all__"
    assert set(moe_raw.__all__) == PUBLIC


def test_star_import_resolves_every_name():
    namespace: dict = {}
    exec("from moe_raw import *", namespace)
    assert PUBLIC <= namespace.keys()


def test_version():
    assert isinstance(moe_raw.__version__, str) and moe_raw.__version__
    try:
        installed = importlib.metadata.version("moe_raw")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("moe_raw is not installed (pip install -e .)")
    assert installed == moe_raw.__version__, "installed metadata is stale: reinstall with pip install -e ."


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_signature_matches_seed(name):
    assert _params(getattr(moe_raw, name)) == _seed(name)


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_reference_signature_matches_seed(name):
    # The reference is the tests' oracle and the benchmark's seed provider: it takes the same arguments.
    assert _params(getattr(moe_raw.reference, name)) == _seed(name)


def test_weighted_swiglu_function_is_the_seeds():
    fn = moe_raw.WeightedSwiGLUFunction
    assert inspect.isclass(fn) and issubclass(fn, torch.autograd.Function)
    assert list(inspect.signature(fn.forward).parameters) == ["ctx", "input", "weights", "fp8_input_store"]
    assert inspect.getdoc(fn), "WeightedSwiGLUFunction has no docstring"


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES) + list(EXTRAS))
def test_docstring_states_shapes(name):
    doc = inspect.getdoc(getattr(moe_raw, name))
    assert doc, f"moe_raw.{name} has no docstring"
    assert SHAPE.search(doc), f"moe_raw.{name}'s docstring states no shape such as [T, H] or [N, 2F]"
