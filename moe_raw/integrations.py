"""Switch an installed MoE stack over to moe_raw with one call, the way kernel libraries are usually enabled.

``apply_to_automodel()`` replaces the functions of NeMo Automodel's ``moe_utils``
(``nemo_automodel.components.moe.megatron.moe_utils``) that moe_raw implements (same names and signatures, checked
against the package by tests/test_automodel.py) with moe_raw's, in that module and in every already imported
``nemo_automodel`` module that imported them by name (``from .moe_utils import permute``); modules imported later
get moe_raw's through the patched module. It returns what it patched, does nothing more when called again, and
``undo_automodel()`` puts the originals back.

``apply_to_megatron()`` / ``undo_megatron()`` do the same for Megatron-LM (``megatron-core``): ``permute``,
``unpermute`` and ``sort_chunks_by_idxs`` of ``megatron.core.transformer.moe.moe_utils`` (where the installed
``permute`` / ``unpermute`` have Megatron-LM main's signatures, with ``tokens_per_expert`` / ``align_size`` /
``pad_offsets`` / the batch-invariant inverse map, ``moe_raw.megatron``'s take their place), the SwiGLU functions and
``WeightedSwiGLUFunction`` of ``megatron.core.fusions.fused_bias_swiglu`` (Megatron's own
``weighted_bias_swiglu_impl``, whose signature has a bias, then runs moe_raw's Function), and the GEGLU / Quick-GEGLU
functions of ``megatron.core.fusions.fused_bias_geglu`` (tests/test_integrations.py checks each against Megatron's).

Left alone: ``quick_gelu`` (plain torch in both; no kernel of moe_raw's behind it), ``MoEAuxLossAutoScaler``, whose
class attribute the training loop sets on the package's class, and in Megatron the two Quick-GEGLU Functions, which
Megatron calls with ``linear_offset`` as a tensor on the GPU (moe_raw compiles it into the kernel and would have to
read it back), and the functions whose signatures differ (``weighted_bias_swiglu_impl``, the ``bias_*_impl``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings

import moe_raw
from moe_raw import megatron as megatron_main

AUTOMODEL_MODULE = "nemo_automodel.components.moe.megatron.moe_utils"
# Names of the module that moe_raw also exports but does not swap: no kernel of moe_raw's behind them, or (the aux-loss
# scaler) a class attribute the training loop sets on the package's own class.
NOT_SWAPPED = frozenset({"quick_gelu", "MoEAuxLossAutoScaler"})
# Megatron-LM: module -> the names swapped there (same signature and meaning as moe_raw's).
MEGATRON_MODULES = {
    "megatron.core.transformer.moe.moe_utils": (
        "permute", "unpermute", "sort_chunks_by_idxs", "topk_routing_with_score_function",
        "compute_routing_scores_for_aux_loss", "switch_load_balancing_loss_func", "z_loss_func",
    ),
    "megatron.core.fusions.fused_bias_swiglu": (
        "swiglu", "swiglu_back", "weighted_swiglu", "weighted_swiglu_back", "WeightedSwiGLUFunction",
    ),
    "megatron.core.fusions.fused_bias_geglu": (
        "geglu", "geglu_back", "quick_geglu", "quick_geglu_back", "weighted_quick_geglu", "weighted_quick_geglu_back",
        "weighted_bias_quick_geglu", "weighted_bias_quick_geglu_back", "weighted_bias_quick_geglu_impl",
    ),
}  # fmt: skip


# Megatron-LM main's 5-value permute and its unpermute: swapped for these where the installed function's signature is
# theirs rather than moe_raw's own (megatron-core 0.16.1 has moe_raw's).
MEGATRON_MAIN = {"permute": megatron_main.permute, "unpermute": megatron_main.unpermute}
# Defaults that differ between Megatron versions without changing the meaning: align_size 0 and -1 both mean "no
# alignment" (moe_raw.megatron pads only for align_size > 0).
_SAME_MEANING = {"align_size": frozenset({0, -1})}


def automodel_names(module) -> list[str]:
    """The names ``apply_to_automodel`` swaps: moe_raw's public names that ``module`` has, less ``NOT_SWAPPED``."""
    return [n for n in moe_raw.__all__ if n not in NOT_SWAPPED and n in vars(module)]


# stack ("automodel" | "megatron") -> {(module name, attribute): the original object}, for every attribute patched
# and not yet restored.
_ORIGINALS: dict = {"automodel": {}, "megatron": {}}


def _ours(name: str, alternatives: dict) -> list:
    """moe_raw's objects that may replace ``name``: its own, then the alternative for another signature."""
    return [getattr(moe_raw, name)] + ([alternatives[name]] if name in alternatives else [])


def _apply(stack: str, package: str, swaps: dict, alternatives: dict | None = None) -> list[str]:
    """Point each ``swaps`` module's names (module name -> names) at moe_raw's (or at ``alternatives[name]`` where
    the original has its signature instead), there and in every imported module of ``package`` holding the same
    original object. Returns ``"module:name"`` of each attribute patched."""
    originals = _ORIGINALS[stack]
    alternatives = alternatives or {}
    patched = []
    for module_name, names in swaps.items():
        module = importlib.import_module(module_name)
        for name in names:
            candidates = _ours(name, alternatives)
            ours = candidates[0]
            original = getattr(module, name, None)
            if original is None:
                continue
            if any(original is c for c in candidates):  # already patched: the original is on record
                ours, original = original, originals[(module_name, name)]
            elif any(_same_parameters(original, c) for c in candidates):
                ours = next(c for c in candidates if _same_parameters(original, c))
            else:
                warnings.warn(
                    f"moe_raw.integrations: {module_name}.{name} has a signature moe_raw's does not take "
                    f"({_signature(original)} vs {' or '.join(str(_signature(c)) for c in candidates)}); left as "
                    f"it is",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            for mod_name, mod in list(sys.modules.items()):
                if mod is None or not (mod_name == package or mod_name.startswith(package + ".")):
                    continue
                if vars(mod).get(name) is original:
                    originals[(mod_name, name)] = original
                    setattr(mod, name, ours)
                    patched.append(f"{mod_name}:{name}")
    return sorted(patched)


def _signature(obj) -> inspect.Signature | None:
    fn = obj.forward if inspect.isclass(obj) else obj
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)  # torch.compile's wrapper
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # e.g. a TorchScript function
        return None


def _same_parameters(original, ours) -> bool:
    """ours takes the original's parameters, in order, with its defaults (and any more only with defaults): a newer
    package whose function grew a parameter or changed a default is not patched (``_SAME_MEANING`` lists the
    defaults that may differ)."""
    theirs, mine = _signature(original), _signature(ours)
    if theirs is None or mine is None:
        return False
    t, m = list(theirs.parameters.values()), list(mine.parameters.values())
    if len(m) < len(t):
        return False
    for a, b in zip(m, t, strict=False):
        if (a.name, a.kind) != (b.name, b.kind):
            return False
        if a.default != b.default:
            same = _SAME_MEANING.get(a.name)
            if same is None or a.default not in same or b.default not in same:
                return False
    return all(p.default is not inspect.Parameter.empty for p in m[len(t) :])


def _undo(stack: str) -> list[str]:
    originals = _ORIGINALS[stack]
    restored = []
    for (mod_name, name), original in list(originals.items()):
        mod = sys.modules.get(mod_name)
        current = getattr(mod, name, None) if mod is not None else None
        if mod is not None and any(current is c for c in _ours(name, MEGATRON_MAIN)):
            setattr(mod, name, original)
            restored.append(f"{mod_name}:{name}")
        del originals[(mod_name, name)]
    return sorted(restored)


def apply_to_automodel() -> list[str]:
    """Point NeMo Automodel's ``moe_utils`` functions (and the modules that imported them) at moe_raw's.

    Returns:
        ``"module:name"`` for each attribute patched by this call, sorted (empty when everything was already).

    Raises:
        ModuleNotFoundError: NeMo Automodel is not installed.
    """
    module = importlib.import_module(AUTOMODEL_MODULE)
    return _apply("automodel", AUTOMODEL_MODULE.split(".", 1)[0], {AUTOMODEL_MODULE: automodel_names(module)})


def undo_automodel() -> list[str]:
    """Put back every original that ``apply_to_automodel`` replaced. Returns ``"module:name"`` of each restored."""
    return _undo("automodel")


def apply_to_megatron() -> list[str]:
    """Point Megatron-LM's ``moe_utils`` permute / unpermute / sort_chunks_by_idxs and its fused SwiGLU / GEGLU /
    Quick-GEGLU functions (``MEGATRON_MODULES``), and the ``megatron`` modules that imported them, at moe_raw's.
    A ``permute`` / ``unpermute`` with Megatron-LM main's signature (5-value permute) gets ``moe_raw.megatron``'s.

    Returns:
        ``"module:name"`` for each attribute patched by this call, sorted (empty when everything was already).

    Raises:
        ModuleNotFoundError: megatron-core is not installed.
    """
    return _apply("megatron", "megatron", MEGATRON_MODULES, MEGATRON_MAIN)


def undo_megatron() -> list[str]:
    """Put back every original that ``apply_to_megatron`` replaced. Returns ``"module:name"`` of each restored."""
    return _undo("megatron")
