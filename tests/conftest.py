"""Fixtures shared by the whole suite: a private results cache per test, and models built or loaded once.

The results cache is redirected to tmp_path (SPINSCOPE_CACHE), but its models/ folder stays the real one through a
symlink: the default model's one-time conversion (about 30 s) is reused, never redone per test, and no test ever
reads or writes the user's cached results.
"""
import os

# Triton reads this when first imported, and transformers imports it: set it before anything else (see
# tests/kernels/conftest.py); a GPU run overrides it with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty results cache under tmp_path for this test; models/ links to the real converted models."""
    from engine import store

    real_models = store.cache_root() / "models"
    real_models.mkdir(exist_ok=True)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(real_models, target_is_directory=True)
    monkeypatch.setenv("SPINSCOPE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def default_handle():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from engine.model.loading import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama saved with save_pretrained, with the default model's tokenizer: a real local model
    directory that loads in about a second (for loader and CLI tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
