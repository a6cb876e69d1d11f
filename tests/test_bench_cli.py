"""CPU tests of the benchmark CLI (python -m bench): argument handling, byte models, the CPU self-check, the record."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from bench import __main__ as cli
from bench import bench_layer, bench_permute, bench_swiglu, record, selfcheck

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


# ---------------------------------------------------------------------------------------------------- arguments


def test_parse_defaults():
    a = cli.parse_args([])
    assert a.ops == cli.OPS and a.dtype == "bf16" and a.shapes is None and not a.quick and not a.no_bench
    assert a.out is None


def test_parse_groups_and_ops():
    assert cli.parse_args(["--ops", "permute"]).ops == ("permute", "unpermute", "sort_chunks", "topk", "pad")
    assert cli.parse_args(["--ops", "topk,pad"]).ops == ("topk", "pad")
    assert cli.parse_args(["--ops", "swiglu"]).ops == ("swiglu", "weighted_swiglu", "weighted_swiglu_back")
    assert cli.parse_args(["--ops", "weighted_swiglu_back,unpermute"]).ops == ("unpermute", "weighted_swiglu_back")
    assert cli.parse_args(["--ops", "layer", "--dtype", "fp16", "--quick", "--no-bench"]).dtype == "fp16"


def test_parse_shapes_short_and_full_names():
    a = cli.parse_args(["--shapes", "DeepSeek-V3,N98304-F768"])
    assert a.shapes == ["DeepSeek-V3", "N98304-F768 (Qwen3-30B-A3B experts)"]
    assert cli.parse_args(["--shapes", "N32768-F2048 (DeepSeek-V3 experts)"]).shapes == [
        "N32768-F2048 (DeepSeek-V3 experts)"
    ]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ops", "permute,bogus"], "unknown op 'bogus'"),
        (["--ops", ","], "names no op"),
        (["--shapes", "Llama-1B"], "unknown shape 'Llama-1B'"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if "shape" in needle:
        assert "DeepSeek-V3" in err and "N32768-F2048" in err  # names the valid choices


def test_bad_op_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "bench", "--ops", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown op 'nope'" in r.stderr


def test_select_shapes():
    table = bench_permute.SHAPES
    assert cli.select_shapes(table, None, quick=True) == ["DeepSeek-V3"]
    assert cli.select_shapes(table, None, quick=False) == list(table)
    assert cli.select_shapes(table, ["Mixtral-8x7B", "N98304-F768 (Qwen3-30B-A3B experts)"], False) == ["Mixtral-8x7B"]
    assert cli.select_shapes(table, ["N98304-F768 (Qwen3-30B-A3B experts)"], True) == ["DeepSeek-V3"]


# -------------------------------------------------------------------------------------------------- byte models


def test_permute_byte_models_by_hand():
    T, E, H, K, s = 4, 2, 3, 2, 2  # N = 8
    assert bench_permute.bytes_map_build(T, E) == 8
    # tokens 24 + rows 48 + map 8 + probs 2*8*4=64 + row map 4*8=32
    assert bench_permute.bytes_permute_fwd(T, E, H, K, s) == 176
    assert bench_permute.bytes_permute_fwd(T, E, H, K, s, seed_indices=True) == 176 - 32 + 64  # int64 indices
    assert bench_permute.bytes_unpermute_fwd(T, E, H, K, s) == 48 + 24 + 32 + 32
    assert bench_permute.bytes_unpermute_fwd(T, E, H, K, s, num_out=5) == 30 + 24 + 32 + 20
    assert bench_permute.bytes_permute_bwd(T, E, H, K, s) == 48 + 24 + 32 + 32 + 32
    assert bench_permute.bytes_unpermute_bwd(T, E, H, K, s) == 24 + 96 + 32 + 32 + 32
    # DeepSeek-V3 bf16: 58720256 + 469762048 + 1048576 + 262144 + 4194304
    assert bench_permute.bytes_permute_fwd(4096, 256, 7168, 8, 2) == 533_987_328


def test_swiglu_byte_models_by_hand():
    n, f, s = 10, 4, 2
    assert bench_swiglu.bytes_swiglu_fwd(n, f, s) == 240  # 10 * (8 + 4) * 2
    assert bench_swiglu.bytes_weighted_swiglu_fwd(n, f, s) == 280  # + 10 fp32 weights
    assert bench_swiglu.bytes_weighted_swiglu_bwd(n, f, s) == 480  # 10 * (5*4*2 + 2*4)
    assert bench_swiglu._bytes("weighted_swiglu bwd", n, f, s, 2) == 10 * (40 + 4)
    # N=32768 F=2048 bf16 forward: 32768 * 6144 * 2
    assert bench_swiglu.bytes_swiglu_fwd(32768, 2048, 2) == 402_653_184


# ---------------------------------------------------------------------------------------------- CPU self-check


@no_cuda
def test_cpu_selfcheck_exits_0_and_prints_pass_lines(capsys, tmp_path):
    rc = cli.main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no CUDA device found" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert lines and all(ln.startswith("PASS") for ln in lines), out
    for dt in ("bf16", "fp16", "fp32"):
        for label in ("permute+unpermute", "swiglu fwd", "swiglu_back", "weighted_swiglu fwd", "weighted_swiglu_back",
                      "weighted_bias_swiglu_impl", "MoE layer"):  # fmt: skip
            assert any(f" {dt} " in ln and label in ln for ln in lines), (dt, label)
    rec = json.loads((tmp_path / "bench.json").read_text())
    assert rec["format"] == record.RECORD_FORMAT and rec["rows"] == [] and rec["copy_GBps"] is None
    assert len(rec["selfcheck"]) == len(lines) and {c["status"] for c in rec["selfcheck"]} == {"PASS"}


@no_cuda
def test_cpu_selfcheck_of_selected_ops_writes_nothing_without_out(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--ops", "weighted_swiglu", "--no-bench"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 3 * 2  # weighted_swiglu fwd + the autograd function, per dtype
    assert not list(tmp_path.iterdir())


def test_selfcheck_reports_a_failure(monkeypatch, capsys):
    def broken(y, w):
        return torch.zeros(y.shape[0], y.shape[1] // 2, dtype=y.dtype)

    import moe_raw

    monkeypatch.setattr(moe_raw, "weighted_swiglu", broken)
    res = selfcheck.selfcheck(("weighted_swiglu",), "cpu")
    fwd = [r for r in res if r["op"].startswith("weighted_swiglu fwd")]
    assert len(fwd) == 3 and all(r["status"] == "FAIL" for r in fwd)
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["sort_chunks_by_idxs", "permute_topk", "permute_and_pad"])
def test_dispatch_checks_report_a_wrong_result(monkeypatch, name):
    import moe_raw

    real = getattr(moe_raw, name)

    def off_by_a_bit(*args, **kwargs):
        out = real(*args, **kwargs)
        return (out[0].detach() * 2, *out[1:])  # wrong rows (and no gradient through them)

    monkeypatch.setattr(moe_raw, name, off_by_a_bit)
    op = {"sort_chunks_by_idxs": "sort_chunks", "permute_topk": "topk", "permute_and_pad": "pad"}[name]
    res = selfcheck.selfcheck((op,), "cpu")
    assert len(res) == 3 and all(r["status"] == "FAIL" for r in res), res


# ----------------------------------------------------------------------------------------------------- layer


def test_grouped_matmul_matches_dense_per_expert():
    rows, w, counts = torch.randn(9, 5, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64), [4, 0, 5]
    out = bench_layer.grouped_matmul(rows, w, counts)
    assert torch.allclose(out, torch.cat([rows[:4] @ w[0], rows[4:] @ w[2]]))


def test_grouped_matmul_falls_back_to_the_loop_off_gpu():
    rows, w = torch.randn(9, 5, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)
    assert bench_layer.grouped_mm_kind(rows) == "loop of matmuls"
    out = bench_layer.grouped_matmul(rows, w, [4, 0, 5], offsets)
    assert torch.allclose(out, torch.cat([rows[:4] @ w[0], rows[4:] @ w[2]]))


def test_quick_selfcheck_runs_only_the_small_permute_cases(monkeypatch):
    from bench import smoke

    seen = []
    monkeypatch.setattr(smoke, "check", lambda T, E, K, H, *a, **kw: seen.append((T, E, K, H)) or True)
    assert selfcheck.check_permute(torch.float32, "cuda", quick=True)[0]
    assert set(seen) == set(selfcheck.SMALL_PERMUTE_CASES)
    seen.clear()
    assert selfcheck.check_permute(torch.float32, "cuda", quick=False)[0]
    assert set(seen) == set(selfcheck.SMALL_PERMUTE_CASES + selfcheck.LARGE_PERMUTE_CASES)


def test_layer_providers_agree_on_cpu():
    inputs = bench_layer.make_layer(23, 4, 16, 2, 8, dtype=torch.float32, device="cpu")
    y, dx, dlogits = bench_layer.layer_step("moe_raw", inputs)
    assert y.shape == (23, 16) and dx.shape == (23, 16) and dlogits.shape == (23, 4)
    assert bench_layer.compare(inputs) <= bench_layer.LAYER_RTOL[torch.float32]


# ---------------------------------------------------------------------------------------------------- record


def _fake_rows():
    rows = [
        {"kind": "kernel", "shape": "S", "op": "permute fwd", "provider": "moe_raw", "dtype": "bf16", "ms": 0.5,
         "GB/s": 2600.0, "pct_copy": 89.0, "note": ""},
        {"kind": "kernel", "shape": "S", "op": "permute fwd", "provider": "seed", "dtype": "bf16", "ms": 1.5,
         "GB/s": 900.0, "pct_copy": 31.0, "note": ""},
        {"kind": "kernel", "shape": "S", "op": "round trip fwd+bwd", "provider": "moe_raw", "dtype": "bf16",
         "ms": 2.0, "GB/s": float("nan"), "pct_copy": float("nan"), "note": ""},
        {"kind": "host", "shape": "T=16", "op": "permute+unpermute", "provider": "moe_raw", "dtype": "bf16",
         "us": 40.0},
        {"kind": "memory", "shape": "S", "op": "permute+unpermute fwd+bwd peak memory", "provider": "moe_raw",
         "dtype": "bf16", "peak_mem_GB": 0.25, "note": "above inputs"},
        {"kind": "layer", "shape": "L", "op": "moe layer fwd+bwd", "provider": "moe_raw", "dtype": "bf16", "ms": 9.0,
         "tokens_per_s": 1.8e6, "peak_mem_GB": 3.2, "max_rel_err": 1e-3, "note": "ok"},
    ]  # fmt: skip
    cli._speedups(rows)
    return rows


def test_speedups_and_markdown():
    rows = _fake_rows()
    assert rows[0]["speedup_vs_seed"] == pytest.approx(3.0)
    assert "speedup_vs_seed" not in rows[1] and "speedup_vs_seed" not in rows[2]
    md = record.markdown(rows, 2915.0)
    assert "| S | permute fwd | moe_raw | bf16 | 0.500 | 2600 | 89% | 3.00x |" in md
    assert "2915 GB/s" in md and "| T=16 | permute+unpermute | moe_raw | 40.0 |" in md and "| L | moe_raw |" in md
    assert "| S | permute+unpermute fwd+bwd peak memory | moe_raw | 0.250 | above inputs |" in md


def test_record_json_and_csv(tmp_path):
    rows = _fake_rows()
    env = {"gpu": "NVIDIA H100", "torch": "2.13", "cupy": "14.2", "numba": "0.68", "git_sha": "abc",
           "timestamp": "2026-11-27T00:00:00+00:00"}  # fmt: skip
    checks = [{"op": "swiglu fwd", "dtype": "bf16", "status": "PASS", "detail": "", "device": "cuda"}]
    paths = record.write_record(str(tmp_path / "rec"), env, {"quick": True}, checks, rows, 2915.0, 2000.0)
    rec = json.loads(open(paths["json"]).read())
    assert rec["format"] == "moe_raw-bench/1"
    for key in ("gpu", "torch", "cupy", "numba", "git_sha", "timestamp"):
        assert key in rec["env"]
    assert rec["copy_GBps"] == 2915.0 and rec["selfcheck"] == checks and len(rec["rows"]) == len(rows)
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == record.CSV_FIELDS and len(got) == len(rows)
    assert float(got[0]["GB/s"]) == 2600.0 and float(got[0]["speedup_vs_seed"]) == pytest.approx(3.0)
    assert got[2]["GB/s"] == "" and got[3]["us"] == "40.0" and got[4]["peak_mem_GB"] == "0.25"
    assert got[5]["tokens_per_s"] == "1800000.0"
    assert not any(math.isnan(float(v)) for r in got for k, v in r.items() if k in ("ms", "GB/s") and v)


def test_record_chart(tmp_path):
    pytest.importorskip("matplotlib")
    paths = record.write_record(str(tmp_path), {"gpu": "x"}, {}, [], _fake_rows(), 2915.0)
    assert paths["png"].endswith("bench.png") and (tmp_path / "bench.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------- cold_trace


def test_cold_trace_analyse_attributes_kernels_to_calls():
    """Two traced calls: kernels belong to a call through their launch's correlation id (a kernel of call 0 that
    runs while call 1 is on the host stays call 0's), times are relative to the call's start, gaps are GPU idle
    time between the call's kernels; a trace without launch records falls back to the kernels in the call's span."""
    from bench.cold_trace import analyse, median

    def ev(name, cat, ts, dur, corr=None):
        return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [
        ev("call 0", "user_annotation", 100.0, 30.0),
        ev("cuLaunchKernel", "cuda_driver", 105.0, 4.0, 1),
        ev("cuLaunchKernel", "cuda_driver", 120.0, 5.0, 2),
        ev("routing_pack", "kernel", 112.0, 3.0, 1),
        ev("permute_scatter", "kernel", 131.0, 20.0, 2),  # starts after call 1 began on the host
        ev("call 1", "user_annotation", 130.0, 10.0),
        ev("cudaLaunchKernel", "cuda_runtime", 132.0, 2.0, 3),
        ev("gather_reduce", "kernel", 151.0, 6.0, 3),
        ev("x", "cpu_op", 101.0, 1.0),
    ]
    first, second = analyse(events, "call ")
    assert first["host"] == 30.0 and first["launches"] == 2 and first["last_launch"] == 25.0
    assert first["first_start"] == 12.0 and first["gpu_end"] == 51.0 and first["kernels"] == 23.0
    assert first["gaps"] == 51.0 - 12.0 - 23.0
    assert [k[0] for k in first["kernel_list"]] == ["routing_pack", "permute_scatter"]
    assert second["launches"] == 1 and second["first_start"] == 21.0 and second["kernels"] == 6.0
    assert median([first, second], "kernels") == 23.0

    no_launches = [e for e in events if e["cat"] not in ("cuda_driver", "cuda_runtime")]
    first, second = analyse(no_launches, "call ")
    assert first["launches"] == 0 and [k[0] for k in first["kernel_list"]] == ["routing_pack"]
    assert [k[0] for k in second["kernel_list"]] == ["permute_scatter", "gather_reduce"]


def test_host_us_many_interleaves_every_fn_and_returns_medians(monkeypatch):
    """bench.common.host_us_many: each round times every fn once, starting one further along (no fn is always the
    first measured), and each figure is the median of its fn's loops."""
    from bench import common

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    order = []
    clock = iter(range(10**6))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    us = common.host_us_many(fns, iters=2, repeats=3)
    assert order[:60] == [n for n in "abc" for _ in range(20)]  # the warm-up calls, fn by fn
    loops = order[60:]
    assert len(loops) == 3 * 3 * 2
    firsts = [loops[i] for i in range(0, len(loops), 6)]  # the fn each round starts with
    assert firsts == ["a", "b", "c"]
    # every loop of 2 calls spans one tick of the fake clock: 0.5 ticks a call
    assert us == {"a": 0.5e6, "b": 0.5e6, "c": 0.5e6}
    assert common.host_us(lambda: None, iters=4, repeats=1) == 0.25e6
