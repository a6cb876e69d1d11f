"""Constants the Python launchers mirror from the CUDA C kernels (block sizes, tile sizes, shared-memory stages and
limits) are read from the .cu sources and compared (CPU, CI): a kernel edit that changes one without the launcher
fails here instead of launching a wrong grid or too little shared memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from moe_raw._kernels import dispatch as D
from moe_raw._kernels import quantize as Q

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# (launcher module, its python constant, .cu file, constexpr name there)
MIRRORS = [
    (D, "_TILE_TOKENS", "permute.cu", "kTileTokens"),
    (D, "_ROW_THREADS", "permute.cu", "kRowThreads"),
    (D, "_TAIL_ROWS", "permute.cu", "kTailRows"),
    (D, "_STAGE_BYTES", "permute.cu", "kStageBytes"),
    (D, "_GROUP_THREADS", "permute.cu", "kGroupThreads"),
    (D, "_GROUP_EXPERTS", "permute.cu", "kGroupExperts"),
    (D, "_CHUNK_ROWS", "chunks.cu", "kChunkRows"),
    (D, "_CHUNK_THREADS", "chunks.cu", "kChunkThreads"),
    (D, "MAX_SPLITS", "chunks.cu", "kMaxSplits"),
    (D, "_TOKENS_PER_BLOCK", "topk.cu", "kTokensPerBlock"),
    (Q, "_THREADS", "quantize.cu", "kQuantThreads"),
    (Q, "_WARP_THREADS", "quantize.cu", "kWarpQuantThreads"),
]


@pytest.mark.parametrize("module, py_name, cu_file, cu_name", MIRRORS, ids=[m[1] for m in MIRRORS])
def test_python_mirror_equals_the_kernel_constant(module, py_name, cu_file, cu_name):
    values = re.findall(rf"constexpr int {cu_name} = (\d+);", (KERNELS / cu_file).read_text())
    assert len(values) == 1, f"{cu_file}: expected one `constexpr int {cu_name} = N;`, found {values}"
    got = getattr(module, py_name)
    assert got == int(values[0]), f"{module.__name__}.{py_name} = {got} but {cu_name} = {values[0]}"


def test_launch_names_use_the_kernels_template_constants():
    """The template arguments baked into launch names (routing_pack<256>, routing_scan<1024>) match the tile sizes."""
    source = Path(D.__file__).read_text()
    assert f"moe_raw::routing_pack<{D._TILE_TOKENS}>" in source


def test_launch_config_structs_match_cuda_h(tmp_path):
    """moe_raw._launch's ctypes mirrors of CUlaunchConfig / CUlaunchAttribute (the overlapped launch's
    cuLaunchKernelEx) have cuda.h's sizes and field offsets, compiled here from the toolkit's header."""
    import ctypes
    import shutil
    import subprocess

    from moe_raw import _launch

    include = Path("/usr/local/cuda/include")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not (include / "cuda.h").is_file():
        pytest.skip("needs a C compiler and the CUDA toolkit's cuda.h")
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\nint main(void) {\n"
        '  printf("%zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),\n'
        "         sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs),\n"
        "         offsetof(CUlaunchConfig, numAttrs), (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\n"
        "  return 0;\n}\n"
    )
    subprocess.run([cc, f"-I{include}", str(src), "-o", str(tmp_path / "layout")], check=True)
    want = [int(v) for v in subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True).stdout.split()]
    A, C = _launch._LaunchAttribute, _launch._LaunchConfig
    got = [ctypes.sizeof(A), A.value.offset, ctypes.sizeof(C), C.stream.offset, C.attrs.offset, C.num_attrs.offset,
           _launch._PROGRAMMATIC_STREAM_SERIALIZATION]  # fmt: skip
    assert got == want


@pytest.mark.skipif(os.environ.get("MOE_RAW_EMULATE_KERNELS") == "1", reason="the emulator replaces the launchers")
def test_overlapped_launch_falls_back_without_the_driver_entry(monkeypatch):
    """Where libcuda or its cuLaunchKernelEx cannot be loaded, an overlapped launch is a plain one (the kernels'
    pdl_wait() then returns at once), not an error."""
    import ctypes

    from moe_raw import _launch

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    calls = []
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.setattr(_launch, "_launch_kernel", lambda *args: calls.append(args))
    monkeypatch.setattr(_launch, "_launch_kernel_overlapped", _launch._launch_kernel_overlapped)
    _launch._launch_kernel_overlapped(7, 2, 1, 1, 128, 1, 1, 0, 0, 0, 1234)
    assert calls == [(7, 2, 1, 1, 128, 1, 1, 0, 0, 0, 1234)]


def test_overlapped_kernels_read_the_tables_through_plain_pointers():
    """permute_scatter, permute_grouped and routing_scan, the kernels launched with overlap (kernels/common.cuh
    pdl_wait), take what the kernel ahead writes (the tables ws, and pad_ranges) without ``const __restrict__``:
    read-only loads of them may be scheduled above griddepcontrol.wait (nvcc 13.0 did so for sm_90 in
    permute_grouped: bench/results/2026-12-06-h100-main). So do the helpers that pass pad_ranges on after the wait."""
    source = (KERNELS / "permute.cu").read_text()
    for fn in ("permute_scatter", "permute_grouped", "scatter_token", "place_pair", "routing_scan"):
        heads = re.findall(rf"\b{fn}\s*\(([^{{;]*)\)\s*{{", source)
        assert len(heads) == 1, f"permute.cu: expected one definition of {fn}, found {len(heads)}"
        for param in ("ws", "pad_ranges"):
            assert not re.search(rf"__restrict__\s+{param}\b", heads[0]), f"{fn} takes {param} as __restrict__"
