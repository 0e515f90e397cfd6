"""Before/after: rotate a model, check it computes the same function, and capture both (engine of the Rotate page)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

from torch import nn

from engine import store
from engine.data.corpus import load_corpus, windows
from engine.events import Done, Metric, Progress, result_of
from engine.observe.capture import CaptureConfig, CaptureResult, cache_key, capture_job, load_cached
from engine.rotation.fusion import RotationConfig, equivalence, logits, rotate_job


@dataclass
class Comparison:
    before: CaptureResult
    after: CaptureResult
    check: dict  # engine.rotation.fusion.equivalence figures
    rotation: RotationConfig
    rotated: nn.Module | None  # the rotated copy (None for a dispatched model, rotated in place and reloaded, and
    # for a comparison answered from the cache)


def check_key(handle, corpus, rot: RotationConfig, check_tokens: int) -> str:
    """The cache key of a rotation's equivalence figures (a rotation file by its content)."""
    return store.make_key(
        kind="rotate-check",
        model=handle.fingerprint,
        corpus=corpus.fingerprint,
        rotation=rot.key(),
        tokens=check_tokens,
    )


def cached_comparison(
    handle, corpus, rot: RotationConfig, cap: CaptureConfig, tag: str, check_tokens: int
) -> Comparison | None:
    """The whole comparison from cache/ when both captures and the check are there (nothing is rotated)."""
    check = store.load("rotate", check_key(handle, corpus, rot, check_tokens))
    if check is None:
        return None
    before, after = (
        load_cached(cache_key(handle.fingerprint, corpus.fingerprint, replace(cap, rotation=t))) for t in ("none", tag)
    )
    if before is None or after is None:
        return None
    return Comparison(before, after, check[0], rot, None)


def compare_job(
    handle,
    corpus_name: str,
    rot: RotationConfig,
    cap: CaptureConfig,
    check_tokens: int = 256,
    rotated: nn.Module | None = None,
    use_cache: bool = True,
):
    """Yield Progress for each stage (before, rotate, after), Metrics for the equivalence, then Done.

    The original is captured and its reference logits kept first, so a dispatched model (which may not fit twice)
    can be rotated in place inside handle.working_model() and reloaded afterwards. An identical rerun is answered
    from the cache (both captures and the equivalence figures) without rotating anything."""
    if rot.active:
        handle.arch.check_rotatable()  # before the "before" capture
    t0 = time.perf_counter()
    corpus = load_corpus(corpus_name)  # fail on a bad corpus before any work
    ids = windows(corpus, handle.tokenizer, check_tokens, min(check_tokens, handle.max_length), "eval")
    tag = rot.tag()  # once: a rotation file's tag reads and hashes the file
    if use_cache and (hit := cached_comparison(handle, corpus, rot, cap, tag, check_tokens)) is not None:
        yield Done(hit, seconds=time.perf_counter() - t0, cached=True)
        return

    def capture(stage, model, tag):
        """Sub-job: capture_job's result; its Progress is named after `stage`, and nothing else is handed on."""
        job = capture_job(handle, corpus_name, replace(cap, rotation=tag), use_cache=use_cache, model=model)
        return result_of(
            job,
            lambda ev: replace(ev, stage=stage, message=f"{stage}: {ev.message}") if isinstance(ev, Progress) else None,
        )

    before = yield from capture("before", handle.model, "none")
    reference = logits(handle.model, ids)
    with contextlib.ExitStack() as stack:
        if rotated is None:
            rotated = yield from result_of(
                rotate_job(stack.enter_context(handle.working_model()), handle.arch, rot, inplace=True),
                lambda ev: replace(ev, message=f"rotating ({tag}): {ev.message}"),
            )
        yield Progress("rotate", 1, 1, time.perf_counter() - t0, "rotated")
        check = equivalence(None, rotated, ids, reference=reference)
        if use_cache:
            store.save_json("rotate", check_key(handle, corpus, rot, check_tokens), check)
        for k in ("max_abs_logit_diff", "kl"):
            yield Metric(k, 0, check[k])
        after = yield from capture("after", rotated, tag)
        if handle.dispatched:
            rotated = None
    yield Done(Comparison(before, after, check, rot, rotated), seconds=time.perf_counter() - t0)
