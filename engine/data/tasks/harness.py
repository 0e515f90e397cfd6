"""Zero-shot accuracy through lm-eval, fully offline, on the local JSONL tasks of `engine.data.tasks.sources`.

Each of our tasks is a generated lm-eval YAML that `include`s lm-eval's own definition of the task (so its
prompt, target, choices, process_docs and metrics are lm-eval's, unchanged) and only swaps the data source for
the local JSONL file. Tasks are named "spinscope_<name>" so they never clash with lm-eval's built-in ones.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from engine.data.tasks.sources import TASK_SOURCES, TASKS, ensure_jsonl, force_offline, jsonl_path, source, tasks_dir
from engine.events import Done, Progress

TASK_PREFIX = "spinscope_"
DEFAULT_SEED = 1234  # lm-eval's own default for numpy / torch / few-shot seeds
STAGE = "zero-shot"
# lm-eval's metric keys are "<metric>,<filter>"; multiple-choice and loglikelihood tasks use the "none" filter.
REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


def lm_eval_task_name(name: str) -> str:
    return TASK_PREFIX + source(name).name


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def task_config(name: str) -> dict:
    """The lm-eval YAML (as a dict) for one local task: lm-eval's definition, with our JSONL as its only split."""
    src = source(name)
    split = src.split
    return {
        "include": str(_lm_eval_tasks_dir() / src.lm_eval_yaml),
        "task": lm_eval_task_name(name),
        "tag": ["spinscope"],  # replaces lm-eval's tags (ai2_arc, lambada, ...), which name its own task sets
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(jsonl_path(name))},
            "cache_dir": str(tasks_dir() / ".hf-datasets"),
        },
        "training_split": None,  # zero-shot: no few-shot pool, so no training split is needed
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }


def write_task_yamls() -> Path:
    """Write every task's YAML (only when its content changed) and return the folder for TaskManager."""
    import yaml

    folder = tasks_dir() / "lm_eval"
    folder.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        text = yaml.safe_dump(task_config(name), sort_keys=False)
        path = folder / f"{lm_eval_task_name(name)}.yaml"
        if path.is_file() and path.read_text() == text:
            continue
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return folder


def check_request(tasks: list[str], limit: int | None) -> list[str]:
    """Validate the task list and document limit; return the task names without duplicates, in order."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(
            f"tasks must be a non-empty list of task names, e.g. ['piqa', 'arc_easy']; known tasks: {', '.join(TASKS)}"
        )
    unknown = [t for t in tasks if t not in TASK_SOURCES]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive number of documents per task, or None for all; got {limit!r}")
    return list(dict.fromkeys(tasks))


def _summary(results: dict, name: str) -> dict:
    key = lm_eval_task_name(name)
    metrics = results["results"][key]
    row = {m: float(metrics[f"{m},none"]) for m in REPORTED_METRICS if f"{m},none" in metrics}
    row["n"] = int(results["n-samples"][key]["effective"])
    row["split"] = source(name).split
    return row


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    batch_size: int = 8,
    device: str | None = None,
    seed: int = DEFAULT_SEED,
) -> Iterator[Progress | Done]:
    """Score `model` on local zero-shot tasks with lm-eval; yield Progress after each task, then Done(result).

    result: {task: {"acc", "acc_norm" (where lm-eval reports it), "perplexity" (LAMBADA), "n", "split"}}.
    `limit` takes the first `limit` documents of each task (None: all). `device`, when given, moves the model
    there; otherwise it stays where it is. Hugging Face libraries are switched offline for the whole process.
    """
    names = check_request(tasks, limit)
    if tokenizer is None:
        raise ValueError("a tokenizer is required: lm-eval would otherwise try to fetch one from the hub")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    force_offline()
    start = time.perf_counter()
    yield Progress(STAGE, 0, len(names), 0.0, message=f"preparing {', '.join(names)}", partial={})

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in names:
        ensure_jsonl(name)
    manager = TaskManager(include_path=str(write_task_yamls()), include_defaults=False)
    if device is not None:
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    done: dict[str, dict] = {}
    for i, name in enumerate(names):
        out = simple_evaluate(
            model=lm,
            tasks=[lm_eval_task_name(name)],
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        done[name] = _summary(out, name)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in done[name].items() if k in REPORTED_METRICS)
        yield Progress(
            STAGE,
            i + 1,
            len(names),
            time.perf_counter() - start,
            message=f"{name}: {shown} on {done[name]['n']} docs",
            partial=dict(done),
        )
    yield Done(done, seconds=time.perf_counter() - start)
