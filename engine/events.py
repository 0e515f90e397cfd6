"""Events that long jobs yield. Pages, the CLI and tests consume the same stream.

A job is a generator of Progress and Metric events that ends with one Done (its result). A job that runs another
composes with `x = yield from result_of(other_job(...))` (or done_of, for the whole Done): the other job's events
go on to the consumer, its Done comes back as the value.
"""

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
    overall: float | None = None  # the whole job's fraction done, when this stage is one phase of several
    eta: float | None = None  # seconds left for the whole job (an estimate), once one phase is done

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def job_fraction(self) -> float:
        """What one bar for the whole job shows: `overall` when known, else this stage's fraction."""
        return self.overall if self.overall is not None else self.fraction

    def status(self) -> str:
        """'<message> (12.3 s, about 40 s left)'."""
        left = f", about {self.eta:.0f} s left" if self.eta is not None else ""
        return f"{self.message} ({self.seconds:.1f} s{left})"


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


def done_of(job, each=None):
    """Compose jobs: `done = yield from done_of(sub_job(...))` hands the sub-job's events on to whoever drains
    the caller and returns the sub-job's Done (its result, seconds and `cached`). The sub-job's Done itself is not
    handed on: a job's stream ends with its own Done, which front ends take as the result. `each` maps every
    other event before it is handed on (returning None drops it). Closing the caller (Stop) closes the sub-job
    at once, so its `finally` blocks run before the caller's."""
    done = None
    try:
        for ev in job:
            if isinstance(ev, Done):
                done = ev
                continue
            if each is not None:
                ev = each(ev)
            if ev is not None:
                yield ev
    finally:
        close = getattr(job, "close", None)
        if close is not None:
            close()
    if done is None:
        raise RuntimeError("a sub-job ended without a result")
    return done


def result_of(job, each=None):
    """`x = yield from result_of(sub_job(...))`: done_of's Done.result, for the callers that need only that."""
    return (yield from done_of(job, each)).result


def run_to_end(events):
    """Drain a job generator and return its Done.result (for scripts and tests)."""
    last = None
    for ev in events:
        if isinstance(ev, Done):
            last = ev
    if last is None:
        raise RuntimeError("job ended without a result (stopped?)")
    return last.result


class Cancelled(Exception):
    """Raised inside a background computation whose job was closed (Stop), to end it at the next check."""


def ticking(fn, tick, every: float = 0.5):
    """Generator: run fn(cancel) in a worker thread and yield tick() (a Progress) every `every` seconds until it
    returns; then Done(its result). For one long call (a forward pass over a window) that would otherwise leave
    the job silent for seconds. fn should check `cancel.is_set()` (e.g. in a per-layer hook) and raise Cancelled:
    closing this generator (Stop, Ctrl-C) sets it and waits for the thread, so no work goes on after the stop.
    Autograd and dtype modes are per thread: fn sets its own (e.g. torch.no_grad())."""
    import threading

    cancel, out = threading.Event(), {}

    def work():
        try:
            out["result"] = fn(cancel)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread below
            out["error"] = e

    worker = threading.Thread(target=work, daemon=True, name="spinscope-job")
    worker.start()
    try:
        while True:
            worker.join(every)
            if not worker.is_alive():
                break
            yield tick()
    finally:
        cancel.set()
        worker.join()
    if "error" in out:
        raise out["error"]
    yield Done(out["result"])
