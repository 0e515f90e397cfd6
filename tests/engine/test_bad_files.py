"""Every file a user can give, when it is the wrong file, is refused in one sentence saying what was expected and
what was found; never a library's internal advice (torch's suggests the unsafe weights_only=False)."""

import pickle

import pytest
import torch

from engine.data.corpus import load_corpus
from engine.model.loading import ModelLoadError, default_gguf_path, load_model
from engine.rotation.files import load_rotation_file

EXPECTED_ROTATION = "expected a torch.save'd dict of tensors in SpinQuant's layout"


class Opaque:  # an object torch refuses to unpickle with weights_only=True
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the plain pickle written here
@pytest.mark.parametrize(
    "content, found",
    [
        (b"not a torch file", "a file of 16 bytes that torch cannot read"),
        ("pickle", "a file of"),
        ("objects", "a torch file holding objects other than tensors"),
        ("list", "found list"),
        ("strings", "found a dict with non-tensor values"),
    ],
)
def test_a_file_that_is_not_a_rotation_file(tmp_path, content, found):
    path = tmp_path / "R.bin"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"R1": [1, 2]}))
    elif content == "objects":
        torch.save({"R1": Opaque()}, path)
    elif content == "list":
        torch.save([torch.eye(2)], path)
    elif content == "strings":
        torch.save({"R1": "identity"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_rotation_file(str(path))
    message = str(info.value)
    assert message.startswith(f"{path} is not a rotation file: {EXPECTED_ROTATION}") and found in message
    assert "weights_only" not in message and "\n" not in message


def test_a_missing_rotation_file(tmp_path):
    with pytest.raises(ValueError, match=f"rotation file {tmp_path}/none.bin not found: {EXPECTED_ROTATION}"):
        load_rotation_file(str(tmp_path / "none.bin"))


def test_a_gguf_that_is_not_one(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(
        ModelLoadError,
        match="model.gguf is not a GGUF file: expected it to start with b'GGUF', found b'PK\\\\x03\\\\x04'",
    ):
        load_model(str(path))


def test_a_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(default_gguf_path().read_bytes()[:200])
    with pytest.raises(
        ModelLoadError, match="cut.gguf is a damaged GGUF file: its header is readable only in part \\(200 bytes\\)"
    ):
        load_model(str(path))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\x00\x01binary"), "looks binary (it contains NUL bytes); give a UTF-8 text file"),
        (lambda p: p.write_bytes("caf\u00e9".encode("latin-1") * 10), "is not UTF-8 text"),
    ],
)
def test_a_corpus_that_is_not_text(tmp_path, make, message):
    path = tmp_path / "corpus.txt"
    make(path)
    with pytest.raises(ValueError) as info:
        load_corpus(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_model_path_that_is_neither_a_directory_nor_a_gguf(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory .* nor a .gguf file"):
        load_model(str(path))
