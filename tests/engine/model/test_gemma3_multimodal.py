"""Gemma 3's multimodal class (Gemma3ForConditionalGeneration: the decoder under model.language_model, its settings
in config.text_config, a SigLIP vision tower beside it), tiny and random: it loads from a local directory, capture
sees every site of its language model (the residual stream equals transformers' own hidden states), RTN 4-4-4
evaluation runs, and Rotate/Optimize refuse with the same reason as Gemma3ForCausalLM."""

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from engine.evaluate import perplexity
from engine.events import Done
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import ARCHITECTURES, UnsupportedArchitectureError, resolve
from engine.observe.capture import SITES, CaptureConfig, capture
from engine.quant.apply import quantize_model
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig, rotate

TEXT = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
)  # 16 patches, pooled to mm_tokens_per_image=4


def build(vocab: int = 96):
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=dict(vocab_size=vocab, **TEXT), vision_config=VISION, mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(cfg).eval().requires_grad_(False)


def ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(1))


def test_the_shapes_come_from_the_text_config():
    model = build()
    assert not hasattr(model.config, "hidden_size")  # really only in text_config
    arch = resolve(model)
    assert (arch.name, arch.n_layers, arch.hidden, arch.head_dim, arch.n_heads, arch.n_kv_heads, arch.vocab) == (
        "Gemma3ForConditionalGeneration",
        2,
        48,
        12,
        4,
        2,
        96,
    )
    assert arch.layer(model, 0) is model.model.language_model.layers[0]


def test_capture_sees_every_site_and_the_residual_stream_entering_each_layer():
    model = build()
    arch = resolve(model)
    done = [e for e in capture(model, arch, ids(), CaptureConfig(tokens=32, window=16)) if isinstance(e, Done)]
    table = done[-1].result.table.set_index(["layer", "site"])
    assert set(table.index) == {(i, s) for i in range(2) for s in SITES}
    with torch.no_grad():  # transformers' own view of each decoder layer's input
        hidden = model(ids(), output_hidden_states=True).hidden_states
    for i in range(2):
        assert table.loc[(i, "resid_attn"), "absmax"] == pytest.approx(float(hidden[i].abs().max()), rel=1e-6)
        assert table.loc[(i, "resid_attn"), "var"] == pytest.approx(
            float(hidden[i].double().var(correction=0)), rel=1e-4
        )


def test_rtn_evaluation_runs_and_rotation_refuses_with_gemma3s_reason():
    model = build()
    arch = resolve(model)
    fp = [e for e in perplexity(model, ids()) if isinstance(e, Done)][-1].result
    list(quantize_model(model, arch, Bits(4, 4, 4), get_recipe("rtn", clip="fixed")))
    q = [e for e in perplexity(model, ids()) if isinstance(e, Done)][-1].result
    assert torch.isfinite(torch.tensor([fp, q])).all() and q != fp
    reason = ARCHITECTURES["Gemma3ForCausalLM"].rotation_refusal
    assert arch.roles.rotation_refusal == reason and "normalize each sublayer's output" in reason
    with pytest.raises(UnsupportedArchitectureError, match="cannot be rotated exactly: Gemma 2 and 3 normalize"):
        rotate(model, arch, RotationConfig(r1="hadamard"))
    with pytest.raises(UnsupportedArchitectureError, match="Gemma 2 and 3 normalize"):
        list(train(model, arch, ids(), ids(1), TrainConfig(steps=1, windows=2, window=16)))
    assert arch.support()["rotate (Rotate)"] == reason


def test_a_saved_one_loads_from_its_directory(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.model.loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build(vocab=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    handle = load_model(str(tmp_path))
    assert type(handle.model).__name__ == "Gemma3ForConditionalGeneration" and handle.arch.hidden == 48
    assert handle.max_length == 128  # read from the text config
