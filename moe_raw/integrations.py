"""Switch an installed MoE stack over to moe_raw with one call, the way kernel libraries are usually enabled.

``apply_to_automodel()`` replaces the functions of NeMo Automodel's ``moe_utils``
(``nemo_automodel.components.moe.megatron.moe_utils``) that moe_raw implements (same names and signatures, checked
against the package by tests/test_automodel.py) with moe_raw's, in that module and in every already imported
``nemo_automodel`` module that imported them by name (``from .moe_utils import permute``); modules imported later
get moe_raw's through the patched module. It returns what it patched, does nothing more when called again, and
``undo_automodel()`` puts the originals back.

Left alone: ``quick_gelu`` (plain torch in both; no kernel of moe_raw's behind it) and ``MoEAuxLossAutoScaler``, whose
class attribute the training loop sets on the package's class.
"""

from __future__ import annotations

import importlib
import sys

import moe_raw

AUTOMODEL_MODULE = "nemo_automodel.components.moe.megatron.moe_utils"
# Names of the module that moe_raw also exports but does not swap: no kernel of moe_raw's behind them, or (the aux-loss
# scaler) a class attribute the training loop sets on the package's own class.
NOT_SWAPPED = frozenset({"quick_gelu", "MoEAuxLossAutoScaler"})


def automodel_names(module) -> list[str]:
    """The names ``apply_to_automodel`` swaps: moe_raw's public names that ``module`` has, less ``NOT_SWAPPED``."""
    return [n for n in moe_raw.__all__ if n not in NOT_SWAPPED and n in vars(module)]


# (module name, attribute) -> the original object, for every attribute patched and not yet restored.
_ORIGINALS: dict = {}


def apply_to_automodel() -> list[str]:
    """Point NeMo Automodel's ``moe_utils`` functions (and the modules that imported them) at moe_raw's.

    Returns:
        ``"module:name"`` for each attribute patched by this call, sorted (empty when everything was already).

    Raises:
        ModuleNotFoundError: NeMo Automodel is not installed.
    """
    module = importlib.import_module(AUTOMODEL_MODULE)
    package = AUTOMODEL_MODULE.split(".", 1)[0]
    patched = []
    for name in automodel_names(module):
        ours = getattr(moe_raw, name)
        original = getattr(module, name, None)
        if original is None:
            continue
        if original is ours:  # already patched: the original is on record
            original = _ORIGINALS[(AUTOMODEL_MODULE, name)]
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == package or mod_name.startswith(package + ".")):
                continue
            if vars(mod).get(name) is original:
                _ORIGINALS[(mod_name, name)] = original
                setattr(mod, name, ours)
                patched.append(f"{mod_name}:{name}")
    return sorted(patched)


def undo_automodel() -> list[str]:
    """Put back every original that ``apply_to_automodel`` replaced. Returns ``"module:name"`` of each restored."""
    restored = []
    for (mod_name, name), original in list(_ORIGINALS.items()):
        mod = sys.modules.get(mod_name)
        if mod is not None and getattr(mod, name, None) is getattr(moe_raw, name):
            setattr(mod, name, original)
            restored.append(f"{mod_name}:{name}")
        del _ORIGINALS[(mod_name, name)]
    return sorted(restored)
