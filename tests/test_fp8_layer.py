"""examples/fp8_expert_layer.py (issue 19): an FP8 expert up-projection fed by permute_quantized (row-wise) through
torch._scaled_grouped_mm, against the bf16 grouped GEMM of the same permuted rows.

CPU (CI): the weight quantization against the transcription (moe_raw.reference_fp8) and against the formula; the
operands against torch._scaled_grouped_mm's contract (``check_operands``, and torch's own meta-tensor checks); the
offsets; the whole path with the GEMM emulated in fp32, within the FP8 error bound, and a wrong GEMM caught by it.
CUDA (marked gpu; the scaled GEMM needs compute capability 9.0, e.g. the H200): torch's FP8 GEMM within the bound and
next to its emulation, and no host sync.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
from conftest import ON_CUDA

import moe_raw
from moe_raw import reference_fp8 as RF


def _load_example():
    name = "fp8_expert_layer"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "fp8_expert_layer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


FL = _load_example()
E4M3 = torch.float8_e4m3fn


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _weights(E=3, H=64, O=48):  # noqa: E741 - O: the output width, as the example names it
    w = torch.randn(E, H, O)
    w[0, :, 5] = 0  # a zero column: scale 1
    w[1, 7, 3] = 300.0  # an outlier: the rest of its column on small and subnormal codes
    w[2, :, 9] *= 1e-30  # tiny values (fp32; bf16 keeps the exponent)
    return w.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- weights


def test_quantize_weights_is_the_rowwise_recipe_on_each_output_column():
    w = _weights()
    E, H, O = w.shape  # noqa: E741
    wq, sb = FL.quantize_weights(w)
    assert wq.shape == (E, H, O) and wq.dtype == E4M3 and wq.stride() == (O * H, 1, H)  # column-major
    assert sb.shape == (E, O) and sb.dtype == torch.float32 and sb.is_contiguous()
    for e in range(E):  # the transcription, one expert at a time, on the transposed (strided) weights
        q_ref, s_ref = RF.quantize_rowwise(w[e].T, E4M3)
        assert torch.equal(_bytes(wq[e].T), _bytes(q_ref)) and torch.equal(_bytes(sb[e]), _bytes(s_ref))
    # the formula: scale = amax / 448 over each column (1 for a zero column), codes = clamp(w / scale) cast RNE
    amax = w.float().abs().amax(1)
    want_sb = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    assert torch.equal(sb, want_sb) and sb[0, 5] == 1
    want_q = torch.clamp(w.float() / want_sb.unsqueeze(1), -448, 448).to(E4M3)
    assert torch.equal(_bytes(wq), _bytes(want_q))
    # within half a step of each value (2^-4 relative) or half a subnormal step (2^-10 scale)
    err = (wq.float() * sb.unsqueeze(1) - w.float()).abs()
    assert (err <= 2.0**-4 * w.float().abs() + 2.0**-10 * sb.unsqueeze(1)).all()


def test_quantize_weights_rejects_a_2d_weight():
    with pytest.raises(ValueError, match=r"\[E, H, O\]"):
        FL.quantize_weights(torch.randn(4, 4))


# --------------------------------------------------------------------------------------------------- contract


def _operands(T=40, E=4, H=64, O=48, K=2):  # noqa: E741
    x, routing_map, w = FL.make_inputs(T, E, H, O, K)
    q, sa, _, row_map = moe_raw.permute_quantized(x, routing_map, num_out_tokens=T * K, align_size=FL.ALIGN)
    wq, sb = FL.quantize_weights(w)
    return {"q": q, "wq": wq, "sa": sa, "sb": sb, "offs": FL.expert_offsets(row_map, T)}


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _meta_gemm(ops: dict) -> torch.Tensor:
    m = {k: _meta(v) for k, v in ops.items()}
    return torch._scaled_grouped_mm(m["q"], m["wq"], m["sa"], m["sb"], offs=m["offs"], out_dtype=torch.bfloat16)


def test_operands_meet_the_contract():
    ops = _operands()
    FL.check_operands(**ops)
    y = _meta_gemm(ops)  # torch's own shape / dtype / layout checks (its meta registration)
    assert y.shape == (ops["q"].shape[0], 48) and y.dtype == torch.bfloat16
    assert ops["q"].shape[0] == 40 * 2 + 4 * 15  # T K + E (align - 1): the worst case, no host sync


def _bad(name):
    ops = _operands()
    e5m2 = {k: (v.float().to(torch.float8_e5m2) if k in ("q", "wq") else v) for k, v in ops.items()}
    return {
        "row-major B": ({**ops, "wq": ops["wq"].contiguous()}, "column-major", True),
        "e5m2": (e5m2, "float8_e4m3fn", True),
        "2-D scale_a": ({**ops, "sa": ops["sa"].unsqueeze(1)}, "scale_a 1-D", True),
        "scale_b per row": ({**ops, "sb": ops["sb"].T.contiguous()}, "scale_b", True),
        "fp16 scales": ({**ops, "sb": ops["sb"].half()}, "float32 scales", True),
        "int64 offs": ({**ops, "offs": ops["offs"].long()}, "offs int32", True),
        "N % 16": ({**ops, "wq": ops["wq"][:, :, :40], "sb": ops["sb"][:, :40]}, "multiples of 16", False),
        "K % 16": ({**ops, "q": _operands(H=40)["q"], "wq": _operands(H=40)["wq"]}, "multiples of 16", True),
    }[name]


@pytest.mark.parametrize(
    "name", ["row-major B", "e5m2", "2-D scale_a", "scale_b per row", "fp16 scales", "int64 offs", "N % 16", "K % 16"]
)
def test_check_operands_names_the_broken_rule(name):
    ops, needle, torch_checks_it_too = _bad(name)
    with pytest.raises(ValueError, match=needle):
        FL.check_operands(**ops)
    if torch_checks_it_too:  # the meta registration refuses the same operands (N % 16 only the CUDA op checks)
        with pytest.raises(RuntimeError):
            _meta_gemm(ops)


def test_offsets_are_the_padded_group_ends():
    T, E, H, K = 50, 6, 32, 2
    x, routing_map, _ = FL.make_inputs(T, E, H, 16, K)
    routing_map[:, 2] = False  # an empty expert
    routing_map[:, 5] = True
    _, _, row_map = FL.bf16_up_projection(x, routing_map, torch.zeros(E, H, 16))
    _, _, _, _, padded = moe_raw.permute_and_pad(x, routing_map, None, FL.ALIGN, int(routing_map.sum()))
    offs = FL.expert_offsets(row_map, T)
    assert offs.dtype == torch.int32 and offs.is_contiguous()
    assert torch.equal(offs, padded.cumsum(0).to(torch.int32))
    assert (padded % FL.ALIGN == 0).all() and padded[2] == 0


# ------------------------------------------------------------------------------------------------ the layer


def test_layer_within_fp8_error_on_the_cpu():
    res = FL.run(T=256, E=8, H=256, out_dim=128, K=2)
    assert res["ok"], res
    assert res["same_rows_as_permute_and_pad"] and res["within_bound"] and "emulation_err" not in res
    assert 0.01 < res["rel_err"] <= res["rel_limit"] < 0.1  # a real FP8 error, within the stated limit
    assert 0.015 < res["ea"] < 0.04 and 0.015 < res["eb"] < 0.04


def test_outliers_stay_within_the_element_bound():
    x, routing_map, w = FL.make_inputs(64, 4, 128, 32, 2, seed=3)
    x = x.float()
    x[:, 0] *= 1e5  # most of each row on E4M3's subnormal codes
    w = w.float()
    w[:, 5, :] *= 1e5
    res = FL.compare(x.to(torch.bfloat16), routing_map, w.to(torch.bfloat16), 128)
    assert res["within_bound"] and res["same_rows_as_permute_and_pad"], res


def test_a_wrong_gemm_is_caught():
    def without_weight_scales(q, wq, sa, sb, offs):
        return FL.emulated_scaled_grouped_mm(q, wq, sa, torch.ones_like(sb), offs)

    res = FL.run(T=64, E=4, H=64, out_dim=32, K=2, gemm=without_weight_scales)
    assert not res["ok"] and not res["within_bound"] and res["rel_err"] > 1


def test_padding_and_spare_rows_are_zero():
    T, E, H, O, K = 30, 4, 64, 32, 2  # noqa: E741
    x, routing_map, w = FL.make_inputs(T, E, H, O, K)
    wq, sb = FL.quantize_weights(w)
    y, q, sa, row_map, offs = FL.fp8_up_projection(x, routing_map, wq, sb, T * K)
    assert y.shape == (T * K + E * 15, O) and y.dtype == torch.bfloat16
    routed = torch.zeros(y.shape[0], dtype=torch.bool)
    routed[row_map[:T][row_map[:T] >= 0].long()] = True
    assert routed.sum() == T * K
    assert (y[~routed] == 0).all() and (q[~routed].view(torch.uint8) == 0).all() and (sa[~routed] == 1).all()
    assert int(offs[-1]) < y.shape[0]  # spare rows exist and are zeroed by the mask


def test_demo_runs_on_the_cpu(capsys):
    assert FL.main(["--device", "cpu", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "FP8 GEMM: fp32 emulation" in out and "within FP8 error" in out


# ------------------------------------------------------------------------------------------------------ CUDA


def _need_scaled_gemm(device):
    if not FL.scaled_grouped_mm_available(device):
        pytest.skip(f"torch._scaled_grouped_mm's row-wise kernel needs compute capability 9.0, got "
                    f"{torch.cuda.get_device_capability(device)}")  # fmt: skip


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize(
    "shape",
    [(256, 8, 256, 128, 2), (64, 256, 512, 256, 8), (1000, 16, 1024, 384, 4)],
    ids=["small", "256-experts-some-empty", "odd-T"],
)
def test_scaled_grouped_mm_within_fp8_error(device, shape):
    _need_scaled_gemm(device)
    T, E, H, O, K = shape  # noqa: E741
    res = FL.run(T=T, E=E, H=H, out_dim=O, K=K, device=device)
    assert res["ok"], res
    assert res["within_bound"] and res["rel_err"] <= res["rel_limit"] and res["emulation_err"] <= FL.REL_SLACK


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
def test_no_host_sync_on_cuda(device):
    _need_scaled_gemm(device)
    T, E, H, O, K = 128, 16, 256, 128, 4  # noqa: E741
    x, routing_map, w = FL.make_inputs(T, E, H, O, K, device)
    wq, sb = FL.quantize_weights(w)
    FL.fp8_up_projection(x, routing_map, wq, sb, T * K)  # warm-up: kernels compiled and loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = FL.fp8_up_projection(x, routing_map, wq, sb, T * K)[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == (T * K + E * 15, O)
