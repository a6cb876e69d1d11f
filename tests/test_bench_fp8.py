"""CPU tests of bench/bench_fp8.py (permute_quantized's rows, issue 19) and its wiring into ``python -m bench``.

The timing needs CUDA; here: the byte model by hand, the rows with a stubbed timer (and once with torch.compile for
real, on the CPU), the notes that flag a mismatch or a compile failure, the self-check, --ops fp8.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import moe_raw
from bench import __main__ as cli
from bench import bench_fp8 as B
from bench import selfcheck

TINY = {"tiny": (24, 8, 256, 2)}  # T, E, H, K
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


def _timer(calls):
    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0

    return timer


def _no_compile(fn):
    return fn


# -------------------------------------------------------------------------------------------------- byte model


def test_byte_model_by_hand():
    T, E, H, K, s = 4, 2, 256, 2, 2  # N = 8
    # tokens 2048 + FP8 rows 2048 + scales + map 8 + probs 2*8*4 = 64 + row map 4*8 = 32
    assert B.bytes_permute_quantized(T, E, H, K, s, "rowwise") == 2048 + 2048 + 8 * 4 + 8 + 64 + 32
    assert B.bytes_permute_quantized(T, E, H, K, s, "blockwise") == 2048 + 2048 + 8 * 2 * 4 + 8 + 64 + 32
    assert B.bytes_permute_quantized(T, E, H, K, s, "mxfp8") == 2048 + 2048 + 8 * 8 + 8 + 64 + 32
    assert B.scale_bytes_per_row(200, "blockwise") == 8  # a partial last block has a scale too
    assert B.bytes_saved(T, H, K, s) == 2 * 8 * 256 * 2
    # DeepSeek-V3 bf16 rowwise: 58720256 + 234881024 + 131072 + 1048576 + 262144 + 4194304
    assert B.bytes_permute_quantized(4096, 256, 7168, 8, 2, "rowwise") == 299_237_376


# ------------------------------------------------------------------------------------------------------- rows


def test_rows_on_the_cpu_with_a_stubbed_timer():
    calls = []
    rows = B.bench_rows(2000.0, dtype=torch.float32, shapes=TINY, device="cpu", timer=_timer(calls),
                        compile_fn=_no_compile)  # fmt: skip
    assert len(rows) == len(calls) == 3 * 3
    assert [r["op"] for r in rows] == [f"permute_quantized {r}" for r in B.RECIPES for _ in B.PROVIDERS]
    assert [r["provider"] for r in rows] == list(B.PROVIDERS) * 3
    T, E, H, K = TINY["tiny"]
    for r in rows:
        assert set(r) == {"shape", "op", "provider", "ms", "GB/s", "pct_copy", "note"} and r["shape"] == "tiny"
        nbytes = B.bytes_permute_quantized(T, E, H, K, 4, r["op"].split()[-1])
        assert r["ms"] == 1.0 and r["GB/s"] == pytest.approx(nbytes / 1e6)
        assert r["pct_copy"] == pytest.approx(100 * r["GB/s"] / 2000.0)
    assert all(r["note"].startswith("bit-exact vs seed; fusion saves") for r in rows[::3])
    assert all(r["note"].endswith("bit-exact vs eager") for r in rows[2::3])


def test_rows_flag_a_mismatch_and_a_compile_failure(monkeypatch):
    real = moe_raw.permute_quantized

    def off_by_one_scale(*args, **kwargs):
        q, scales, pprobs, row_map = real(*args, **kwargs)
        return q, scales + 1, pprobs, row_map

    def broken(fn):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(moe_raw, "permute_quantized", off_by_one_scale)
    rows = B.bench_rows(2000.0, dtype=torch.bfloat16, shapes=TINY, recipes=("rowwise",), device="cpu",
                        timer=_timer([]), compile_fn=broken)  # fmt: skip
    assert [r["provider"] for r in rows] == list(B.PROVIDERS)
    assert rows[0]["note"].startswith("DIFFERS from seed")
    assert rows[2]["note"] == "failed: RuntimeError: no compiler here" and rows[2]["GB/s"] != rows[2]["GB/s"]  # NaN


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compiled_quantize_pass_equals_eager_on_the_cpu():
    rows = B.bench_rows(2000.0, dtype=torch.bfloat16, shapes=TINY, device="cpu", timer=_timer([]))
    compiled = [r for r in rows if r["provider"] == "seed torch.compile"]
    assert len(compiled) == 3 and all(r["note"].endswith("bit-exact vs eager") for r in compiled), compiled


def test_layer_rows_on_the_cpu_with_a_stubbed_timer():
    """The FP8 expert layer's rows (examples/fp8_expert_layer.py; the GEMM emulated in fp32 on the CPU): both
    providers timed, TFLOP/s from the stubbed 1 ms, and the example's FP8-vs-bf16 check passed into the note."""
    calls = []
    T, E, H, out_dim, K = 64, 4, 64, 32, 2
    rows = B.layer_rows({"tiny": (T, E, H, out_dim, K)}, device="cpu", timer=_timer(calls))
    assert len(rows) == len(calls) == 2
    assert [r["provider"] for r in rows] == list(B.LAYER_PROVIDERS) and {r["op"] for r in rows} == {B.LAYER_OP}
    for r in rows:
        assert r["shape"] == f"tiny T={T} E={E} H={H} O={out_dim} K={K}" and r["ms"] == 1.0
        assert r["note"].startswith(f"{2 * T * K * H * out_dim / 1e-3 / 1e12:.1f} TFLOP/s")
    assert "within FP8 error" in rows[0]["note"] and "NOT" not in rows[0]["note"], rows[0]["note"]
    y8 = calls[0]()[0]
    assert y8.dtype == torch.bfloat16 and y8.shape[1] == out_dim


def test_layer_rows_without_examples(monkeypatch):
    """An installed wheel ships bench/ without examples/: no layer rows, no error."""
    monkeypatch.setattr(B.common, "EXAMPLES", B.common.EXAMPLES / "missing")
    monkeypatch.delitem(sys.modules, "fp8_expert_layer", raising=False)
    assert B.layer_rows(device="cpu", timer=_timer([])) == []


# ------------------------------------------------------------------------------------------------- self-check


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selfcheck_passes_on_the_cpu(dtype):
    ok, detail = B.check(dtype, "cpu")
    assert ok, detail


def test_selfcheck_reports_a_wrong_result(monkeypatch):
    real = moe_raw.permute_quantized

    def wrong_codes(*args, **kwargs):
        q, scales, pprobs, row_map = real(*args, **kwargs)
        return (q.view(torch.uint8) ^ 1).view(q.dtype), scales, pprobs, row_map

    monkeypatch.setattr(moe_raw, "permute_quantized", wrong_codes)
    res = selfcheck.selfcheck(("fp8",), "cpu")
    assert len(res) == 3 and all(r["status"] == "FAIL" and "differ: rowwise/e4m3fn" in r["detail"] for r in res)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_op_and_shapes():
    assert cli.parse_args(["--ops", "fp8"]).ops == ("fp8",)
    assert "fp8" in cli.OPS and "fp8" not in cli.GROUPS["permute"]
    assert cli.parse_args(["--ops", "pad,fp8,swiglu"]).ops == ("pad", "fp8", "swiglu", "weighted_swiglu",
                                                               "weighted_swiglu_back")  # fmt: skip
    assert cli.select_shapes(B.SHAPES, None, quick=True) == ["DeepSeek-V3"]
    assert cli.select_shapes(B.SHAPES, cli.parse_args(["--shapes", "Qwen3-30B-A3B"]).shapes, False) == ["Qwen3-30B-A3B"]
    assert B.SHAPES == {"DeepSeek-V3": (4096, 256, 7168, 8), "Qwen3-30B-A3B": (16384, 128, 2048, 8)}


def test_run_benchmarks_wires_the_fp8_rows(monkeypatch, capsys):
    seen = []

    def fake_rows(copy_gbs, dtype=torch.bfloat16, shapes=None, **kw):
        seen.append((copy_gbs, dtype, shapes))
        return [{"shape": n, "op": "permute_quantized rowwise", "provider": p, "ms": 2.0 if p == "seed" else 1.0,
                 "GB/s": 1.0, "pct_copy": 1.0, "note": ""} for n in shapes for p in B.PROVIDERS]  # fmt: skip

    from bench import common

    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda: 4000.0)
    monkeypatch.setattr(common, "write_bandwidth_gbs", lambda: 4200.0)
    layer = {"shape": "q", "op": B.LAYER_OP, "provider": B.LAYER_PROVIDERS[0], "ms": 1.0, "GB/s": float("nan"),
             "pct_copy": float("nan"), "note": "x TFLOP/s"}  # fmt: skip
    monkeypatch.setattr(B, "bench_rows", fake_rows)
    monkeypatch.setattr(B, "layer_rows", lambda: [dict(layer)])
    rows, bw, ok = cli.run_benchmarks(cli.parse_args(["--ops", "fp8", "--dtype", "fp16"]))
    assert ok and bw == {"copy_GBps": 4000.0, "write_GBps": 4200.0}
    assert seen == [(4000.0, torch.float16, {n: B.SHAPES[n]}) for n in B.SHAPES]
    assert rows[-1] == {"kind": "kernel", "dtype": "bf16", **layer}  # the FP8 layer in bf16 / FP8, whatever --dtype
    rows = rows[:-1]
    assert len(rows) == 6 and all(r["kind"] == "kernel" and r["dtype"] == "fp16" for r in rows)
    assert rows[0]["speedup_vs_seed"] == 2.0 and "speedup_vs_seed" not in rows[2]  # "seed torch.compile" is a seed
    err = capsys.readouterr().err
    assert "permute_quantized DeepSeek-V3, every recipe" in err and "permute_quantized Qwen3-30B-A3B" in err


@no_cuda
def test_main_without_cuda(capsys):
    assert B.main() == 0
    assert "no CUDA device found" in capsys.readouterr().out
