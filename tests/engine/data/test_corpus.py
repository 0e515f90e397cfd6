"""The text data: the corpus's calibration and evaluation splits (wiki and a user's text file) and the token windows
cut from them."""

import pytest
import torch

from engine.data import corpus as data
from engine.data.corpus import DataError, load_corpus, split_tokens, windows


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
        out.append(next(s for s in cands if torch.equal(ids[s : s + w.numel()], w)))
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
    assert all(b - s >= w for s, b in zip(starts, starts[1:], strict=False))  # non-overlapping
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


@pytest.mark.parametrize(
    "tokens, window, split, message",
    [
        (0, 128, "calib", "token budget must be positive"),
        (-5, 128, "calib", "token budget must be positive"),
        (128, 0, "calib", "window length must be positive"),
        (128, 64, "train", "split must be one of"),
    ],
)
def test_bad_window_arguments(tokenizer, tmp_path, tokens, window, split, message):
    c = load_corpus(str(write_articles(tmp_path / "text.txt")))
    with pytest.raises(DataError, match=message):
        windows(c, tokenizer, tokens, window, split=split)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\n \t\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "looks binary"),
        ("caf\xe9 cr\xe8me".encode("latin-1"), "is not UTF-8"),
    ],
)
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
