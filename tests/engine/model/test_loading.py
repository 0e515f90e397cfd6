"""Model loading: the default model, local directories, and every bad input (the text data: tests/engine/data)."""

import math
import shutil

import pytest
import torch

from engine.data.corpus import load_corpus, windows
from engine.model.arch import UnsupportedArchitectureError
from engine.model.loading import ModelLoadError, load_model


@pytest.mark.slow
def test_default_model_is_smollm2_and_predicts_text(default_handle):
    h = default_handle
    assert (h.arch.name, h.arch.n_layers, h.arch.hidden, h.arch.n_heads, h.arch.n_kv_heads) == (
        "LlamaForCausalLM",
        30,
        576,
        9,
        3,
    )
    assert h.arch.tied_embeddings and "4-bit" in h.note
    assert h.fingerprint.endswith("-float32") and not h.model.training
    assert not any(p.requires_grad for p in h.model.parameters())
    # A converted model that works predicts wiki text far better than chance (ln 49152 = 10.8 nats).
    ids = windows(load_corpus("wiki"), h.tokenizer, 256, 256, split="eval")
    with torch.no_grad():
        loss = h.model(ids, labels=ids, use_cache=False).loss
    assert float(loss) < math.log(100)


def test_local_model_directory_loads(tiny_model_dir):
    h = load_model(str(tiny_model_dir))
    assert h.arch.name == "LlamaForCausalLM" and h.arch.n_layers == 2 and h.arch.hidden == 16
    assert "local model directory" in h.note and h.device == "cpu"
    assert load_model(str(tiny_model_dir)).fingerprint == h.fingerprint  # stable: usable as a cache key
    half = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert half.fingerprint != h.fingerprint and next(half.model.parameters()).dtype == torch.bfloat16


def test_unknown_model_id_without_network():
    with pytest.raises(ModelLoadError, match="not found.*no network"):
        load_model("no-such-org/no-such-model-xyz")


def test_directory_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        load_model(str(f))


def test_damaged_weight_file(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        load_model(str(tmp_path))


def test_directory_without_tokenizer(tmp_path, tiny_model_dir):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer.*tokenizer.json"):
        load_model(str(tmp_path))


def bert_dir(path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(path)
    return path


def test_a_class_that_is_no_causal_lm_is_refused(tmp_path):
    """Causal LMs outside the table load for capture (test_generic_capture.py); a masked LM is refused."""
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM is not supported.*LlamaForCausalLM"):
        load_model(str(bert_dir(tmp_path)))


@pytest.mark.parametrize(
    "name, dtype, message", [("", "float32", "no model given"), ("default", "int8", "dtype 'int8' is not supported")]
)
def test_bad_name_or_dtype(name, dtype, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name, dtype=dtype)
