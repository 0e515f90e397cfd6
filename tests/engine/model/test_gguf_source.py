"""A .gguf file as a model source: converted once into the cache like the default model, with a note naming the
quantization it was dequantized from; a split GGUF's part not named as one and an architecture transformers cannot
read from GGUF are refused with the reason, before any conversion (split GGUFs: test_gguf_split.py)."""

import pytest
import torch
from gguf import GGUFWriter

from engine.model.loading import ModelLoadError, load_model
from tests.helpers import llama_from_state, tiny_llama_gguf


def write_gguf(path, arch: str, **extra):
    """A minimal GGUF: an architecture, one small f32 tensor, and any extra string/int keys."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for key, value in extra.items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_string(key, value)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_architecture_transformers_cannot_read_is_refused_with_the_reason(tmp_path, tmp_cache):
    path = write_gguf(tmp_path / "tiny-rwkv.gguf", "rwkv7")
    with pytest.raises(
        ModelLoadError,
        match="holds a 'rwkv7' model, an architecture transformers cannot read from GGUF \\(it reads .*llama.*qwen3",
    ):
        load_model(str(path))
    assert not list((tmp_cache / "models").glob("tiny-rwkv*"))  # nothing converted


def test_a_split_part_not_named_as_one_is_refused_with_how_to_merge_it(tmp_path):
    path = write_gguf(tmp_path / "model-part1.gguf", "llama", **{"split.count": 2, "split.no": 0})
    with pytest.raises(ModelLoadError, match="one part of a split GGUF \\(2 parts\\).*llama-gguf-split --merge"):
        load_model(str(path))


def test_a_gguf_file_by_path_is_converted_once_and_computes_the_model_it_holds(tmp_path, monkeypatch):
    """A tiny Llama written as llama.cpp writes a GGUF (Q4_1 linears, q/k rows in its rotary order): the path loads,
    converted into the cache under the file's name, with a note naming the quantization types, and computes what
    transformers computes from the same dequantized weights. (The default model's own GGUF goes the same way at
    every `make prepare`.)"""
    cache = tmp_path / "own_cache"
    (cache / "models").mkdir(parents=True)  # a cache of its own: this conversion must not land in cache/models/
    monkeypatch.setenv("SPINSCOPE_CACHE", str(cache))
    gguf, state = tiny_llama_gguf(tmp_path / "My-Tiny.Q4_1.gguf")
    handle = load_model(str(gguf))
    assert "dequantized to floating point from the file's quantization type" in handle.note and "Q4_1" in handle.note
    (converted,) = [p.name for p in (cache / "models").iterdir() if p.name.startswith("my-tiny.q4_1-")]
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))  # its vocabulary
    with torch.no_grad():
        assert torch.equal(handle.model(ids).logits, llama_from_state(state, gguf)(ids).logits)
    stamps = {p.name: p.stat().st_mtime_ns for p in (cache / "models" / converted).iterdir()}
    assert load_model(str(gguf)).fingerprint == handle.fingerprint  # once: the second load reads the conversion
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "models" / converted).iterdir()} == stamps
    assert [p.name for p in (cache / "models").iterdir() if p.name.startswith("my-tiny")] == [converted]
