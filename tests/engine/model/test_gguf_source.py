"""A .gguf file as a model source: converted once into the cache like the default model, with a note naming the
quantization it was dequantized from; a split GGUF's part not named as one and an architecture transformers cannot
read from GGUF are refused with the reason, before any conversion (split GGUFs: test_gguf_split.py)."""
import shutil

import pytest
import torch
from gguf import GGUFWriter

from engine.model.loading import ModelLoadError, default_gguf_path, load_model


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
    with pytest.raises(ModelLoadError, match="holds a 'rwkv7' model, an architecture transformers cannot read from "
                                             "GGUF \\(it reads .*llama.*qwen3"):
        load_model(str(path))
    assert not list((tmp_cache / "models").glob("tiny-rwkv*"))  # nothing converted


def test_a_split_part_not_named_as_one_is_refused_with_how_to_merge_it(tmp_path):
    path = write_gguf(tmp_path / "model-part1.gguf", "llama", **{"split.count": 2, "split.no": 0})
    with pytest.raises(ModelLoadError, match="one part of a split GGUF \\(2 parts\\).*llama-gguf-split --merge"):
        load_model(str(path))


@pytest.mark.slow
def test_the_default_models_own_gguf_by_path_gives_the_default_models_logits(tmp_path, monkeypatch,
                                                                           default_handle):
    cache = tmp_path / "own_cache"
    (cache / "models").mkdir(parents=True)  # a cache of its own: this conversion must not land in cache/models/
    monkeypatch.setenv("SPINSCOPE_CACHE", str(cache))
    gguf = shutil.copy(default_gguf_path(), tmp_path / "my-smollm2.Q4_1.gguf")
    handle = load_model(str(gguf))
    assert "dequantized to floating point from the file's quantization type" in handle.note and "Q4_1" in handle.note
    assert [p.name for p in (cache / "models").iterdir()][0].startswith("my-smollm2.q4_1-")
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(handle.model(ids).logits, default_handle.model(ids).logits)
