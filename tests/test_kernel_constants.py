"""Constants the Python launchers mirror from the CUDA C kernels (block sizes, tile sizes, shared-memory stages and
limits) are read from the .cu sources and compared (CPU, CI): a kernel edit that changes one without the launcher
fails here instead of launching a wrong grid or too little shared memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_raw._kernels import dispatch as D

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# (python constant in moe_raw/_kernels/dispatch.py, .cu file, constexpr name there)
MIRRORS = [
    ("_TILE_TOKENS", "permute.cu", "kTileTokens"),
    ("_ROW_THREADS", "permute.cu", "kRowThreads"),
    ("_TAIL_ROWS", "permute.cu", "kTailRows"),
    ("_STAGE_BYTES", "permute.cu", "kStageBytes"),
    ("_CHUNK_ROWS", "chunks.cu", "kChunkRows"),
    ("_CHUNK_THREADS", "chunks.cu", "kChunkThreads"),
    ("MAX_SPLITS", "chunks.cu", "kMaxSplits"),
    ("_TOKENS_PER_BLOCK", "topk.cu", "kTokensPerBlock"),
]


@pytest.mark.parametrize("py_name, cu_file, cu_name", MIRRORS, ids=[m[0] for m in MIRRORS])
def test_python_mirror_equals_the_kernel_constant(py_name, cu_file, cu_name):
    values = re.findall(rf"constexpr int {cu_name} = (\d+);", (KERNELS / cu_file).read_text())
    assert len(values) == 1, f"{cu_file}: expected one `constexpr int {cu_name} = N;`, found {values}"
    assert getattr(D, py_name) == int(values[0]), f"{py_name} = {getattr(D, py_name)} but {cu_name} = {values[0]}"


def test_launch_names_use_the_kernels_template_constants():
    """The template arguments baked into launch names (routing_pack<256>, routing_scan<1024>) match the tile sizes."""
    source = Path(D.__file__).read_text()
    assert f"moe_raw::routing_pack<{D._TILE_TOKENS}>" in source
