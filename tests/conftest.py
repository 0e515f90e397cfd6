"""Fixtures shared by the whole suite: a private results cache for the session and for every test, and models built
or loaded once.

No test reads or writes the user's cache/. Before anything is collected, SPINSCOPE_CACHE points at a session
cache under pytest's temporary directory (so session fixtures and subprocesses use it too), and every test gets
a fresh one of its own (`tmp_cache`, autouse). Their models/ folder is a symlink to the real converted models:
the default model's one-time conversion (about 30 s) is shared, read-only. tests/test_real_cache_untouched.py
runs last and checks that the real cache/ holds nothing new.
"""

import os
import shutil
import tempfile
from pathlib import Path

# Triton reads this when first imported, and transformers imports it: set it before anything else (see
# tests/kernels/conftest.py); a GPU run overrides it with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import cache_snapshot, private_cache, save_tiny_llama  # noqa: E402

SNAPSHOT = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[SNAPSHOT] = cache_snapshot()
    session_cache = private_cache(Path(tempfile.mkdtemp(prefix="spinscope-session-cache-")))
    os.environ["SPINSCOPE_CACHE"] = str(session_cache)


def pytest_unconfigure(config):
    session_cache = os.environ.pop("SPINSCOPE_CACHE", "")
    if "spinscope-session-cache-" in session_cache:
        shutil.rmtree(session_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """A test that uses the real default model is slow (left out of `make test-fast`) by that fact alone, one that
    skips without a CUDA GPU is a gpu test; the real-cache check runs after every other test, whatever the order of
    collection."""
    for item in items:
        if "default_handle" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if any(
            m.name == "skipif" and str(m.kwargs.get("reason", "")).startswith("needs a CUDA GPU")
            for m in item.iter_markers()
        ):  # the kernels' GPU tests too: `make test-gpu` selects the marker
            item.add_marker(pytest.mark.gpu)
    last = [i for i in items if i.get_closest_marker("runs_last")]
    items[:] = [i for i in items if not i.get_closest_marker("runs_last")] + last


@pytest.fixture
def real_cache_before(request) -> dict:
    """cache_snapshot() of the user's cache/ as it was before the session collected anything."""
    return request.config.stash[SNAPSHOT]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """This test's own empty results cache (autouse: every test has one); models/ links to the real models."""
    root = private_cache(tmp_path / "cache")
    monkeypatch.setenv("SPINSCOPE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def default_handle():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from engine.model.loading import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """save_tiny_llama's model (hidden 16) in a session directory, for loader and CLI tests."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory):
    """{name: directory} of a tiny Qwen3, a tiny Mixtral (2 layers, 4 experts, top-2) and a tiny GPT-NeoX (outside the
    architecture table), random weights, seed 0,
    with the default model's tokenizer: local model directories a user could type into the sidebar."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
    )
    out = {}
    for name, cfg, cls in (
        ("qwen3", transformers.Qwen3Config(intermediate_size=64, **common), transformers.Qwen3ForCausalLM),
        (
            "mixtral",
            transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common),
            transformers.MixtralForCausalLM,
        ),
    ):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        cls(cfg).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    # a causal LM the architecture table does not know (engine.model.generic: capture only)
    torch.manual_seed(0)
    out["gpt_neox"] = tmp_path_factory.mktemp("gpt_neox")
    transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(out["gpt_neox"])
    tokenizer.save_pretrained(out["gpt_neox"])
    return out
