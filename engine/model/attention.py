"""One attention entry point that SpinScope controls: hooks on (q, k, v) after RoPE, then plain SDPA.

Transformers looks attention up by `config._attn_implementation`. Registering ours lets capture read Q/K/V after
RoPE, the online R3 rotate Q and K, and the KV quantizer act on the cache values, without patching model code.
A module's hooks live in its `spinscope_qkv_hooks` list; each maps (module, q, k, v) -> (q, k, v) with
q [B, heads, T, head_dim] and k, v [B, kv_heads, T, head_dim].
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "spinscope"
HOOKS_ATTR = "spinscope_qkv_hooks"


def _attention(module, query, key, value, attention_mask, **kwargs):
    for hook in getattr(module, HOOKS_ATTR, ()):
        query, key, value = hook(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model: nn.Module) -> None:
    """Route the model's attention through SpinScope's entry point (idempotent; same numbers as sdpa)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


def add_hook(attn: nn.Module, hook) -> None:
    hooks = getattr(attn, HOOKS_ATTR, None)
    if hooks is None:
        hooks = []
        setattr(attn, HOOKS_ATTR, hooks)
    hooks.append(hook)


def remove_hook(attn: nn.Module, hook) -> None:
    hooks = getattr(attn, HOOKS_ATTR, [])
    if hook in hooks:
        hooks.remove(hook)
