"""Every supported dense family, as a tiny random-weight model built from its transformers config (GQA, and widths
that need a non-power-of-two Hadamard: hidden 48 = 12 x 4, head_dim 12, intermediate 80 = 20 x 4): each of R1..R4
alone and all four together keep the logits; RTN 4-4-4 and GPTQ run; two Cayley steps change the rotations;
capture sees every site of every layer. The reference is the unrotated model itself, run by transformers."""

import pytest
import torch
import transformers

from engine.events import Done
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import resolve
from engine.observe.capture import SITES, CaptureConfig, capture
from engine.quant.apply import quantize_model
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import ROTATIONS, RotationConfig, rotate
from engine.rotation.hadamard import random_hadamard

COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {  # name: (config class, model class, family-specific settings)
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=12)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5)),
}


def build(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra))
    model = model.eval().requires_grad_(False)
    with torch.no_grad():  # random norm gains and biases, so folding and bias rotation have something to get wrong
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model, resolve(model)


def ids(n: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(ids(), use_cache=False).logits.double()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", [*ROTATIONS, "all"])
def test_each_rotation_and_all_four_keep_the_logits(family, which):
    model, arch = build(family)
    assert arch.name == FAMILIES[family][1] and arch.hidden == 48 and arch.head_dim == 12
    names = list(ROTATIONS) if which == "all" else [which]
    rotated = rotate(model, arch, RotationConfig.from_names(names, "hadamard"))
    before, after = logits(model), logits(rotated)
    assert (before - after).abs().max() <= 1e-3
    changed = [
        n
        for n, p in rotated.named_parameters()
        if n in dict(model.named_parameters()) and not torch.equal(p, dict(model.named_parameters())[n])
    ]
    assert changed  # the rotation really touched the weights (R3 alone still folds the norms)


@pytest.mark.slow  # GPTQ on every linear
@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_and_gptq_at_4_4_4_run_and_change_the_output(family):
    model, arch = build(family)
    before = logits(model)
    for weights in ("rtn", "gptq"):
        q = rotate(model, arch, RotationConfig.from_names(list(ROTATIONS), "hadamard"))
        list(quantize_model(q, arch, Bits(4, 4, 4), get_recipe("quarot", weights=weights), ids(4, 16)))
        out = logits(q)
        assert torch.isfinite(out).all() and not torch.allclose(out, before, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow  # trains
@pytest.mark.parametrize("method", ["spinquant", "flrot"])
def test_two_cayley_steps_run_and_change_the_rotations(family, method):
    model, arch = build(family)
    cfg = TrainConfig(method=method, steps=2, windows=2, window=16, block=16, eval_every=0, checkpoint_every=0)
    done = [e for e in train(model, arch, ids(2, 16), ids(1, 16), cfg) if isinstance(e, Done)][-1]
    saved = torch.load(done.result.path, weights_only=True)
    assert len(done.result.state.history) == 2
    start = random_hadamard(48, seed=0)  # where training starts (QuaRot's R1 for seed 0)
    assert not torch.allclose(saved["R1"].double(), start, atol=1e-4)  # the learned R1 moved away from it
    assert torch.allclose(saved["R1"].double() @ saved["R1"].double().T, torch.eye(48, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_sees_every_site_of_every_layer(family):
    model, arch = build(family)
    done = [e for e in capture(model, arch, ids(2, 16), CaptureConfig(tokens=32, window=16)) if isinstance(e, Done)]
    table = done[-1].result.table
    assert {(int(r.layer), r.site) for r in table.itertuples()} == {(i, s) for i in range(2) for s in SITES}


def test_the_qrazor_page_offers_the_linears_each_family_has():
    from engine.observe.qrazor_compare import site_readers

    for family, attn, mlp in (("qwen3", ("q", "k", "v"), ("gate", "up")), ("phi3", ("qkv",), ("gate_up",))):
        model, arch = build(family)
        readers = site_readers(arch)
        assert (readers["attn_in"], readers["mlp_in"]) == (attn, mlp)
        for role in attn + mlp:
            assert arch.module(model, role, 0).in_features == arch.hidden  # each really reads the residual width
