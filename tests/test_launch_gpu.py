"""GPU tests of the launcher ``moe_raw._launch``: compile once per device, launch on torch's current stream,
zero-copy device addresses, NVRTC errors that name the real file and line.

Run on a CUDA machine: ``python -m pytest -q tests/test_launch_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA device needed", allow_module_level=True)

from conftest import make_routing  # noqa: E402

import moe_raw  # noqa: E402
from moe_raw import _launch  # noqa: E402
from moe_raw import reference as R  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")


def test_module_compiled_once_per_device():
    first = _launch._module("permute", 0)
    assert _launch._module("permute", 0) is first
    # Every declared instance was compiled into that one module (name_expressions) and resolves.
    for name in _launch.KERNELS["permute"]:
        assert _launch.function("permute", name, 0) is not None, name
    assert _launch._module("permute", 0) is first
    if torch.cuda.device_count() > 1:
        other = _launch._module("permute", 1)
        assert other is not first and _launch._module("permute", 1) is other


def test_launch_runs_on_the_current_side_stream(side_stream):
    """With a side stream current, the kernels must queue behind that stream's work: the tokens and the map are
    written there after a long sleep, so a launch on any other stream would read the stale zeros."""
    T, H, E, K = 1027, 2048, 64, 8
    x_new = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    rm_new = make_routing(T, E, K, DEV, "topk")
    x = torch.zeros_like(x_new)
    rm = torch.zeros_like(rm_new)
    torch.cuda.synchronize()
    with torch.cuda.stream(side_stream):
        torch.cuda._sleep(100_000_000)  # tens of ms: far longer than queuing the launches below
        x.copy_(x_new)
        rm.copy_(rm_new)
        perm, _, row_map = moe_raw.permute(x, rm, num_out_tokens=T * K, fused=True)
        out = moe_raw.unpermute(perm, row_map, (T, H), fused=True)
    side_stream.synchronize()
    ref_perm, _, _ = R.permute(x_new, rm_new)
    assert torch.equal(perm, ref_perm)
    assert torch.equal(row_map, R.build_row_map(rm_new)[0])
    # Each token's K copies summed in fp32: K x (exact in bf16 for K a power of 2).
    assert torch.equal(out, x_new * K)


def test_launch_on_default_stream_orders_with_torch_ops():
    """The same on the default stream: the inputs are written there behind a sleep, and the result is read by a
    torch op queued after the kernels, all without a host sync in between."""
    T, H, E, K = 300, 1000, 16, 2
    x_new = torch.randn(T, H, device=DEV).to(torch.float16)
    rm_new = make_routing(T, E, K, DEV, "topk")
    x, rm = torch.zeros_like(x_new), torch.zeros_like(rm_new)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    x.copy_(x_new)
    rm.copy_(rm_new)
    perm, _, idx = moe_raw.permute(x, rm, num_out_tokens=T * K)
    copied = perm.clone()  # queued behind the kernel on the same stream
    expected_idx = torch.arange(T, device=DEV).unsqueeze(0).expand(E, T).masked_select(rm_new.T.contiguous())
    assert torch.equal(idx, expected_idx)
    assert torch.equal(copied, x_new[expected_idx])


def test_ptr_is_the_zero_copy_device_address():
    x = torch.arange(64, dtype=torch.float32, device=DEV)
    assert int(_launch.ptr(x)) == x.data_ptr()
    assert int(_launch.ptr(x[5:])) == x.data_ptr() + 5 * 4  # a view: its own offset, no copy
    w = torch.randn(8, 8, device=DEV, dtype=torch.bfloat16, requires_grad=True)  # CAI / DLPack would refuse it
    assert int(_launch.ptr(w)) == w.data_ptr()
    assert int(_launch.ptr(None)) == 0


def test_ptr_accepts_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    with cupy.cuda.Device(0):
        a = cupy.arange(16, dtype=cupy.float32)
    assert int(_launch.ptr(a)) == a.data.ptr
    assert int(_launch.ptr(a[4:])) == a.data.ptr + 16


def test_compile_error_names_file_and_line(tmp_path, monkeypatch):
    """NVRTC errors point at the real source: the loader's #line directives, across the inlined common.cuh."""
    pytest.importorskip("cupy")
    real_root = _launch._kernels_dir()
    (tmp_path / "common.cuh").write_text((real_root / "common.cuh").read_text())
    (tmp_path / "broken_test.cu").write_text(
        "// line 1: a kernel family that does not compile\n"
        '#include "common.cuh"\n'
        "namespace moe_raw {\n"
        "template <typename T> __global__ void broken(T* p) {\n"
        "  p[0] = undefined_symbol_on_line_5;\n"
        "}\n"
        "}  // namespace moe_raw\n"
    )
    monkeypatch.setattr(_launch, "_kernels_dir", lambda: tmp_path)
    monkeypatch.setitem(_launch.KERNELS, "broken_test", ("moe_raw::broken<float>",))
    with pytest.raises(_launch.KernelCompileError) as info:
        _launch._module("broken_test", 0)
    message = str(info.value)
    assert "undefined_symbol_on_line_5" in message
    assert "broken_test.cu(5)" in message, f"the error should name broken_test.cu line 5:\n{message}"
    assert ("broken_test", 0) not in getattr(_launch, "_modules", {}), "a failed compile must not be cached"
