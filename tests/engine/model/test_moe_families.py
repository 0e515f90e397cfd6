"""Mixtures of experts (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE, OLMoE) as tiny random models built from
their transformers configs, experts made linears at load (engine.model.experts): the same function as
transformers' stacked experts; each of R1..R4 and all four keep the logits and every routing decision; RTN and
GPTQ at 4-4-4 run; two Cayley steps move R1 (Qwen2-MoE's wider shared expert is refused with the reason); capture
sees every expert's down_proj input, and the tokens it counts per expert are the router's own assignments."""

import pytest
import torch
import transformers

from engine.events import Done
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import UnsupportedArchitectureError, resolve
from engine.model.experts import unfuse_experts
from engine.observe.capture import CaptureConfig, capture
from engine.quant.apply import quantize_model
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import ROTATIONS, RotationConfig, rotate
from engine.rotation.hadamard import random_hadamard

COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=80, num_local_experts=4, head_dim=12)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=80, shared_expert_intermediate_size=96, intermediate_size=96),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=80, intermediate_size=96, head_dim=12),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, intermediate_size=80)),
}


def fused(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "mlp.gate.weight" in name:
                p.normal_(0, 1.0)  # a decisive router: no near ties for float noise to flip
    return model.eval().requires_grad_(False)


def build(family: str):
    model = fused(family)
    assert unfuse_experts(model) == 2  # one Experts module per layer
    return model, resolve(model)


def ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def run(model, arch):
    """(logits, each layer's router top-k indices) on ids()."""
    picks = []
    hooks = [
        arch.module(model, "router", i).register_forward_hook(lambda m, a, out: picks.append(out[-1].clone()))
        for i in range(arch.n_layers)
    ]
    try:
        return model(ids(), use_cache=False).logits.double(), picks
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_what_transformers_stacked_experts_compute(family):
    reference = fused(family)
    model, arch = build(family)
    assert arch.n_experts == 4 and arch.intermediate == 80
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, reference(ids()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", [*ROTATIONS, "all"])
def test_each_rotation_keeps_the_logits_and_every_routing_decision(family, which):
    model, arch = build(family)
    names = list(ROTATIONS) if which == "all" else [which]
    rotated = rotate(model, arch, RotationConfig.from_names(names, "hadamard"))
    (before, picks_before), (after, picks_after) = run(model, arch), run(rotated, arch)
    assert (before - after).abs().max() <= 1e-3
    assert all(torch.equal(a, b) for a, b in zip(picks_before, picks_after, strict=False))


@pytest.mark.slow  # GPTQ over every expert
@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_and_gptq_at_4_4_4_run(family):
    model, arch = build(family)
    before, _ = run(model, arch)
    for weights in ("rtn", "gptq"):
        q = rotate(model, arch, RotationConfig.from_names(list(ROTATIONS), "hadamard"))
        list(quantize_model(q, arch, Bits(4, 4, 4), get_recipe("quarot", weights=weights), ids(4, 16)))
        out, _ = run(q, arch)
        assert torch.isfinite(out).all() and not torch.allclose(out, before, atol=1e-3)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.slow  # trains
@pytest.mark.parametrize("method", ["spinquant", "flrot"])
def test_two_cayley_steps_move_r1(family, method):
    model, arch = build(family)
    cfg = TrainConfig(method=method, steps=2, windows=2, window=16, block=16, eval_every=0, checkpoint_every=0)
    done = [e for e in train(model, arch, ids(2, 16), ids(1, 16), cfg) if isinstance(e, Done)][-1]
    r1 = torch.load(done.result.path, weights_only=True)["R1"].double()
    assert not torch.allclose(r1, random_hadamard(48, seed=0), atol=1e-4)


def test_a_shared_expert_wider_than_the_routed_ones_is_refused_for_training():
    model, arch = build("qwen2_moe")
    with pytest.raises(UnsupportedArchitectureError, match="shared expert's down_proj input \\(96\\) is wider"):
        list(train(model, arch, ids(2, 16), ids(1, 16), TrainConfig(steps=1, windows=2, window=16)))
    assert (
        arch.support()["rotate (Rotate)"] == "yes" and "shared expert" in arch.support()["learn rotations (Optimize)"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_counts_the_tokens_the_router_sent_to_each_expert(family):
    model, arch = build(family)
    _, picks = run(model, arch)  # the router's own top-k choices on the same tokens
    done = [e for e in capture(model, arch, ids(), CaptureConfig(tokens=48, window=24)) if isinstance(e, Done)]
    table = done[-1].result.table.set_index(["layer", "site"])
    for i in range(arch.n_layers):
        for e in range(arch.n_experts):
            routed = int((picks[i] == e).sum())
            site = (i, f"down_in[expert{e}]")
            assert (table.loc[site, "tokens"] if site in table.index else 0) == routed
        assert table.loc[(i, "mlp_in"), "tokens"] == 48
        if arch.roles.shared_expert:
            assert table.loc[(i, "down_in[shared]"), "tokens"] == 48
