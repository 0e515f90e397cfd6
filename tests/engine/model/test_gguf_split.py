"""Split GGUF files (llama.cpp's NAME-0000k-of-0000N.gguf parts, written here by the gguf package's own splitting
writer): the path of the first part loads, its parts merged once into one GGUF in the cache, and computes the whole
file's model; a missing part or a later part's path is refused in one sentence."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from engine.model.gguf_split import merge_parts, split_parts
from engine.model.loading import ModelLoadError, load_model
from tests.helpers import llama_from_state, tiny_llama_gguf


def split_copy(src, dest, max_tensors: int) -> list:
    """Write src's keys and tensors as a split GGUF named after dest (dest-00001-of-0000N.gguf, ...)."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dest, reader.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name != "general.architecture" and not field.name.startswith("GGUF."):
            vtype = field.types[0]
            writer.add_key_value(
                field.name, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None
            )
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return sorted(dest.parent.glob(f"{dest.stem}-*-of-*.gguf"))


def tiny_split(tmp_path) -> tuple[dict, list]:
    """A 3-tensor GGUF (two f32, one raw Q8_0) split into parts of 2 and 1 tensors; returns (tensors, parts)."""
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((4, 8), dtype=np.float32),
        "b.weight": rng.standard_normal((2, 32), dtype=np.float32),
        "c.weight": rng.integers(0, 255, (2, 34), dtype=np.uint8),
    }  # two Q8_0 blocks of 32 values per row
    w = GGUFWriter(tmp_path / "whole.gguf", "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for name, data in tensors.items():
        w.add_tensor(name, data, raw_dtype=GGMLQuantizationType.Q8_0 if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors, split_copy(tmp_path / "whole.gguf", tmp_path / "tiny.gguf", max_tensors=2)


def test_merging_the_parts_gives_back_every_tensor_and_key_without_the_split_keys(tmp_path):
    tensors, parts = tiny_split(tmp_path)
    assert [p.name for p in parts] == ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    assert len(GGUFReader(parts[1]).tensors) == 1 and int(GGUFReader(parts[0]).fields["split.count"].contents()) == 2
    assert split_parts(parts[0]) == parts and split_parts(tmp_path / "whole.gguf") is None
    merged = GGUFReader(merge_parts(parts, tmp_path / "merged.gguf"))
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed
    assert {t.name: bytes(np.asarray(t.data).tobytes()) for t in merged.tensors} == {
        n: d.tobytes() for n, d in tensors.items()
    }
    assert next(t for t in merged.tensors if t.name == "c.weight").tensor_type == GGMLQuantizationType.Q8_0
    assert merged.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert merged.fields["llama.block_count"].contents() == 1
    assert not any(k.startswith("split.") for k in merged.fields)


def test_a_missing_part_or_a_later_parts_path_is_refused_in_one_sentence(tmp_path):
    _, parts = tiny_split(tmp_path)
    with pytest.raises(
        ModelLoadError,
        match="^tiny-00002-of-00002.gguf is part 2 of a split GGUF of 2 parts; give "
        "the path of its first part, tiny-00001-of-00002.gguf$",
    ):
        load_model(str(parts[1]))
    parts[1].unlink()
    with pytest.raises(
        ModelLoadError,
        match="^tiny-00001-of-00002.gguf is the first part of a split GGUF of 2 "
        "parts, but tiny-00002-of-00002.gguf is missing from .*$",
    ):
        load_model(str(parts[0]))


def test_a_gguf_split_in_two_loads_by_its_first_part_and_computes_the_whole_files_model(tmp_path, monkeypatch):
    """A tiny Llama GGUF (tests/helpers.py: written as llama.cpp writes one) split by the gguf package's own writer:
    its first part loads, merged once into the cache, and computes what transformers computes from the weights."""
    cache = tmp_path / "own_cache"
    (cache / "models").mkdir(parents=True)  # a cache of its own: this conversion must not land in cache/models/
    monkeypatch.setenv("SPINSCOPE_CACHE", str(cache))
    whole, state = tiny_llama_gguf(tmp_path / "tiny.gguf")
    n = len(GGUFReader(whole).tensors)
    (tmp_path / "parts").mkdir()
    parts = split_copy(whole, tmp_path / "parts" / "tiny.gguf", max_tensors=(n + 1) // 2)
    assert len(parts) == 2
    handle = load_model(str(parts[0]))
    assert "tiny-00001-of-00002.gguf (2 parts, merged)" in handle.note and "Q4_1" in handle.note
    assert len(list((cache / "models" / "gguf-merged").glob("tiny-*.gguf"))) == 1
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))  # its vocabulary
    with torch.no_grad():
        assert torch.equal(handle.model(ids).logits, llama_from_state(state, whole)(ids).logits)
