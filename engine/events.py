"""Events that long jobs yield. Pages, the CLI and tests consume the same stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """`done` of `total` units of `stage` finished after `seconds`; `partial` holds results so far, if any."""

    stage: str
    done: int
    total: int
    seconds: float
    message: str = ""
    partial: Any = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class Metric:
    """A named scalar at a step (loss, learning rate, perplexity...)."""

    name: str
    step: int
    value: float
    extra: dict = field(default_factory=dict)


@dataclass
class Done:
    """The job's result; `cached` is True when it came from cache/ without recomputation."""

    result: Any
    seconds: float = 0.0
    cached: bool = False


def run_to_end(events):
    """Drain a job generator and return its Done.result (for scripts and tests)."""
    last = None
    for ev in events:
        if isinstance(ev, Done):
            last = ev
    if last is None:
        raise RuntimeError("job ended without a result (stopped?)")
    return last.result
