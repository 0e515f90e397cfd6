"""Mixture-of-experts layers made of ordinary linears, so every tool that works on a linear works on an expert.

Transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE as two stacked 3-D parameters
(gate_up_proj [E, 2I, H], down_proj [E, H, I]) applied inside one module's loop, where no hook can see an expert's
input. `unfuse_experts` replaces that module, at load time, with `UnfusedExperts`: the same loop over the same
weights (copied into one nn.Linear pair per expert), computing the same function. Rotation fusion, the online R4,
quantizers, GPTQ's Hessians and capture then address expert e's linears as roles `expert{e}.gate_up` and
`expert{e}.down` (engine.model.arch), and an expert's down_proj input holds exactly the tokens routed to it.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: gate and up in one linear [2I, H] (rows [gate | up]), then act(gate) * up, then down [H, I]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Linear(
            gate_up.shape[1], gate_up.shape[0], bias=False, dtype=gate_up.dtype, device=gate_up.device
        )
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, dtype=down.dtype, device=down.device)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(gate_up)
            self.down_proj.weight.copy_(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.Module):
    """Drop-in for a transformers Experts module: forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])
    -> [N, H], each token's output the routing-weighted sum of its experts' outputs."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.num_experts = fused.gate_up_proj.shape[0]
        self.experts = nn.ModuleList(
            ExpertMLP(fused.gate_up_proj[e].detach(), fused.down_proj[e].detach(), fused.act_fn)
            for e in range(self.num_experts)
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():  # the experts some token was routed to, in index order
            token_idx, slot = torch.where(top_k_index == e)
            self.experts[e].down_proj.routed_rows = token_idx  # which tokens these rows are, for capture
            y = self.experts[e](hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every stacked-parameter Experts module in `model` by UnfusedExperts; returns how many."""
    names = [name for name, m in model.named_modules() if is_fused_experts(m)]
    for name in names:  # by name, holding no fused module: each is freed once replaced (peak: one layer's experts)
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, UnfusedExperts(getattr(owner, child)))
    return len(names)
