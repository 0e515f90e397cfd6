"""Model loading (the default model, local directories, and every bad input) and the text data (splits, windows)."""
import math
import shutil

import pytest
import torch

from engine.data import corpus as data
from engine.data.corpus import DataError, load_corpus, split_tokens, windows
from engine.model.arch import UnsupportedArchitectureError
from engine.model.loading import ModelLoadError, load_model

# ---- models ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_is_smollm2_and_predicts_text(default_handle):
    h = default_handle
    assert (h.arch.name, h.arch.n_layers, h.arch.hidden, h.arch.n_heads, h.arch.n_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
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

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(path)
    return path


def test_a_class_that_is_no_causal_lm_is_refused(tmp_path):
    """Causal LMs outside the table load for capture (test_generic_capture.py); a masked LM is refused."""
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM is not supported.*LlamaForCausalLM"):
        load_model(str(bert_dir(tmp_path)))


@pytest.mark.parametrize("name, dtype, message", [("", "float32", "no model given"),
                                                  ("default", "int8", "dtype 'int8' is not supported")])
def test_bad_name_or_dtype(name, dtype, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name, dtype=dtype)


# ---- data ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_articles(path, n: int = 30):
    """A text file of n distinct ~1000-character paragraphs (pseudo-articles are ~4000 characters)."""
    paragraphs = [f"Paragraph {i}. " + " ".join(f"word{i}x{j}" for j in range(120)) for i in range(n)]
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.mark.slow
def test_wiki_splits_share_no_article():
    c = load_corpus(data.WIKI)
    calib, evaluation = c.splits["calib"], c.splits["eval"]
    assert len(calib) > 50 and len(evaluation) > 10
    assert not set(calib) & set(evaluation)
    assert len(calib) + len(evaluation) == len(set(calib) | set(evaluation))  # no article lost or repeated
    assert "WikiText-2 substitute" in c.label
    assert not any("[[" in a or "{{" in a for a in calib + evaluation)  # wiki markup removed


def test_text_file_splits_share_no_article(tmp_path):
    c = load_corpus(str(write_articles(tmp_path / "text.txt")))
    assert c.splits["calib"] and c.splits["eval"]
    assert not set(c.splits["calib"]) & set(c.splits["eval"])
    short = load_corpus(str(write_articles(tmp_path / "short.txt", n=2)))
    assert short.splits["calib"] == short.splits["eval"] and "calibration = evaluation" in short.label


def test_an_edited_text_file_is_read_again(tmp_path):
    path = write_articles(tmp_path / "text.txt", n=30)
    first = load_corpus(str(path))
    assert load_corpus(str(path)) is first  # memoised while the file is unchanged
    write_articles(path, n=40)
    again = load_corpus(str(path))
    assert again.fingerprint != first.fingerprint
    def size(c):
        return len(c.splits["calib"]) + len(c.splits["eval"])

    assert size(again) > size(first)


@pytest.mark.slow
def test_windows_are_deterministic_and_consecutive(tokenizer, monkeypatch):
    c = load_corpus(data.WIKI)
    first = windows(c, tokenizer, 1024, 256)
    assert first.shape == (4, 256)
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})  # tokenized afresh: same windows
    assert torch.equal(windows(c, tokenizer, 1024, 256), first)
    ids = split_tokens(c, tokenizer, "calib")
    assert torch.equal(first.flatten(), ids[:1024])
    assert not torch.equal(windows(c, tokenizer, 1024, 256, split="eval"), first)


def _starts(ids: torch.Tensor, wins: torch.Tensor) -> list[int]:
    """Where each window sits in the token stream (first match)."""
    out = []
    for w in wins:
        cands = torch.nonzero(ids[: ids.numel() - w.numel() + 1] == w[0]).flatten().tolist()
        out.append(next(s for s in cands if torch.equal(ids[s:s + w.numel()], w)))
    return out


def test_seeded_random_windows_are_reproducible_and_disjoint(tokenizer, tmp_path):
    c = load_corpus(str(write_articles(tmp_path / "text.txt", n=60)))
    w = 64
    a = windows(c, tokenizer, 640, w, seed=3)
    assert a.shape == (10, w)
    assert torch.equal(windows(c, tokenizer, 640, w, seed=3), a)
    assert not torch.equal(windows(c, tokenizer, 640, w, seed=4), a)
    ids = split_tokens(c, tokenizer, "calib")
    starts = sorted(_starts(ids, a))
    assert all(b - s >= w for s, b in zip(starts, starts[1:]))  # non-overlapping
    assert starts != [i * w for i in range(10)]  # not simply the first windows


def test_window_longer_than_budget_is_shortened(tokenizer, tmp_path):
    c = load_corpus(str(write_articles(tmp_path / "text.txt")))
    assert windows(c, tokenizer, 100, 512).shape == (1, 100)


def test_budget_beyond_the_corpus_names_the_largest_that_fits(tokenizer, tmp_path):
    c = load_corpus(str(write_articles(tmp_path / "text.txt")))
    with pytest.raises(DataError, match=r"token budget 1000000 exceeds .* choose at most (\d+)") as e:
        windows(c, tokenizer, 1_000_000, 128)
    largest = int(str(e.value).rsplit(" ", 1)[-1])
    assert windows(c, tokenizer, largest, 128).numel() == largest  # the suggestion works


@pytest.mark.parametrize("tokens, window, split, message", [
    (0, 128, "calib", "token budget must be positive"),
    (-5, 128, "calib", "token budget must be positive"),
    (128, 0, "calib", "window length must be positive"),
    (128, 64, "train", "split must be one of"),
])
def test_bad_window_arguments(tokenizer, tmp_path, tokens, window, split, message):
    c = load_corpus(str(write_articles(tmp_path / "text.txt")))
    with pytest.raises(DataError, match=message):
        windows(c, tokenizer, tokens, window, split=split)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n \t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "looks binary"),
    ("caf\xe9 cr\xe8me".encode("latin-1"), "is not UTF-8"),
])
def test_unusable_text_files(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(str(f))


def test_missing_corpus_and_incomplete_wikitext_dir(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "wiki.train.tokens").write_text("some text")
    with pytest.raises(DataError, match="missing wiki.test.tokens"):
        load_corpus(str(tmp_path))


def test_wikitext_directory_uses_train_and_test(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = Train = \n\n train text here \n")
    (tmp_path / "wiki.test.tokens").write_text(" = Test = \n\n test text here \n")
    c = load_corpus(str(tmp_path))
    assert "train text" in c.splits["calib"][0] and "test text" in c.splits["eval"][0]
    assert "WikiText-2" in c.label
