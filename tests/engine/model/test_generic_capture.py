"""Capture on causal LMs outside the architecture table (GPT-NeoX: LayerNorm, fused query_key_value, parallel
residual; GPT-2: Conv1D linears), roles found from the module tree (engine.model.generic): the block inputs captured
equal transformers' own hidden states, every linear of every block has a site named by its module path, and
rotation, Cayley training and quantization refuse in one sentence; a class that is no causal LM is refused."""

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.evaluate import perplexity
from engine.events import Done
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import UnsupportedArchitectureError, resolve
from engine.observe.capture import CaptureConfig, capture
from engine.quant.apply import quantize_model
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig, rotate

REASON = "not in the architecture table: roles unknown, rotations cannot be fused"
MODELS = {  # name: (config class, model class, settings, the blocks' path)
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64
        ),
        "gpt_neox.layers",
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64), "transformer.h"),
}


def build(name: str, vocab: int = 96):
    config_cls, model_cls, extra, _ = MODELS[name]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=vocab, **extra)).eval()


def ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_capture_reads_each_blocks_input_and_every_linears_input(name):
    model = build(name)
    arch = resolve(model)
    assert arch.roles.generic and arch.roles.layers == MODELS[name][3]
    done = [e for e in capture(model, arch, ids(), CaptureConfig(tokens=32, window=16)) if isinstance(e, Done)]
    table = done[-1].result.table.set_index(["layer", "site"])
    blocks = model.get_submodule(MODELS[name][3])
    linears = {p: m for p, m in blocks[0].named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert len(linears) >= 4
    expected = {(i, "resid_attn") for i in range(len(blocks))} | {
        (i, f"linear_in[{p}]") for i in range(len(blocks)) for p in linears
    }
    assert set(table.index) == expected
    for p, m in linears.items():  # each linear's input width, over every token
        width = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
        assert table.loc[(0, f"linear_in[{p}]"), "channels"] == width
        assert table.loc[(0, f"linear_in[{p}]"), "tokens"] == 32
    with torch.no_grad():  # transformers' own view of each block's input
        hidden = model(ids(), output_hidden_states=True).hidden_states
    for i in range(len(blocks)):
        assert table.loc[(i, "resid_attn"), "absmax"] == pytest.approx(float(hidden[i].abs().max()), rel=1e-6)
        assert table.loc[(i, "resid_attn"), "var"] == pytest.approx(
            float(hidden[i].double().var(correction=0)), rel=1e-4
        )
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0  # every hook removed


@pytest.mark.parametrize("name", MODELS)
def test_rotation_training_and_quantization_refuse_in_one_sentence(name):
    model = build(name)
    arch = resolve(model)
    with pytest.raises(UnsupportedArchitectureError, match=f"^{arch.name} cannot be rotated exactly: {REASON}$"):
        rotate(model, arch, RotationConfig(r1="hadamard"))
    with pytest.raises(UnsupportedArchitectureError, match=REASON):
        list(train(model, arch, ids(), ids(1), TrainConfig(steps=1, windows=2, window=16)))
    with pytest.raises(UnsupportedArchitectureError, match=f"^{arch.name} cannot be quantized: {REASON}$"):
        list(quantize_model(model, arch, Bits(4, 4, 4), get_recipe("rtn", clip="fixed")))
    fp = [e for e in perplexity(model, ids()) if isinstance(e, Done)][-1].result  # the unquantized model evaluates
    assert torch.isfinite(torch.tensor(fp))
    support = arch.support()
    assert support["capture (Explore)"] == "yes" and support["rotate (Rotate)"] == REASON
    assert REASON in support["evaluate (fp, rtn, qrazor)"] and REASON in support["learn rotations (Optimize)"]


def test_a_saved_one_loads_and_a_class_that_is_no_causal_lm_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.model.loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build("gpt_neox", vocab=len(tokenizer)).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    handle = load_model(str(tmp_path / "neox"))
    assert handle.arch.roles.generic and handle.arch.n_layers == 3
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(
        UnsupportedArchitectureError,
        match="BertForMaskedLM is not supported: SpinScope reads decoder-only causal LMs.*LlamaForCausalLM",
    ):
        resolve(bert)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM is not supported"):
        load_model(str(tmp_path / "bert"))
