"""The package's layout stays one way down (CPU, CI): public op modules on top, then the custom ops, then the kernel
launchers and code generation, then the one launcher, the one validation module, the one reference. Every import
inside moe_raw (module level or inside a function) must go to a lower layer: no cycle, no climb back up. And no
module grows past a size a newcomer can read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_raw"
MAX_LINES = 700

# Lower number = lower layer. A module may import only modules of a strictly lower layer.
LAYERS = {
    "moe_raw._env": 0,
    "moe_raw.reference": 0,
    "moe_raw.reference_fp8": 0,
    "moe_raw._validate": 1,
    "moe_raw._cupy_cache": 0,
    "moe_raw._launch": 1,
    "moe_raw._cpu": 1,
    "moe_raw._kernels": 1,
    "moe_raw._kernels.glu_intrinsics": 0,
    "moe_raw._kernels.glu_codegen": 1,
    "moe_raw._kernels.glu_launch": 2,
    "moe_raw._kernels.dispatch": 2,
    "moe_raw._kernels.router": 2,
    "moe_raw._kernels.quantize": 2,
    "moe_raw._ops": 3,
    "moe_raw.permutation": 4,
    "moe_raw.padding": 4,
    "moe_raw.chunks": 4,
    "moe_raw.activations": 4,
    "moe_raw.aux_loss": 4,
    "moe_raw.router": 4,
    "moe_raw.topk": 5,
    "moe_raw.dispatcher": 5,
    "moe_raw.megatron": 5,
    "moe_raw.quantize": 5,
    "moe_raw": 6,
    "moe_raw.integrations": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """moe_raw modules imported anywhere in the file (``import a.b``, ``from a import b`` where b may be a module)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moe_raw"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_raw"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in LAYERS else node.module)
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"modules without a layer in tests/test_layout.py: {missing}"


def test_imports_only_go_down():
    upward = []
    for name, path in _modules().items():
        for target in _imports(path):
            if target == name:
                continue
            if LAYERS.get(target, -1) >= LAYERS[name]:
                upward.append(f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS.get(target)})")
    assert not upward, "imports that do not go down:\n" + "\n".join(upward)


def test_no_module_is_too_long():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
