"""Architecture knowledge as data: which module plays which role in a LLaMA-style decoder.

Rotation, capture and quantization code never spell module names; they ask the record of the model's class.
Llama, Mistral and Qwen2 share the layout; Qwen2 adds q/k/v biases.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's class is not in the role table."""


@dataclass(frozen=True)
class ArchRoles:
    """Dotted module paths, relative to the model (top level) or to one decoder layer (per layer)."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # per decoder layer
    attn: str = "self_attn"
    input_norm: str = "input_layernorm"          # feeds q, k, v
    post_attn_norm: str = "post_attention_layernorm"  # feeds gate, up
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    # what each linear does to the residual stream, and which RMSNorm feeds which linears (rotation fusion,
    # norm folding, quantization and GPTQ all read these; none spells the lists again)
    residual_readers: tuple = ("q", "k", "v", "gate", "up")
    residual_writers: tuple = ("o", "down")
    norm_feeds: tuple = (("input_norm", ("q", "k", "v")), ("post_attn_norm", ("gate", "up")))

    @property
    def linears(self) -> tuple:
        """Every decoder linear role, in execution order."""
        return ("q", "k", "v", "o", "gate", "up", "down")


ARCHITECTURES: dict[str, ArchRoles] = {
    "LlamaForCausalLM": ArchRoles(),
    "MistralForCausalLM": ArchRoles(),
    "Qwen2ForCausalLM": ArchRoles(qkv_bias=True),
}


@dataclass(frozen=True)
class ArchInfo:
    """The roles plus the shapes read from the model's config."""

    name: str
    roles: ArchRoles
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    def layer(self, model: nn.Module, i: int) -> nn.Module:
        return model.get_submodule(self.roles.layers)[i]

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        path = getattr(self.roles, role)
        root = model if layer is None else self.layer(model, layer)
        return root.get_submodule(path)


def resolve(model: nn.Module) -> ArchInfo:
    """Look up the model's class in the table and read its shapes; refuse anything else clearly."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name} is not supported; SpinScope knows {', '.join(sorted(ARCHITECTURES))}"
        )
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ArchInfo(
        name=name,
        roles=ARCHITECTURES[name],
        n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def check_config_supported(config) -> None:
    """Refuse an architecture before any weights are loaded (config.architectures from config.json)."""
    names = list(getattr(config, "architectures", None) or [])
    if not any(n in ARCHITECTURES for n in names):
        shown = ", ".join(names) or getattr(config, "model_type", "unknown")
        raise UnsupportedArchitectureError(
            f"architecture {shown} is not supported; SpinScope knows {', '.join(sorted(ARCHITECTURES))}"
        )
