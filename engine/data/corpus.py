"""Text corpora and deterministic token windows.

The default corpus is the Wikipedia sample shipped in gensim's test data (107 real articles), a stand-in for
WikiText-2, which ships in no package. Calibration and evaluation splits are made of whole articles, so they
never share one. A user's own text file, or a local WikiText-2 directory, works the same way.
"""

from __future__ import annotations

import bz2
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.assets import package_path

WIKI = "wiki"
WIKI_LABEL = "Wikipedia sample from gensim's test data (a WikiText-2 substitute: 106 articles, markup removed)"
_GENSIM_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKITEXT_FILES = {"calib": "wiki.train.tokens", "eval": "wiki.test.tokens"}
SPLITS = ("calib", "eval")
EVAL_EVERY = 5  # every 5th article goes to the evaluation split


class DataError(ValueError):
    """Unusable text or token budget, with a message meant for the user."""


@dataclass(frozen=True)
class Corpus:
    name: str  # "wiki", a text file path, or a WikiText-2 directory
    label: str  # what the UI shows
    splits: dict  # split -> tuple of article texts

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in SPLITS:
            for a in self.splits[s]:
                h.update(a.encode())
        return h.hexdigest()[:16]


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", lambda m: f"{m.group(1)} {m.group(2)} {m.group(1)}", text, flags=re.M)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _split_articles(articles: list[str]) -> dict:
    return {
        "calib": tuple(a for i, a in enumerate(articles) if i % EVAL_EVERY != EVAL_EVERY - 1),
        "eval": tuple(a for i, a in enumerate(articles) if i % EVAL_EVERY == EVAL_EVERY - 1),
    }


@lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    path = package_path("gensim", _GENSIM_FILE, DataError)
    out = []
    with bz2.open(path) as f:
        for _title, text, _pid in extract_pages(f):
            clean = _clean_wiki(text)
            if len(clean) >= 200 and not clean.lower().startswith("#redirect"):
                out.append(clean)
    return tuple(out)


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"text file {path} is empty")
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _file_articles(text: str, chunk_chars: int = 4000) -> list[str]:
    """A plain file has no article boundaries: paragraphs grouped into ~4000-character pseudo-articles."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    articles, cur = [], ""
    for p in paragraphs:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= chunk_chars:
            articles.append(cur)
            cur = ""
    if cur:
        articles.append(cur)
    return articles


def load_corpus(name: str = WIKI) -> Corpus:
    """The corpus `name` ("wiki", a UTF-8 text file, or a WikiText-2 directory); memoised until its files change."""
    return _load_corpus(name, _file_stamp(name))


def _file_stamp(name: str) -> tuple:
    """(path, size, mtime) of the file or of the directory's WikiText files: an edited file is read again."""
    if name == WIKI:
        return ()
    path = Path(name).expanduser()
    files = [path / f for f in _WIKITEXT_FILES.values()] if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=4)
def _load_corpus(name: str, stamp: tuple) -> Corpus:
    del stamp  # part of the memo key only
    if name == WIKI:
        return Corpus(WIKI, WIKI_LABEL, _split_articles(list(_wiki_articles())))
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"corpus {name!r} not found: use 'wiki', a UTF-8 text file, or a WikiText-2 directory")
    if path.is_dir():
        files = {s: path / f for s, f in _WIKITEXT_FILES.items()}
        missing = [str(f.name) for f in files.values() if not f.is_file()]
        if missing:
            raise DataError(f"directory {path} is not WikiText-2: missing {', '.join(missing)}")
        splits = {s: (_read_text_file(f),) for s, f in files.items()}
        return Corpus(str(path), f"WikiText-2 from {path} (train for calibration, test for evaluation)", splits)
    articles = _file_articles(_read_text_file(path))
    if len(articles) < 2:
        # Too short to split by article: the same text serves both splits, and the label says so.
        return Corpus(
            str(path),
            f"text file {path.name} (too short to split: calibration = evaluation)",
            {"calib": tuple(articles), "eval": tuple(articles)},
        )
    return Corpus(str(path), f"text file {path.name}", _split_articles(articles))


_TOKEN_CACHE: dict = {}


def split_tokens(corpus: Corpus, tokenizer, split: str) -> torch.Tensor:
    """All tokens of a split, articles joined by blank lines; memoised per (corpus, tokenizer, split)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    key = (corpus.fingerprint, getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), split)
    if key not in _TOKEN_CACHE:
        ids = tokenizer("\n\n".join(corpus.splits[split]), add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def windows(
    corpus: Corpus, tokenizer, tokens: int, window: int, split: str = "calib", seed: int | None = None
) -> torch.Tensor:
    """[n_windows, window] token ids covering `tokens` tokens: consecutive from the start, or at seeded random
    non-overlapping positions when `seed` is given (calibration sampling)."""
    if tokens <= 0:
        raise DataError(f"token budget must be positive, got {tokens}")
    if window <= 0:
        raise DataError(f"window length must be positive, got {window}")
    window = min(window, tokens)
    ids = split_tokens(corpus, tokenizer, split)
    n = tokens // window
    if n * window > ids.numel():
        raise DataError(
            f"token budget {tokens} exceeds the {split} split of {corpus.label}: it has {ids.numel()} tokens; "
            f"choose at most {ids.numel() // window * window}"
        )
    slots = ids.numel() // window
    if seed is None:
        starts = torch.arange(n) * window
    else:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randperm(slots, generator=g)[:n].sort().values * window
    return torch.stack([ids[s : s + window] for s in starts.tolist()])
