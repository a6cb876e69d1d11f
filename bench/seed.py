"""The seed's unfused torch path (NeMo Automodel / Megatron ``moe_utils``): the baseline of every benchmark and an
independent oracle of tests/test_reference.py and tests/test_fuzz.py (tests/test_seed_oracle.py checks it against
the installed package, bit for bit).

Written from the seed's documented behaviour: masked_select order for permute, multiply-then-scatter_add for
unpermute. (moe_raw.reference is the test oracle: same results, plus moe_raw's num_out_tokens contract.)
"""

from __future__ import annotations

import torch


def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    num_tokens, _ = tokens.shape
    num_experts = routing_map.shape[1]
    permuted_probs = None
    if drop_and_pad and num_out_tokens is not None:
        capacity = num_out_tokens // num_experts
        routing_map = routing_map.to(dtype=torch.int8).T.contiguous()
        sorted_indices = routing_map.argsort(dim=-1, descending=True, stable=True)[:, :capacity].contiguous()
        sorted_indices = sorted_indices.view(-1)
        if probs is not None:
            probs_t_1d = probs.T.contiguous().view(-1)
            dim0 = torch.arange(num_experts, device=routing_map.device).unsqueeze(-1)
            # The seed writes view(num_experts, capacity), which raises when capacity > T (the argsort slice then
            # keeps T columns); sizing the view from the rows kept is what it means.
            dim1 = sorted_indices.view(num_experts, sorted_indices.numel() // num_experts)
            permuted_probs = probs_t_1d.index_select(0, (dim0 * num_tokens + dim1).view(-1))
    else:
        routing_map = routing_map.bool().T.contiguous()
        token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(num_experts, -1)
        sorted_indices = token_indices.masked_select(routing_map)
        if probs is not None:
            permuted_probs = probs.T.contiguous().masked_select(routing_map)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def unpermute(
    permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False, drop_and_pad=False
):
    _, hidden = restore_shape
    input_dtype = permuted_tokens.dtype
    if probs is not None:
        if drop_and_pad:
            num_experts = routing_map.size(1)
            capacity = sorted_indices.size(0) // num_experts
            num_unpermuted = probs.size(0)
            probs_t_1d = probs.T.contiguous().view(-1)
            dim0 = torch.arange(num_experts, device=routing_map.device).unsqueeze(-1)
            dim1 = sorted_indices.view(num_experts, capacity)
            permuted_probs = probs_t_1d.index_select(0, (dim0 * num_unpermuted + dim1).view(-1))
        else:
            permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
        permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    out = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    out.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return out.to(dtype=input_dtype)
