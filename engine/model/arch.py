"""Architecture knowledge as data: which module plays which role in a LLaMA-style decoder.

Rotation, capture and quantization code never spell module names; they ask the record of the model's class.
Llama 1-3.2, Mistral, Qwen2/2.5 and Qwen3 share the layout (Qwen2 adds q/k/v biases); Phi-3 and Phi-4-mini
fuse q, k, v into one linear and gate, up into another; mixtures of experts add a router and per-expert linears.
Families whose rotations cannot be fused exactly (Gemma 2/3, Gemma 3's multimodal class, OLMo-2, StableLM) carry
the reason and are captured and evaluated unrotated. Causal LMs outside the table are captured only
(engine.model.generic).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    input_norm: str | None = "input_layernorm"  # feeds the attention's input linears
    post_attn_norm: str | None = "post_attention_layernorm"  # feeds the MLP's input linears
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    down: str | None = "mlp.down_proj"  # None in a mixture: every expert has its own
    qkv: str | None = None  # fused rows [q | k | v] (Phi-3)
    gate_up: str | None = None  # fused rows [gate | up] (Phi-3)
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    # what each linear does to the residual stream, and which RMSNorm feeds which linears (rotation fusion,
    # norm folding, quantization and GPTQ all read these; none spells the lists again)
    linears: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # every decoder linear, in execution order
    residual_readers: tuple = ("q", "k", "v", "gate", "up")
    residual_writers: tuple = ("o", "down")
    norm_feeds: tuple = (("input_norm", ("q", "k", "v")), ("post_attn_norm", ("gate", "up")))
    value: str = "v"  # the linear whose output rows hold the values (R2 acts on them per KV head)
    attn_reader: str = "q"  # a linear reading the attention's input (where capture sees it without a norm)
    mlp_reader: str = "gate"  # a linear reading the MLP's input
    rotation_refusal: str | None = None  # why R1-R4 cannot be fused exactly (capture and evaluation still work)
    # mixtures of experts (engine.model.experts makes each expert a pair of linears: roles expert{e}.gate_up and
    # expert{e}.down); the router and a shared expert's gate read the residual stream too, unquantized
    router: str | None = None
    experts: str | None = None  # the ModuleList of ExpertMLP
    shared_expert: str | None = None  # an always-on MLP beside the routed experts (Qwen2-MoE)
    shared_gate: str | None = None  # its sigmoid gate [1, hidden]
    # a class outside this table (engine.model.generic): only `layers` is known, and `linears` are module paths
    generic: bool = False


LLAMA = ArchRoles()
PHI3 = ArchRoles(
    q=None,
    k=None,
    v=None,
    gate=None,
    up=None,
    qkv="self_attn.qkv_proj",
    gate_up="mlp.gate_up_proj",
    linears=("qkv", "o", "gate_up", "down"),
    residual_readers=("qkv", "gate_up"),
    norm_feeds=(("input_norm", ("qkv",)), ("post_attn_norm", ("gate_up",))),
    value="qkv",
    attn_reader="qkv",
    mlp_reader="gate_up",
)

_SUBLAYER_NORM = (
    "{} normalize each sublayer's output before the residual add, so a rotation R1 of the residual "
    "stream does not commute with those norms' per-channel gains and cannot be fused exactly"
)
_LAYERNORM = (
    "{} uses LayerNorm, which subtracts each token's mean over the channels; a rotation of the residual "
    "stream does not commute with that centering, so it cannot be fused exactly"
)
GEMMA = ArchRoles(post_attn_norm="pre_feedforward_layernorm", rotation_refusal=_SUBLAYER_NORM.format("Gemma 2 and 3"))
# the multimodal class: the same decoder under model.language_model, beside a vision tower capture never visits
GEMMA3_MULTIMODAL = replace(
    GEMMA,
    embed="model.language_model.embed_tokens",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
)
OLMO2 = ArchRoles(
    input_norm=None,
    post_attn_norm=None,
    norm_feeds=(),  # no norm before a sublayer: x feeds q/k/v
    rotation_refusal=_SUBLAYER_NORM.format("OLMo-2"),
)

MOE = ArchRoles(
    gate=None,
    up=None,
    down=None,
    linears=("q", "k", "v", "o"),
    residual_readers=("q", "k", "v"),
    residual_writers=("o",),
    norm_feeds=(("input_norm", ("q", "k", "v")), ("post_attn_norm", ())),
    router="mlp.gate",
    experts="mlp.experts.experts",
)

# Llama 1-3.2 (tied or untied embeddings), Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorms
# before RoPE: R1 acts on q_proj's input and R2 only on v and o, so those norms are untouched) share the layout.
ARCHITECTURES: dict[str, ArchRoles] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": ArchRoles(qkv_bias=True),
    "Qwen3ForCausalLM": LLAMA,
    "Phi3ForCausalLM": PHI3,  # Phi-3 and Phi-4-mini; partial rotary is fine: R3 acts on whole heads after RoPE
    # captured and evaluated unrotated; Rotate and Optimize refuse with the reason
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": GEMMA,
    "Gemma3ForConditionalGeneration": GEMMA3_MULTIMODAL,  # text settings in config.text_config
    "Olmo2ForCausalLM": OLMO2,
    "StableLmForCausalLM": ArchRoles(rotation_refusal=_LAYERNORM.format("StableLM")),
    # mixtures of experts: the router reads the residual stream (R1 fused into it), every expert's down gets R4
    "MixtralForCausalLM": MOE,
    "Qwen3MoeForCausalLM": MOE,
    "OlmoeForCausalLM": MOE,  # q/k norms over all heads before RoPE: R1 acts on their input, R2 not on q or k
    "Qwen2MoeForCausalLM": replace(
        MOE, qkv_bias=True, shared_expert="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"
    ),
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
    n_experts: int = 0
    # the concrete roles of one decoder layer (the pattern of `roles`, with one pair of roles per expert)
    linears: tuple = ()  # every quantized linear, in execution order
    residual_readers: tuple = ()  # W <- W R1 (router and shared gate included)
    residual_writers: tuple = ()  # W <- R1^T W
    norm_feeds: tuple = ()  # (norm role, the roles it feeds)
    down_roles: tuple = ()  # the linears whose input R4 rotates
    learn_refusal: str | None = None  # why rotations cannot be trained (beyond rotation_refusal)

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

    def check_known_roles(self, what: str) -> None:
        """Refuse what needs the roles (quantizer placement, the KV cache, named sites) on a class outside the table."""
        if self.roles.generic:
            raise UnsupportedArchitectureError(f"{self.name} cannot {what}: {self.roles.rotation_refusal}")

    def check_learnable(self) -> None:
        """Refuse Cayley training (Optimize) with the reason."""
        self.check_rotatable()
        if self.learn_refusal:
            raise UnsupportedArchitectureError(f"{self.name}: rotations cannot be learned here: {self.learn_refusal}")

    def support(self) -> dict[str, str]:
        """What SpinScope does with this model: each of capture, rotate, learn, evaluate is 'yes' or the reason."""
        rotate = self.roles.rotation_refusal or "yes"
        learn = self.roles.rotation_refusal or self.learn_refusal or "yes"
        evaluate = f"floating point only: {self.roles.rotation_refusal}" if self.roles.generic else "yes"
        return {
            "capture (Explore)": "yes",
            "rotate (Rotate)": rotate,
            "learn rotations (Optimize)": learn,
            "evaluate (fp, rtn, qrazor)": evaluate,
            "evaluate rotated recipes (quarot, rotated)": rotate,
        }

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        head, _, leaf = role.partition(".")
        if head.startswith("expert") and head[6:].isdigit():
            path = f"{self.roles.experts}.{int(head[6:])}.{leaf}_proj"
        elif head == "shared" and leaf:
            path = f"{self.roles.shared_expert}.{leaf}_proj"
        elif self.roles.generic and role in self.linears:  # a module path inside the block
            path = role
        else:
            path = getattr(self.roles, role)
        if path is None:
            raise ValueError(f"{self.name} has no {role!r} module (its linears are {', '.join(self.linears)})")
        root = model if layer is None else self.layer(model, layer)
        return root.get_submodule(path)


def _layer_roles(roles: ArchRoles, n_experts: int) -> dict:
    """The concrete per-layer role lists: the dense pattern plus, for a mixture, each expert's pair of linears."""
    experts = [f"expert{e}.{r}" for e in range(n_experts) for r in ("gate_up", "down")]
    shared = ["shared.gate", "shared.up", "shared.down"] if roles.shared_expert else []
    moe_readers = [r for r in ("router", "shared_gate") if getattr(roles, r)] + experts[0::2] + shared[:2]
    moe_writers = experts[1::2] + shared[2:]
    norm_feeds = tuple(
        (norm, tuple(readers) + (tuple(moe_readers) if norm == "post_attn_norm" else ()))
        for norm, readers in roles.norm_feeds
    )
    return dict(
        linears=tuple(roles.linears) + tuple(experts + shared),
        residual_readers=tuple(roles.residual_readers) + tuple(moe_readers),
        residual_writers=tuple(roles.residual_writers) + tuple(moe_writers),
        norm_feeds=norm_feeds,
        down_roles=(("down",) if roles.down else ()) + tuple(moe_writers),
    )


def resolve(model: nn.Module) -> ArchInfo:
    """Look up the model's class in the table and read its shapes; a causal LM outside it gets its blocks and linears
    found from the module tree (engine.model.generic: capture only); anything else is refused clearly."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        from engine.model.generic import discover  # capture only: the roles are unknown

        return discover(model, _refusal(name))
    # a multimodal model keeps the decoder's shapes in its text config (get_text_config is the config itself else)
    cfg, roles = model.config.get_text_config(), ARCHITECTURES[name]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_experts, intermediate, learn_refusal = 0, cfg.intermediate_size, None
    if roles.experts:
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise UnsupportedArchitectureError(
                f"{name} with dense MLP layers between the sparse ones "
                "(mlp_only_layers / decoder_sparse_step) is not supported yet"
            )
        if not hasattr(model.get_submodule(roles.layers)[0].get_submodule(roles.experts.rpartition(".")[0]), "experts"):
            raise UnsupportedArchitectureError(
                f"{name}'s experts are stacked 3-D parameters: load it with "
                "engine.model.loading.load_model (or engine.model.experts."
                "unfuse_experts) so each expert is a pair of linears"
            )
        n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        intermediate = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        shared = getattr(cfg, "shared_expert_intermediate_size", None) if roles.shared_expert else None
        if shared and shared != intermediate:
            learn_refusal = (
                f"its shared expert's down_proj input ({shared}) is wider than the routed experts' "
                f"({intermediate}), and training learns one R4 width per layer"
            )
    return ArchInfo(
        name=name,
        roles=roles,
        n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=intermediate,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False))),
        n_experts=n_experts,
        learn_refusal=learn_refusal,
        **_layer_roles(roles, n_experts),
    )


def causal_lm_classes() -> set[str]:
    """The class names transformers' AutoModelForCausalLM builds (decoder-only causal LMs, no remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return {n for v in names for n in ((v,) if isinstance(v, str) else v)}


def _refusal(shown: str) -> str:
    return (
        f"architecture {shown} is not supported: SpinScope reads decoder-only causal LMs that transformers "
        f"builds (AutoModelForCausalLM), and knows the roles of {', '.join(sorted(ARCHITECTURES))}"
    )


def check_config_supported(config) -> None:
    """Refuse, before any weights are loaded (config.architectures from config.json), what is neither in the table
    nor a causal LM class of transformers (those outside the table are captured only: engine.model.generic)."""
    names = list(getattr(config, "architectures", None) or [])
    if not any(n in ARCHITECTURES or n in causal_lm_classes() for n in names):
        raise UnsupportedArchitectureError(_refusal(", ".join(names) or getattr(config, "model_type", "unknown")))
