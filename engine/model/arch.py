"""Architecture knowledge as data: which module plays which role in a LLaMA-style decoder.

Rotation, capture and quantization code never spell module names; they ask the record of the model's class.
Llama 1-3.2, Mistral, Qwen2/2.5 and Qwen3 share the layout (Qwen2 adds q/k/v biases); Phi-3 and Phi-4-mini
fuse q, k, v into one linear and gate, up into another.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's class is not in the role table."""


@dataclass(frozen=True)
class ArchRoles:
    """Dotted module paths, relative to the model (top level) or to one decoder layer (per layer), and what each
    decoder linear does to the residual stream. A role a family does not have is None (Phi-3 fuses q, k, v into
    one `qkv` linear and gate, up into `gate_up`)."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # per decoder layer
    attn: str = "self_attn"
    input_norm: str | None = "input_layernorm"          # feeds the attention's input linears
    post_attn_norm: str | None = "post_attention_layernorm"  # feeds the MLP's input linears
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    down: str = "mlp.down_proj"
    qkv: str | None = None       # fused rows [q | k | v] (Phi-3)
    gate_up: str | None = None   # fused rows [gate | up] (Phi-3)
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    # what each linear does to the residual stream, and which RMSNorm feeds which linears (rotation fusion,
    # norm folding, quantization and GPTQ all read these; none spells the lists again)
    linears: tuple = ("q", "k", "v", "o", "gate", "up", "down")   # every decoder linear, in execution order
    residual_readers: tuple = ("q", "k", "v", "gate", "up")
    residual_writers: tuple = ("o", "down")
    norm_feeds: tuple = (("input_norm", ("q", "k", "v")), ("post_attn_norm", ("gate", "up")))
    value: str = "v"             # the linear whose output rows hold the values (R2 acts on them per KV head)
    attn_reader: str = "q"       # a linear reading the attention's input (where capture sees it without a norm)
    mlp_reader: str = "gate"     # a linear reading the MLP's input
    rotation_refusal: str | None = None  # why R1-R4 cannot be fused exactly (capture and evaluation still work)


LLAMA = ArchRoles()
PHI3 = ArchRoles(q=None, k=None, v=None, gate=None, up=None, qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj",
                 linears=("qkv", "o", "gate_up", "down"), residual_readers=("qkv", "gate_up"),
                 norm_feeds=(("input_norm", ("qkv",)), ("post_attn_norm", ("gate_up",))), value="qkv",
                 attn_reader="qkv", mlp_reader="gate_up")

_SUBLAYER_NORM = ("{} normalize each sublayer's output before the residual add, so a rotation R1 of the residual "
                  "stream does not commute with those norms' per-channel gains and cannot be fused exactly")
_LAYERNORM = ("{} uses LayerNorm, which subtracts each token's mean over the channels; a rotation of the residual "
              "stream does not commute with that centering, so it cannot be fused exactly")
GEMMA = ArchRoles(post_attn_norm="pre_feedforward_layernorm", rotation_refusal=_SUBLAYER_NORM.format("Gemma 2 and 3"))
OLMO2 = ArchRoles(input_norm=None, post_attn_norm=None, norm_feeds=(),  # no norm before a sublayer: x feeds q/k/v
                  rotation_refusal=_SUBLAYER_NORM.format("OLMo-2"))

# Llama 1-3.2 (tied or untied embeddings), Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorms
# before RoPE: R1 acts on q_proj's input and R2 only on v and o, so those norms are untouched) share the layout.
ARCHITECTURES: dict[str, ArchRoles] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": ArchRoles(qkv_bias=True),
    "Qwen3ForCausalLM": LLAMA,
    "Phi3ForCausalLM": PHI3,     # Phi-3 and Phi-4-mini; partial rotary is fine: R3 acts on whole heads after RoPE
    # captured and evaluated unrotated; Rotate and Optimize refuse with the reason
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": GEMMA,
    "Olmo2ForCausalLM": OLMO2,
    "StableLmForCausalLM": ArchRoles(rotation_refusal=_LAYERNORM.format("StableLM")),
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

    @property
    def value_row_offset(self) -> int:
        """First output row of the values in the `value` linear: 0 for v_proj, after q and k rows in a fused qkv."""
        return 0 if self.roles.value == "v" else (self.n_heads + self.n_kv_heads) * self.head_dim

    def check_rotatable(self) -> None:
        """Refuse R1-R4 (Rotate, Optimize, rotated recipes) with the architectural reason, in one sentence."""
        if self.roles.rotation_refusal:
            raise UnsupportedArchitectureError(f"{self.name} cannot be rotated exactly: {self.roles.rotation_refusal}")

    def support(self) -> dict[str, str]:
        """What SpinScope does with this model: each of capture, rotate, learn, evaluate is 'yes' or the reason."""
        rotate = self.roles.rotation_refusal or "yes"
        return {"capture (Explore)": "yes", "rotate (Rotate)": rotate, "learn rotations (Optimize)": rotate,
                "evaluate (fp, rtn, qrazor)": "yes",
                "evaluate rotated recipes (quarot, rotated)": rotate}

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        path = getattr(self.roles, role)
        if path is None:
            raise ValueError(f"{self.name} has no {role!r} module (its linears are {', '.join(self.roles.linears)})")
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
