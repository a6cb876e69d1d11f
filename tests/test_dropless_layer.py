"""examples/dropless_moe_layer.py (issue 18): the whole dropless MoE layer (router -> permute -> grouped GEMM ->
weighted SwiGLU -> grouped GEMM -> unpermute) with no host sync, and its CUDA graph of forward + backward.

CPU (CI): the layer's output and every gradient (x, router weight, w1, w2) against the reference layer (Megatron's
torch router, moe_raw.reference's seed permute / weighted SwiGLU / unpermute, one matmul per expert over host counts)
at DeepSeek-V3's and Qwen3's router settings, small H / F; T = 0; the bench rows on the CPU.
CUDA (marked gpu): one graph of forward + backward, replayed on new tokens, equals eager on them bit for bit (twice,
different tokens); no host sync in an eager step (torch's sync debug mode "error"); the bench rows with the graph.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
from conftest import ON_CUDA

from moe_raw import reference


def _load_example():
    """examples/dropless_moe_layer.py as the module ``dropless_moe_layer`` (shared with bench.bench_layer's loader)."""
    name = "dropless_moe_layer"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "dropless_moe_layer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


DL = _load_example()
PRESETS = ("deepseek-v3", "qwen3")
# relative (Frobenius) difference allowed per tensor: fp32 both sides sum the same products in another order; bf16
# differs where the layer rounds once from fp32 (SwiGLU, unpermute) and the seed after each op
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}
NAMES = ("y", "dx", "d router_weight", "dw1", "dw2")


def _layer(preset, dtype=torch.float32, device="cpu", hidden=32, ffn=16, seed=0):
    return DL.DroplessMoELayer.from_preset(preset, hidden=hidden, ffn=ffn, dtype=dtype, device=device, seed=seed)


def _tokens(T, H, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=gen).to(device, dtype)


def _flat(step):
    y, grads = step
    return (y, *grads)


def _assert_close(got, want, rtol):
    for name, a, b in zip(NAMES, _flat(got), _flat(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = DL.rel_err(a, b)
        assert err <= rtol, f"{name}: rel err {err:.2e} > {rtol:.0e}"


def _assert_exact(got, want, what):
    for name, a, b in zip(NAMES, _flat(got), _flat(want), strict=True):
        assert torch.equal(a, b), f"{what}: {name} differs ({int((a != b).sum())} of {a.numel()} entries)"


# ----------------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_layer_matches_the_reference_layer(preset, dtype):
    """Eager output and the gradients of x, router weight, w1 and w2 against Megatron's torch path with one matmul
    per expert (so the device offsets are checked against host counts too)."""
    layer = _layer(preset, dtype)
    x, gy = _tokens(67, 32, dtype, "cpu", 1), _tokens(67, 32, dtype, "cpu", 2)
    got = DL.train_step(layer, x, gy)
    want = DL.train_step(layer, x, gy, reference=True, router=reference.topk_routing_with_score_function,
                         experts="loop")  # fmt: skip
    _assert_close(got, want, RTOL[dtype])
    assert all(g.abs().sum() > 0 for g in got[1]), "every gradient is nonzero"
    # the router's map is the torch router's (random logits: no ties), and the layer routes at the preset's settings
    logits = torch.nn.functional.linear(x.float(), layer.router_weight.detach())
    kw = layer.cfg.kwargs(layer.expert_bias)
    ours = DL.moe_raw.topk_routing_with_score_function(logits, layer.cfg.topk, **kw)[1]
    assert torch.equal(ours, reference.topk_routing_with_score_function(logits, layer.cfg.topk, **kw)[1])
    assert bool((ours.sum(1) == layer.cfg.topk).all())


def _dense_fp64(layer, x, gy):
    """The layer without any dispatch, in fp64: every token through every expert, the outputs summed with the dense
    probs (zero off the picks). Independent of permute / grouped GEMM / unpermute and of where the probs go."""
    params = [p.detach().double().requires_grad_(True) for p in layer.trainable]
    router_weight, w1, w2 = params
    x = x.double().requires_grad_(True)
    bias = layer.expert_bias.double() if layer.expert_bias is not None else None
    logits = torch.nn.functional.linear(x, router_weight)
    probs, routing_map = reference.topk_routing_with_score_function(logits, layer.cfg.topk, **layer.cfg.kwargs(bias))
    gate, up = torch.einsum("th,ehf->tef", x, w1).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up * probs.unsqueeze(-1)  # [T, E, F]
    y = torch.einsum("tef,efh->th", act, w2)
    return (y.detach(), torch.autograd.grad(y, (x, *params), gy.double())), routing_map


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_matches_a_dense_fp64_oracle(preset):
    layer = _layer(preset)
    x, gy = _tokens(33, 32, torch.float32, "cpu", 6), _tokens(33, 32, torch.float32, "cpu", 7)
    want, want_map = _dense_fp64(layer, x, gy)
    logits = torch.nn.functional.linear(x, layer.router_weight.detach())
    got_map = DL.moe_raw.topk_routing_with_score_function(logits, layer.cfg.topk, **layer.cfg.kwargs(layer.expert_bias))
    assert torch.equal(got_map[1], want_map)  # the same picks in fp32 and fp64 (no near-ties in these inputs)
    got = DL.train_step(layer, x, gy)
    for name, a, b in zip(NAMES, _flat(got), _flat(want), strict=True):
        assert DL.rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_matches_installed_megatron_router(preset):
    """The reference as the bench runs it: megatron-core's own router (skipped without it) and the grouped GEMM."""
    if DL.megatron_router() is None:
        pytest.skip("megatron-core is not installed")
    layer = _layer(preset)
    x, gy = _tokens(40, 32, torch.float32, "cpu", 3), _tokens(40, 32, torch.float32, "cpu", 4)
    assert DL.reference_router()[1] == "megatron-core"
    _assert_close(DL.train_step(layer, x, gy), DL.train_step(layer, x, gy, reference=True), RTOL[torch.float32])


def test_expert_bias_changes_the_routing():
    """DeepSeek-V3's bias ranks experts: with it zeroed some tokens pick other experts (so the tests above route with
    a bias that matters)."""
    layer = _layer("deepseek-v3")
    x = _tokens(64, 32, torch.float32, "cpu", 5)
    logits = torch.nn.functional.linear(x, layer.router_weight.detach())
    maps = [
        DL.moe_raw.topk_routing_with_score_function(logits, 8, **layer.cfg.kwargs(bias))[1]
        for bias in (layer.expert_bias, torch.zeros_like(layer.expert_bias))
    ]
    assert not torch.equal(*maps)


@pytest.mark.parametrize("experts", ["grouped_mm", "loop"])
@pytest.mark.parametrize("preset", PRESETS)
def test_zero_tokens(preset, experts):
    layer = _layer(preset)
    x, gy = torch.zeros(0, 32), torch.zeros(0, 32)
    for step in (
        DL.train_step(layer, x, gy),
        DL.train_step(layer, x, gy, reference=True, router=reference.topk_routing_with_score_function,
                      experts=experts),
    ):  # fmt: skip
        y, (dx, dwr, dw1, dw2) = step
        assert y.shape == (0, 32) and dx.shape == (0, 32)
        for g, w in zip((dwr, dw1, dw2), layer.trainable, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype and not g.any()


def test_expert_offsets_and_grouped_mm_with_an_empty_expert():
    routing_map = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    offs = DL.expert_offsets(routing_map)
    assert offs.dtype == torch.int32 and offs.tolist() == [3, 3, 6]
    rows, w = torch.randn(6, 8, requires_grad=True), torch.randn(3, 8, 16, requires_grad=True)
    got = DL.grouped_mm(rows, w, offs)
    want = DL.loop_mm(rows, w, [3, 0, 3])
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (rows, w), g), torch.autograd.grad(want, (rows, w), g), strict=True):
        torch.testing.assert_close(a, b)


def test_layer_arguments():
    with pytest.raises(ValueError, match="multiples of 8"):
        DL.DroplessMoELayer(36, 16, 8, DL.RouterConfig(2))
    layer = _layer("qwen3")
    assert layer.router_weight.dtype == torch.float32 and layer.router_weight.shape == (128, 32)
    assert layer.w1.shape == (128, 32, 32) and layer.w2.shape == (128, 16, 32) and layer.expert_bias is None
    assert _layer("deepseek-v3").expert_bias.shape == (256,)
    with pytest.raises(ValueError, match="CUDA"):
        DL.capture(layer, torch.zeros(4, 32), torch.zeros(4, 32))
    with pytest.raises(ValueError, match="experts"):
        layer.reference(torch.zeros(4, 32), experts="bogus")


def test_demo_runs_on_the_cpu(capsys):
    assert DL.main(["--device", "cpu", "--tokens", "24", "--hidden", "16", "--ffn", "8", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "rel err vs reference" in out and "fwd+bwd eager" in out


def test_bench_rows_on_the_cpu():
    """bench_layer.bench_dropless_shape's code path at a tiny shape (the timer stubbed; no graph off CUDA)."""
    from bench import bench_layer

    assert bench_layer.dropless_module() is DL
    rows, ok = bench_layer.bench_dropless_shape("Qwen3-30B-A3B", 24, 128, 16, 8, 8, dtype=torch.float32,
                                                device="cpu", timer=lambda fn: fn() and 1.0)  # fmt: skip
    assert ok
    assert [r["provider"] for r in rows] == ["moe_raw dropless eager", "seed dropless"]
    assert all(r["kind"] == "layer" and r["op"] == bench_layer.DROPLESS_OP and r["ms"] == 1.0 for r in rows)
    assert rows[0]["speedup_vs_seed"] == 1.0 and rows[0]["max_rel_err"] <= bench_layer.LAYER_RTOL[torch.float32]
    assert "CUDA graph: CUDA only" in rows[0]["note"]
    with pytest.raises(ValueError, match="preset"):
        bench_layer.bench_dropless_shape("DeepSeek-V3", 8, 128, 16, 8, 8, device="cpu", timer=lambda fn: 1.0)


def test_bench_memory_fit():
    from bench import bench_layer

    T, E, H, K, F = bench_layer.LAYER_SHAPES["DeepSeek-V3"]
    need = bench_layer.dropless_bytes(T, E, H, K, F)
    assert 90e9 < need < 100e9  # 4 x 22.5 GB of expert weights and gradients, plus activations
    assert bench_layer.fit_ffn(T, E, H, K, F, 141e9) == F  # an H200
    assert bench_layer.fit_ffn(T, E, H, K, F, 79e9) == 1024  # an H100: halved


# ---------------------------------------------------------------------------------------------------------- CUDA

# DeepSeek-V3 / Qwen3 routers at their E and K, small H and F
CUDA_SIZES = {"deepseek-v3": (512, 256, 128), "qwen3": (1024, 256, 128)}  # T, H, F


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("preset", PRESETS)
def test_graph_replay_on_new_tokens_is_bit_identical_to_eager(device, preset):
    T, H, F = CUDA_SIZES[preset]
    layer = _layer(preset, torch.bfloat16, device, H, F)
    x0, gy = _tokens(T, H, torch.bfloat16, device, 10), _tokens(T, H, torch.bfloat16, device, 11)
    step = DL.capture(layer, x0, gy)
    previous = None
    for seed in (12, 13):  # twice, different tokens
        x = _tokens(T, H, torch.bfloat16, device, seed)
        replayed = tuple(t.clone() for t in _flat(step.replay(x)))
        eager = DL.train_step(layer, x, gy)
        _assert_exact((replayed[0], replayed[1:]), eager, f"replay (tokens {seed})")
        if previous is not None:
            assert not torch.equal(previous, replayed[0]), "the replay read the new tokens"
        previous = replayed[0]
    # and the eager layer is the reference layer's within bf16 rounding, on the device
    x = _tokens(T, H, torch.bfloat16, device, 14)
    _assert_close(DL.train_step(layer, x, gy), DL.train_step(layer, x, gy, reference=True), RTOL[torch.bfloat16])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("preset", PRESETS)
def test_no_host_sync_in_forward_and_backward(device, preset):
    """torch's sync debug mode raises on any synchronizing call: an eager step after warm-up makes none; the
    reference layer (permute's routed count read on the host) does, so the mode is live."""
    T, H, F = CUDA_SIZES[preset]
    layer = _layer(preset, torch.bfloat16, device, H, F)
    x, gy = _tokens(T, H, torch.bfloat16, device, 20), _tokens(T, H, torch.bfloat16, device, 21)
    DL.train_step(layer, x, gy)  # warm-up: first-use kernel compiles
    DL.train_step(layer, x, gy, reference=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        DL.train_step(layer, x, gy)
        with pytest.raises(RuntimeError, match="synchroniz"):
            DL.train_step(layer, x, gy, reference=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
def test_capture_refuses_weights_that_are_not_bf16(device):
    layer = _layer("qwen3", torch.float32, device, 32, 16)
    with pytest.raises(ValueError, match="bf16"):
        DL.capture(layer, torch.zeros(8, 32, device=device), torch.zeros(8, 32, device=device))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
def test_bench_rows_with_the_graph(device):
    from bench import bench_layer

    rows, ok = bench_layer.bench_dropless_shape("DeepSeek-V3", 256, 256, 128, 8, 64, device=device)
    assert ok, rows
    providers = [r["provider"] for r in rows]
    assert providers == ["moe_raw dropless eager", "seed dropless", "moe_raw dropless CUDA graph"]
    assert "bit for bit" in rows[0]["note"] and all(r["ms"] > 0 for r in rows)
