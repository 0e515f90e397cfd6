"""Before/after: rotate a model, check it computes the same function, and capture both (engine of the Rotate page)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from torch import nn

from engine.capture import CaptureConfig, CaptureResult, capture_job
from engine.data import load_corpus, windows
from engine.events import Done, Metric, Progress
from engine.rotation import RotationConfig, equivalence, rotate


@dataclass
class Comparison:
    before: CaptureResult
    after: CaptureResult
    check: dict          # engine.rotation.equivalence figures
    rotation: RotationConfig
    rotated: nn.Module   # the rotated copy (the original stays in the handle)


def compare_job(handle, corpus_name: str, rot: RotationConfig, cap: CaptureConfig, check_tokens: int = 256,
                rotated: nn.Module | None = None, use_cache: bool = True):
    """Yield Progress for each stage (rotate, check, before, after), Metrics for the equivalence, then Done."""
    t0 = time.perf_counter()
    corpus = load_corpus(corpus_name)  # fail on a bad corpus before any work
    if rotated is None:
        yield Progress("rotate", 0, 1, 0.0, f"rotating ({rot.tag()})")
        rotated = rotate(handle.model, handle.arch, rot)
    yield Progress("rotate", 1, 1, time.perf_counter() - t0, "rotated")
    ids = windows(corpus, handle.tokenizer, check_tokens, min(check_tokens, handle.max_length), "eval")
    check = equivalence(handle.model, rotated, ids)
    for k in ("max_abs_logit_diff", "kl"):
        yield Metric(k, 0, check[k])
    results = {}
    for stage, model, tag in (("before", handle.model, "none"), ("after", rotated, rot.tag())):
        for ev in capture_job(handle, corpus_name, replace(cap, rotation=tag), use_cache=use_cache, model=model):
            if isinstance(ev, Progress):
                yield replace(ev, stage=stage, message=f"{stage}: {ev.message}")
            elif isinstance(ev, Done):
                results[stage] = ev.result
    yield Done(Comparison(results["before"], results["after"], check, rot, rotated),
               seconds=time.perf_counter() - t0)
