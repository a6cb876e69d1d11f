"""bench/seed.py is the seed's own code path: the baseline every benchmark times and the independent oracle of
tests/test_reference.py and tests/test_fuzz.py. It stays one file in bench (the benchmarks need it at run time and
ship without tests); this test pins it to the package it transcribes, NeMo Automodel 0.7's ``moe_utils`` unfused
``permute`` / ``unpermute``: the same outputs and gradients, bit for bit (on CUDA, where the package's own sums use
atomics, the sums within a rounding), wherever the package runs.
(The one place the transcription departs: drop_and_pad with capacity above T, where the package's ``view`` raises;
that case is not compared.)"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, make_probs, make_routing

from bench import seed

M = pytest.importorskip(
    "nemo_automodel.components.moe.megatron.moe_utils",
    reason="NeMo Automodel is not installed: pip install --no-deps nemo_automodel==0.7.0",
)


def _grads(outputs, inputs, gen):
    """Gradients of a fixed random projection of the outputs (a generator seeded the same for both sides)."""
    outs = [o for o in outputs if o is not None and o.requires_grad]
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_seed_is_the_packages_unfused_path(device, dtype, drop_and_pad):
    T, E, H, K = 37, 8, 24, 2
    routing_map = make_routing(T, E, K, device)
    probs = make_probs(routing_map).to(device)
    x = torch.randn(T, H, dtype=dtype, device=device)
    num_out = E * 6 if drop_and_pad else None  # capacity 6 < T
    results = []
    for impl in (seed, M):
        xi = x.clone().requires_grad_()
        pi = probs.clone().requires_grad_()
        out, pprobs, sidx = impl.permute(xi, routing_map, pi, num_out, drop_and_pad=drop_and_pad)
        back = impl.unpermute(out * 1.5, sidx, (T, H), pi, routing_map, drop_and_pad=drop_and_pad)
        gen = torch.Generator().manual_seed(1)
        results.append(((out, pprobs, sidx, back), _grads((out, pprobs, back), (xi, pi), gen)))
    (want, want_g), (got, got_g) = results[1], results[0]
    for a, b in zip(got[:3], want[:3], strict=True):  # permute: pure moves, bit for bit on every device
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(got[3:] + got_g, want[3:] + want_g, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            # unpermute's scatter_add_ and the gradients' index_add_ sum a token's 3+ rows (padding copies) with
            # atomics on CUDA, so the package itself does not repeat its own bits there: a sum's order changes its
            # rounding, up to a few roundings of its largest term (seen on an H200: 1 bf16 ulp of 0.5 on an output
            # of 0.016).
            scale = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(b.dtype).eps * scale)
