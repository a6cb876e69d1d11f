"""Constants the Python launchers mirror from the CUDA C kernels (block sizes, tile sizes, shared-memory stages and
limits) are read from the .cu sources and compared (CPU, CI): a kernel edit that changes one without the launcher
fails here instead of launching a wrong grid or too little shared memory."""

from __future__ import annotations

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
