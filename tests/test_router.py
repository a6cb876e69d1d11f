"""The router (issue 18): ``topk_routing_with_score_function``, ``compute_routing_scores_for_aux_loss``,
``switch_load_balancing_loss_func`` and ``z_loss_func`` with Megatron-LM's names and signatures.

Oracles: the installed megatron-core's own functions where its semantics are main's (fp32 logits: 0.16 rounds its
scores to the logits' dtype in between, main keeps fp32), and ``moe_raw.reference``'s transcription of main run in
fp64 (the 2x rule) for every dtype, score function, grouping and output form. Routing maps must equal the oracle's
exactly on inputs without ties (random logits); on exact ties moe_raw picks the lower expert index, on every device.
CPU and CUDA run the same checks (CUDA: the kernels/router.cu launches; CPU: the torch formulas).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, ON_CUDA, assert_close_2x

import moe_raw
from moe_raw import reference as R

try:
    from megatron.core.transformer.moe import moe_utils as MEGATRON
except ImportError:  # the README's test block installs megatron-core; the transcription checks run without it
    MEGATRON = None

needs_megatron = pytest.mark.skipif(MEGATRON is None, reason="megatron-core is not installed")

# name: (E, K, kwargs of topk_routing_with_score_function)
CONFIGS = {
    "softmax-post": (16, 2, {}),
    "softmax-pre": (16, 2, {"use_pre_softmax": True}),
    "softmax-scaled-K1": (8, 1, {"scaling_factor": 2.0}),
    "sigmoid": (24, 4, {"score_function": "sigmoid"}),
    "sigmoid-K1": (24, 1, {"score_function": "sigmoid"}),
    "sigmoid-bias": (64, 6, {"score_function": "sigmoid", "bias": True}),
    "sqrtsoftplus-bias": (40, 3, {"score_function": "sqrtsoftplus", "bias": True, "scaling_factor": 1.5}),
    "softmax-groups": (32, 4, {"num_groups": 4, "group_topk": 2}),
    "softmax-pre-groups": (48, 6, {"use_pre_softmax": True, "num_groups": 6, "group_topk": 3}),
    "deepseek-v3": (
        256,
        8,
        {"score_function": "sigmoid", "bias": True, "num_groups": 8, "group_topk": 4, "scaling_factor": 2.5},
    ),  # fmt: skip
    "qwen3": (128, 8, {"use_pre_softmax": True}),
    # group layouts the kernel stages in shared memory: groups of 24 = 6 lanes of 4; 9 keys a group summed
    "sigmoid-groups-staged": (96, 4, {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2}),
    "softmax-pre-groups-m9": (64, 18, {"use_pre_softmax": True, "num_groups": 2, "group_topk": 2}),
    # groups of one lane's run each (no merge shuffles), and m = 3 (a 4-slot list, one slot unused)
    "sigmoid-groups-lane": (64, 4, {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2}),
    "softmax-groups-m3": (128, 6, {"num_groups": 8, "group_topk": 2}),
    "E1000-K32": (1000, 32, {"score_function": "sigmoid"}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _inputs(num_tokens, num_experts, dtype, device, bias=False, seed=0, groups=None):
    """Logits whose rows hold distinct values of ``dtype`` in [-6, 6] (no ties: bf16 randn rows of 1000 experts
    would have many), and an optional expert bias."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-6, 6, 40001, dtype=torch.float64).to(dtype).unique()
    rows = [grid[torch.randperm(grid.numel(), generator=gen)[:num_experts]] for _ in range(num_tokens)]
    logits = torch.stack(rows) if rows else torch.empty(0, num_experts, dtype=dtype)
    if groups:  # softmax after top-k ranks groups by sums in the logits' dtype: keep rows whose sums do not tie
        num_groups, m = groups
        for t in range(num_tokens):
            while True:
                sums = logits[t].view(num_groups, -1).topk(m, -1).values.sum(-1)
                if sums.unique().numel() == num_groups:
                    break
                logits[t] = grid[torch.randperm(grid.numel(), generator=gen)[:num_experts]]
    expert_bias = (torch.randn(num_experts, generator=gen) * 0.1).to(device) if bias else None
    return logits.to(device), expert_bias


def _kwargs(cfg, expert_bias):
    kw = {k: v for k, v in cfg.items() if k != "bias"}
    return {**kw, "expert_bias": expert_bias} if cfg.get("bias") else kw


def _close(out, ref64, same, what):
    """The 2x rule. fp64 logits: Megatron computes the scores in fp32 there too (so does moe_raw), so the fp64 run
    is held to a few fp32 roundings of the transcription."""
    if out.dtype == torch.float64:
        err = (out - same).abs().max().item() if out.numel() else 0.0
        assert err <= 4e-7 * max(1.0, same.abs().max().item() if same.numel() else 1.0), f"{what}: err {err:.2e}"
    else:
        assert_close_2x(out, ref64, same, what)


def _route(fn, logits, topk, kw, dense_output):
    """(probs, map or indices, d logits of sum(probs * w)) of ``fn`` on a fresh leaf copy of ``logits``."""
    x = logits.detach().clone().requires_grad_(True)
    probs, second = fn(x, topk, **kw, dense_output=dense_output)
    w = torch.linspace(-1, 2, probs.numel(), dtype=torch.float64).view(probs.shape).to(probs.device)
    (grad,) = torch.autograd.grad((probs.double() * w).sum(), x)
    return probs.detach(), second, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dense_output", [False, True], ids=["dense-map", "topk-form"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_router_matches_the_transcription_of_megatron(device, name, dtype, dense_output):
    num_experts, topk, cfg = CONFIGS[name]
    post_groups = cfg.get("group_topk") and not cfg.get("use_pre_softmax") and "score_function" not in cfg
    groups = (cfg["num_groups"], topk // cfg["group_topk"]) if post_groups else None
    logits, bias = _inputs(37, num_experts, dtype, device, cfg.get("bias", False), groups=groups)
    kw = _kwargs(cfg, bias)
    probs, second, grad = _route(moe_raw.topk_routing_with_score_function, logits, topk, kw, dense_output)
    same = _route(R.topk_routing_with_score_function, logits, topk, kw, dense_output)
    ref64 = _route(R.topk_routing_with_score_function, logits.double(), topk, kw, dense_output)
    assert torch.equal(second, same[1]), f"{name}: picks differ from Megatron's in the same dtype"
    assert second.dtype == (torch.int64 if dense_output else torch.bool) and second.device == logits.device
    assert probs.dtype == dtype and probs.shape == same[0].shape and grad.dtype == dtype
    # Megatron ranks softmax-after-top-k groups by sums rounded to the logits' dtype, so in fp16 / bf16 a row's
    # groups can differ from the fp64 run's: such rows are checked against the same-dtype run (one rounding).
    agree = (second == ref64[1]).all(-1)
    assert agree.float().mean() > 0.7, f"{name}: {int((~agree).sum())} rows differ from the fp64 run"
    _close(probs[agree], ref64[0][agree], same[0][agree], f"{name} probs")
    _close(grad[agree], ref64[2][agree], same[2][agree], f"{name} d logits")
    torch.testing.assert_close(probs[~agree], same[0][~agree])
    torch.testing.assert_close(grad[~agree], same[2][~agree])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_loss_scores_match_the_transcription(device, score_function, dtype):
    logits, _ = _inputs(29, 24, dtype, device)
    padding = torch.arange(29, device=device) % 5 == 0

    def run(fn, x, **kw):
        x = x.detach().clone().requires_grad_(True)
        routing_map, scores = fn(x, 3, score_function, padding_mask=padding, **kw)
        w = torch.linspace(-1, 1, scores.numel(), dtype=torch.float64, device=device).view(scores.shape)
        return routing_map, scores.detach(), torch.autograd.grad((scores.double() * w).sum(), x)[0]

    def scores64(x, topk, fn, padding_mask):
        """The scores in fp64 throughout (the transcription computes in fp32 whatever the logits' dtype, so its run
        on fp64 logits is no fp64 oracle); no map (the test takes it from the transcription)."""
        x = x.double()
        s = torch.softmax(x, -1) if fn == "softmax" else (x.sigmoid() if fn == "sigmoid" else F.softplus(x).sqrt())
        s = s if fn == "softmax" else s / (s.sum(-1, keepdim=True) + 1e-20)
        return None, s * (~padding_mask).unsqueeze(-1)

    got = run(moe_raw.compute_routing_scores_for_aux_loss, logits)
    same = run(R.compute_routing_scores_for_aux_loss, logits)
    ref64 = run(scores64, logits.double())
    assert torch.equal(got[0], same[0]) and got[0].dtype == torch.bool
    assert not got[0][padding].any() and int(got[0].sum()) == 3 * int((~padding).sum())
    assert got[1].dtype == torch.float32
    assert_close_2x(got[1], ref64[1], same[1].float(), "scores")
    assert_close_2x(got[2], ref64[2], same[2], "d logits")


@needs_megatron
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in CONFIGS if "sqrtsoftplus" not in n])
def test_router_matches_installed_megatron(device, name):
    """fp32 logits, where megatron-core 0.16's rounding points are main's: the map exactly, probs and d logits
    within a few fp32 roundings."""
    num_experts, topk, cfg = CONFIGS[name]
    logits, bias = _inputs(33, num_experts, torch.float32, device, cfg.get("bias", False), seed=3)
    kw = _kwargs(cfg, bias)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        probs, routing_map = fn(x, topk, **kw)
        (probs * torch.arange(num_experts, device=device)).sum().backward()
        return probs.detach(), routing_map, x.grad

    got, theirs = run(moe_raw.topk_routing_with_score_function), run(MEGATRON.topk_routing_with_score_function)
    assert torch.equal(got[1], theirs[1])
    torch.testing.assert_close(got[0], theirs[0], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got[2], theirs[2], rtol=2e-5, atol=1e-6)


@needs_megatron
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_aux_losses_match_installed_megatron(device, score_function):
    logits, _ = _inputs(40, 16, torch.float32, device, seed=5)
    padding = torch.arange(40, device=device) % 7 == 3
    for kw in ({}, {"padding_mask": padding}):
        mine = moe_raw.compute_routing_scores_for_aux_loss(logits, 4, score_function, **kw)
        theirs = MEGATRON.compute_routing_scores_for_aux_loss(logits, 4, score_function, **kw)
        assert torch.equal(mine[0], theirs[0])
        torch.testing.assert_close(mine[1], theirs[1], rtol=2e-6, atol=1e-7)
    probs = torch.softmax(logits, -1)
    tpe = mine[0].sum(0)
    for kw in ({}, {"padding_mask": ~padding}):
        args = (probs, tpe, 40, 4, 16, 1e-2)
        mine, theirs = (
            moe_raw.switch_load_balancing_loss_func(*args, **kw),
            MEGATRON.switch_load_balancing_loss_func(*args, **kw),
        )
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    for kw in ({}, {"padding_mask": padding}):
        mine, theirs = moe_raw.z_loss_func(logits, 1e-3, **kw), MEGATRON.z_loss_func(logits, 1e-3, **kw)
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)


@needs_megatron
@pytest.mark.parametrize("name", ["topk_routing_with_score_function", "compute_routing_scores_for_aux_loss",
                                  "switch_load_balancing_loss_func", "z_loss_func"])  # fmt: skip
def test_signatures_are_megatrons(name):
    """Megatron main adds dense_output to the router: moe_raw takes main's parameters, in 0.16's order then main's."""
    mine = [(p.name, p.default) for p in inspect.signature(getattr(moe_raw, name)).parameters.values()]
    theirs = [(p.name, p.default) for p in inspect.signature(getattr(MEGATRON, name)).parameters.values()]
    assert mine[: len(theirs)] == theirs
    assert [n for n, _ in mine[len(theirs) :]] in ([], ["dense_output"])


@pytest.mark.parametrize("device", DEVICES)
def test_ties_pick_the_lower_expert_on_every_device(device):
    """Equal scores: the lower index first (torch.topk leaves the choice unspecified)."""
    logits = torch.zeros(3, 8, device=device)
    logits[1, 5] = logits[1, 6] = 1.0  # a tie for the top
    logits[2, :] = torch.tensor([0.5, 2.0, 0.5, 0.5, 2.0, 0.5, 0.5, 0.5])
    probs, idx = moe_raw.topk_routing_with_score_function(logits, 3, dense_output=True)
    assert idx.tolist() == [[0, 1, 2], [5, 6, 0], [1, 4, 0]]
    grouped = moe_raw.topk_routing_with_score_function(logits, 2, num_groups=4, group_topk=1, dense_output=True)[1]
    assert grouped.tolist() == [[0, 1], [5, 4], [1, 0]]  # equal group scores: the lower group


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_keeps_shapes_and_gradients(device):
    logits = torch.zeros(0, 16, device=device, requires_grad=True)
    probs, routing_map = moe_raw.topk_routing_with_score_function(logits, 2)
    assert probs.shape == routing_map.shape == (0, 16) and probs.requires_grad
    probs.sum().backward()
    assert logits.grad.shape == (0, 16)
    routing_map, scores = moe_raw.compute_routing_scores_for_aux_loss(logits, 2, "sigmoid")
    assert scores.shape == (0, 16) and scores.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits(device):
    base, _ = _inputs(20, 64, torch.float32, device)
    logits = base[:, ::2]
    got = moe_raw.topk_routing_with_score_function(logits, 4, score_function="sigmoid")
    want = moe_raw.topk_routing_with_score_function(logits.contiguous(), 4, score_function="sigmoid")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_expert_bias_ranks_without_changing_probs_or_getting_a_gradient(device):
    logits, _ = _inputs(16, 8, torch.float32, device)
    logits.requires_grad_(True)
    bias = torch.zeros(8, device=device)
    bias[7] = 100.0  # expert 7 always picked; its prob is its own score
    bias.requires_grad_(True)
    probs, idx = moe_raw.topk_routing_with_score_function(
        logits, 1, score_function="sigmoid", expert_bias=bias, dense_output=True
    )
    assert (idx == 7).all()
    torch.testing.assert_close(probs[:, 0], torch.sigmoid(logits[:, 7]))
    probs.sum().backward()
    assert bias.grad is None and logits.grad[:, :7].abs().sum() == 0 and logits.grad[:, 7].abs().min() > 0
    logits = logits.detach()
    # softmax ignores the bias, as Megatron does
    a = moe_raw.topk_routing_with_score_function(logits, 2, expert_bias=bias)
    b = moe_raw.topk_routing_with_score_function(logits, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


BAD = [
    ({"score_function": "relu"}, ValueError, "score_function"),
    ({"topk": 0}, ValueError, "topk"),
    ({"topk": 17}, ValueError, "topk"),
    ({"num_groups": 3, "group_topk": 1}, ValueError, "num_groups"),
    ({"num_groups": 4, "group_topk": 5}, ValueError, "group_topk"),
    ({"num_groups": 8, "group_topk": 1, "topk": 4}, ValueError, "cannot hold"),
    ({"router_replay": object()}, ValueError, "router_replay"),
    ({"expert_bias": torch.zeros(15)}, ValueError, "expert_bias"),
    ({"scaling_factor": "2"}, TypeError, "scaling_factor"),
    ({"use_pre_softmax": torch.tensor(True)}, TypeError, "use_pre_softmax"),
]


@pytest.mark.parametrize("kw, error, match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_router_arguments_raise(kw, error, match):
    kw = {"topk": 2, **kw}
    with pytest.raises(error, match=match):
        moe_raw.topk_routing_with_score_function(torch.randn(4, 16), **kw)


def test_bad_logits_and_masks_raise():
    with pytest.raises(TypeError, match="logits"):
        moe_raw.topk_routing_with_score_function(torch.zeros(4, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="logits"):
        moe_raw.topk_routing_with_score_function(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="padding_mask"):
        moe_raw.compute_routing_scores_for_aux_loss(
            torch.zeros(4, 8), 2, "softmax", padding_mask=torch.zeros(3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="tokens_per_expert"):
        moe_raw.switch_load_balancing_loss_func(torch.zeros(4, 8), torch.zeros(7), 4, 2, 8, 0.1)


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: the kernel's own properties


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3", "softmax-post"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
def test_kernel_is_deterministic_graph_safe_and_on_the_current_stream(device, name, side_stream):
    num_experts, topk, cfg = CONFIGS[name]
    logits, bias = _inputs(4096, num_experts, torch.bfloat16, device, cfg.get("bias", False))
    kw = _kwargs(cfg, bias)
    eager = _route(moe_raw.topk_routing_with_score_function, logits, topk, kw, False)
    again = _route(moe_raw.topk_routing_with_score_function, logits, topk, kw, False)
    for a, b in zip(eager, again, strict=True):
        assert torch.equal(a, b)
    static = logits.clone().requires_grad_(True)
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # warm up (compile, autograd) off the capture
        torch.autograd.grad(moe_raw.topk_routing_with_score_function(static, topk, **kw)[0].float().sum(), static)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=graph):
        probs, routing_map = moe_raw.topk_routing_with_score_function(static, topk, **kw)
        (grad,) = torch.autograd.grad((probs.float() * 3).sum(), static)
    fresh, _ = _inputs(4096, num_experts, torch.bfloat16, device, seed=11)
    with torch.no_grad():
        static.copy_(fresh)
    g.replay()
    want = moe_raw.topk_routing_with_score_function(fresh.clone().requires_grad_(True), topk, **kw)
    assert torch.equal(probs, want[0]) and torch.equal(routing_map, want[1])
    x = fresh.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(
        (moe_raw.topk_routing_with_score_function(x, topk, **kw)[0].float() * 3).sum(), x
    )
    assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_CUDA)])
def test_past_the_kernel_limits_the_torch_formulas_run_on_the_device(device):
    logits, _ = _inputs(9, 1100, torch.float32, device)
    probs, routing_map = moe_raw.topk_routing_with_score_function(logits, 40, score_function="sigmoid")
    cpu = moe_raw.topk_routing_with_score_function(logits.cpu(), 40, score_function="sigmoid")
    assert torch.equal(routing_map.cpu(), cpu[1])
    torch.testing.assert_close(probs.cpu(), cpu[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["deepseek-v3", "softmax-post", "sqrtsoftplus-bias"])
def test_torch_compile_fullgraph_gives_the_eager_results(device, name):
    """Under torch.compile both router functions run as the custom ops moe_raw::router / router_backward (the
    kernel on CUDA): no graph break, and the eager values, maps and gradients, bit for bit."""
    num_experts, topk, cfg = CONFIGS[name]
    logits, bias = _inputs(24, num_experts, torch.float32, device, cfg.get("bias", False))
    kw = _kwargs(cfg, bias)

    def step(x, dense_output):
        probs, second = moe_raw.topk_routing_with_score_function(x, topk, **kw, dense_output=dense_output)
        routing_map, scores = moe_raw.compute_routing_scores_for_aux_loss(x, topk, "softmax")
        return probs, second, routing_map, scores

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for dense_output in (False, True):
        runs = []
        for fn in (step, compiled):
            x = logits.clone().requires_grad_(True)
            out = fn(x, dense_output)
            w = torch.linspace(-1, 1, out[0].numel(), device=device).view(out[0].shape)
            (grad,) = torch.autograd.grad((out[0] * w).sum() + (out[3] * out[3]).sum(), x)
            runs.append((*(o.detach() for o in out), grad))
        for a, b in zip(*runs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dense, aux", [(True, False), (False, False), (True, True)], ids=["dense", "topk", "aux"])
def test_router_custom_op_passes_opcheck(device, dense, aux):
    from moe_raw import _ops

    logits, bias = _inputs(12, 32, torch.float32, device, bias=True)
    args = (logits.requires_grad_(True), None if aux else bias, 4, "sigmoid", False, 4, 2, 2.5, dense, aux)
    torch.library.opcheck(_ops.router, args)
