"""Packaging (CPU, runs in CI): the wheel ships the kernel sources, the installed package finds them through
importlib.resources, and ``import moe_raw`` stays light on a machine with no GPU.

kernels/ is mapped to the package ``moe_raw.kernels`` by setup.cfg (package_dir + package_data); an editable
install needs kernels/__init__.py for that (pypa/setuptools#4248). Where ``moe_raw`` is imported from a checkout
(editable or not), moe_raw._launch reads that checkout's kernels/, whatever ``moe_raw.kernels`` maps to.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = (*sorted(p.name for p in (Path(__file__).parents[1] / "kernels").glob("*.cu")), "common.cuh")
HEAVY_MODULES = ("cupy", "cupyx", "cupy_backends", "numba", "numba_cuda")

# Never copied into the build tree: VCS, venvs, caches and earlier build output (a stale build/lib would
# put files into the wheel that the source tree no longer has).
_SKIP_NAMES = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def _skip(directory: str, names: list[str]) -> set[str]:
    skipped = set()
    for name in names:
        path = Path(directory, name)
        if (
            name in _SKIP_NAMES
            or name.endswith(".egg-info")
            or name.startswith(".venv")
            or (path / "pyvenv.cfg").exists()
        ):
            skipped.add(name)
    return skipped


def _backend_installed() -> bool:
    """Whether pyproject's build requirements (setuptools>=64, wheel) are importable here."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 64 and importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    # Build from a copy: setuptools writes build/ and *.egg-info next to setup.cfg.
    shutil.copytree(ROOT, src, ignore=_skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if _backend_installed():
        cmd.insert(4, "--no-build-isolation")  # about 5 s; an isolated build first fetches setuptools and wheel
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = sorted(out.glob("moe_raw-*.whl"))
    assert len(wheels) == 1, f"expected one moe_raw wheel in {out}, found {os.listdir(out)}"
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def test_wheel_ships_kernel_sources(wheel):
    names = set(wheel.namelist())
    for name in KERNEL_FILES + ("__init__.py",):
        assert f"moe_raw/kernels/{name}" in names, f"moe_raw/kernels/{name} missing from the wheel"
    # Every kernel source of the checkout, not only the two the launcher loads today.
    for path in sorted((ROOT / "kernels").glob("*.cu*")):
        assert f"moe_raw/kernels/{path.name}" in names, f"kernels/{path.name} is not shipped in the wheel"
        assert wheel.read(f"moe_raw/kernels/{path.name}") == path.read_bytes()


def test_wheel_ships_python_package(wheel):
    names = set(wheel.namelist())
    assert "moe_raw/__init__.py" in names
    assert "moe_raw/reference.py" in names


def test_wheel_ships_license_and_the_bench_command(wheel):
    names = set(wheel.namelist())
    licenses = [n for n in names if n.endswith("LICENSE") and ".dist-info/" in n]
    assert licenses, "no LICENSE in the wheel's .dist-info"
    assert b"Apache License" in wheel.read(licenses[0])
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert f"moe_raw/bench/{path.name}" in names, f"bench/{path.name} is not shipped as moe_raw/bench/"
    assert not [n for n in names if n.startswith("moe_raw/bench/results")], "bench/results/ must not be shipped"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "moe-raw-bench = moe_raw.bench.__main__:console_main" in text, text
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    gpu = [r for r in requires if any(m in r for m in ("cupy", "numba", "llvmlite", "cuda-"))]
    assert all("extra ==" in r for r in gpu), f"GPU packages outside the cuda extras: {gpu}"


def test_wheel_holds_only_moe_raw(wheel):
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    stray = {t for t in tops if t != "moe_raw" and not t.endswith(".dist-info")}
    assert not stray, f"the wheel installs top-level names besides moe_raw: {sorted(stray)}"


def test_installed_package_finds_kernels():
    try:
        kernels = importlib.resources.files("moe_raw.kernels")
    except ModuleNotFoundError as exc:
        pytest.fail(f"moe_raw.kernels is not importable ({exc}); install the checkout with `pip install -e .`")
    for name in KERNEL_FILES:
        resource = kernels / name
        assert resource.is_file(), f"importlib.resources cannot find moe_raw.kernels/{name}"
        assert resource.read_text(), f"moe_raw.kernels/{name} is empty"


@pytest.mark.extras  # with the extras installed, the check that `import moe_raw` leaves them unimported bites
def test_import_is_light_without_gpu(tmp_path):
    # From an empty directory, so the installed package is imported, not the checkout on sys.path[0].
    code = (
        "import json, sys\n"
        "import moe_raw\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY_MODULES)!r})\n"
        "print(json.dumps({'version': moe_raw.__version__, 'heavy': heavy}))\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"`import moe_raw` failed with CUDA_VISIBLE_DEVICES='':\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"`import moe_raw` imported {result['heavy']}; import them lazily"


def test_kernels_come_from_the_tree_moe_raw_was_imported_from(monkeypatch, tmp_path):
    """moe_raw imported from a checkout (editable install, a source tree on sys.path, the current directory or a
    worktree shadowing another install): the kernel sources are that checkout's kernels/, even where
    moe_raw.kernels maps to another tree, so launchers and kernels never mix; without a checkout the installed
    package; with neither a clear error."""
    from moe_raw import _launch

    real_files = importlib.resources.files
    elsewhere = tmp_path / "other_install" / "kernels"  # another install's mapping (e.g. the main checkout's)

    def files(anchor):
        if anchor == "moe_raw.kernels":
            return elsewhere
        return real_files(anchor)

    monkeypatch.setattr(importlib.resources, "files", files)
    root = Path(__file__).parents[1] / "kernels"
    assert Path(_launch._kernels_dir()) == root
    assert _launch.kernel_source("topk").startswith(f'#line 1 "{root / "topk.cu"}"')
    real_isfile = _launch.os.path.isfile
    monkeypatch.setattr(_launch.os.path, "isfile", lambda path: False if str(root) in str(path) else real_isfile(path))
    assert _launch._kernels_dir() == elsewhere  # no checkout next to moe_raw/: the installed package

    def missing(anchor):
        raise ModuleNotFoundError("No module named 'moe_raw.kernels'")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match="reinstall moe_raw"):
        _launch._kernels_dir()


def test_bench_command_runs_from_any_directory(tmp_path):
    """``moe-raw-bench`` (the console script of the install) works outside the checkout: the installed
    ``moe_raw.bench``, not the checkout's ``bench`` on sys.path."""
    exe = shutil.which("moe-raw-bench") or str(Path(sys.executable).parent / "moe-raw-bench")
    if not os.path.exists(exe):
        pytest.skip("moe-raw-bench is not installed in this environment (pip install -e . installs it)")
    proc = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: moe-raw-bench"), proc.stdout
    description = proc.stdout.split("\n\n")[1]
    assert description.rstrip().endswith("."), f"--help cut mid-sentence: {description!r}"
