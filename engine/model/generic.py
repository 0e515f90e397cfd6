"""Capture on a causal LM the architecture table does not know: its roles are found from the module tree.

The decoder blocks are the nn.ModuleList as long as config.num_hidden_layers; capture reads the residual stream
entering each block (site resid_attn) and the input of every linear inside it (nn.Linear, or GPT-2's Conv1D),
named by module path (site linear_in[attention.query_key_value]). Nothing says which linear reads or writes the
residual stream, or which norm feeds which, so rotations, quantizer placement and KV quantization refuse.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from engine.model.arch import ArchInfo, ArchRoles, UnsupportedArchitectureError, causal_lm_classes

REASON = "not in the architecture table: roles unknown, rotations cannot be fused"
# every role the table spells is unknown here; only `layers` is filled in by discover()
GENERIC = ArchRoles(
    embed=None,
    final_norm=None,
    lm_head=None,
    attn=None,
    input_norm=None,
    post_attn_norm=None,
    q=None,
    k=None,
    v=None,
    o=None,
    gate=None,
    up=None,
    down=None,
    linears=(),
    residual_readers=(),
    residual_writers=(),
    norm_feeds=(),
    value=None,
    attn_reader=None,
    mlp_reader=None,
    rotation_refusal=REASON,
    generic=True,
)


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear, its weight stored transposed

    return isinstance(module, (nn.Linear, Conv1D))


def decoder_blocks(model: nn.Module, n_layers: int) -> str | None:
    """The path of the first nn.ModuleList of n_layers modules (the decoder's blocks), or None."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path
    return None


def discover(model: nn.Module, refusal: str) -> ArchInfo:
    """An ArchInfo for capture on a causal LM class outside the table; `refusal` is raised for anything else."""
    name, cfg = type(model).__name__, model.config.get_text_config()
    n_layers = getattr(cfg, "num_hidden_layers", None)
    layers = decoder_blocks(model, n_layers) if name in causal_lm_classes() and n_layers else None
    if layers is None:
        raise UnsupportedArchitectureError(refusal)
    block = model.get_submodule(layers)[0]
    linears = tuple(path for path, m in block.named_modules() if path and is_linear(m))
    hidden = cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", None) or 0
    return ArchInfo(
        name=name,
        roles=replace(GENERIC, layers=layers),
        n_layers=n_layers,
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", None) or 0,
        n_heads=heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0),
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
        linears=linears,
    )
