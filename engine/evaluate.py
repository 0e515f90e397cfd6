"""Evaluate a recipe at a bit setting: build the model (rotate, quantize), perplexity, optional zero-shot tasks.

Every run is saved under cache/eval/ keyed by everything that determines it; the same run again is a cache hit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine import store
from engine.data.corpus import load_corpus, windows
from engine.events import Cancelled, Done, Progress, done_of, result_of, ticking
from engine.model import dispatch
from engine.quant.apply import needs_calibration, quantize_model
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import Bits, Recipe, get_recipe
from engine.rotation.fusion import rotate_job

CODE_VERSION = "eval-3"  # bump when a change alters evaluation numbers: old cache entries stop matching
# eval-2: asymmetric quantizers in compressed-tensors' order, dense Hadamards as (x @ M) / sqrt(n)
# eval-3: a ClipPolicy in the recipe's key; calibrated clips kept only where the end-to-end check keeps them


@dataclass(frozen=True)
class EvalConfig:
    tokens: int = 16384  # evaluation-split tokens for perplexity
    window: int = 2048  # perplexity window (or the model's limit)
    tasks: tuple = ()  # zero-shot task names (engine.data.tasks)
    limit: int | None = 200  # documents per task
    seed: int = 0
    calib_tokens: int = 8192  # GPTQ calibration tokens (calibration split)
    calib_window: int = 512
    corpus: str = "wiki"

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"token budget must be positive, got {self.tokens}")
        # a window of one token predicts nothing (perplexity would divide by zero)
        if self.tokens < 2 or self.window < 2:
            raise ValueError(
                f"perplexity needs windows of at least 2 tokens; got a token budget of {self.tokens} "
                f"and a window of {self.window}"
            )
        if self.calib_tokens <= 0 or self.calib_window <= 0:
            raise ValueError(
                f"GPTQ calibration tokens and window must be positive, got {self.calib_tokens} and {self.calib_window}"
            )
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"task document limit must be positive, got {self.limit}")
        if self.tasks:  # refuse an unknown task now, not after minutes of perplexity
            from engine.data.tasks import check_request

            check_request(list(self.tasks), self.limit)


def perplexity(model: nn.Module, wins: torch.Tensor, batch: int = 1, layers: list[nn.Module] | None = None):
    """Generator over windows [N, T]: Progress per batch, then Done(ppl). Next-token NLL over each window.

    With the model's decoder `layers`, each forward runs in a worker thread and reports as it passes layers (a
    1024-token window takes seconds on a CPU), and a Stop ends it at the next layer."""
    device = dispatch.input_device(model)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    n, per = wins.shape[0], len(layers or [None])
    for s in range(0, n, batch):
        ids = wins[s : s + batch].to(device)
        if layers:
            passed = [0]

            def forward(cancel, ids=ids, passed=passed):
                def check(module, args):
                    if cancel.is_set():
                        raise Cancelled
                    passed[0] += 1

                hooks = [layer.register_forward_pre_hook(check) for layer in layers]
                try:
                    with torch.no_grad():
                        return model(ids, use_cache=False).logits[:, :-1].float()
                finally:
                    for h in hooks:
                        h.remove()

            def tick(s=s, passed=passed):  # progress counted in layers passed: n windows x L layers
                k = min(passed[0], per)
                return Progress(
                    "perplexity", s * per + k, n * per, time.perf_counter() - t0, f"window {s + 1}/{n}, layer {k}/{per}"
                )

            logits = yield from result_of(ticking(forward, tick))
        else:
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits[:, :-1].float()
        with torch.no_grad():
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
        count += ids[:, 1:].numel()
        yield Progress(
            "perplexity",
            min(s + batch, n) * per,
            n * per,
            time.perf_counter() - t0,
            f"window {min(s + batch, n)}/{n}: ppl so far {math.exp(nll / count):.2f}",
        )
    yield Done(math.exp(nll / count), seconds=time.perf_counter() - t0)


def build_model(handle, model: nn.Module, recipe: Recipe, bits: Bits, cfg: EvalConfig, seed: int):
    """Generator: rotate and fake-quantize `model` (a handle.working_model()) in place; Done((model, clip plan))."""
    t0 = time.perf_counter()
    rot = replace(recipe.rotation, seed=seed)
    calib = None
    if needs_calibration(recipe, bits) or rot.permutes:  # tokenizing the split the first time takes seconds
        yield Progress("calibrate", 0, 1, time.perf_counter() - t0, "tokenizing the calibration split")
        calib = yield from result_of(
            ticking(
                lambda cancel: windows(
                    load_corpus(cfg.corpus), handle.tokenizer, cfg.calib_tokens, cfg.calib_window, "calib", seed=seed
                ),
                lambda: Progress("calibrate", 0, 1, time.perf_counter() - t0, "tokenizing the calibration split"),
            )
        )
    if rot.active:
        model = yield from result_of(rotate_job(model, handle.arch, rot, inplace=True, calib=calib))
    plan = yield from quantize_model(model, handle.arch, bits, recipe, calib)
    yield Done((model, plan), seconds=time.perf_counter() - t0)


def run_key(handle, recipe: Recipe, bits: Bits, cfg: EvalConfig) -> str:
    """The cache key of one run; a recipe that does not quantize keys on 16-16-16 whatever bits were asked for,
    since they change nothing (so the fp row is computed once for a sweep over bits)."""
    corpus = load_corpus(cfg.corpus)
    bits = bits if recipe.quantize else Bits()
    return store.make_key(
        kind="eval",
        model=handle.fingerprint,
        recipe=recipe.key(),
        bits=str(bits),
        corpus=corpus.fingerprint,
        tokens=cfg.tokens,
        window=cfg.window,
        tasks=list(cfg.tasks),
        limit=cfg.limit,
        seed=cfg.seed,
        calib=(cfg.calib_tokens, cfg.calib_window),
        code=CODE_VERSION,
    )


def eval_job(handle, recipe: Recipe | str, bits: Bits | str, cfg: EvalConfig, use_cache: bool = True):
    """Generator: Progress through build, perplexity and tasks; Done(result dict). Cached per run."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    bits = Bits.parse(bits) if isinstance(bits, str) else bits
    key = run_key(handle, recipe, bits, cfg)
    if use_cache:
        hit = store.load("eval", key)
        if hit is not None:
            yield Done({**hit[0], "bits_requested": str(bits)}, cached=True)
            return
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with handle.working_model() as model:  # a copy, or a dispatched model itself (reloaded at the end)
        model, plan = yield from result_of(build_model(handle, model, recipe, bits, cfg, cfg.seed))
        corpus = load_corpus(cfg.corpus)
        win = min(cfg.window, handle.max_length, cfg.tokens)
        wins = windows(corpus, handle.tokenizer, cfg.tokens, win, "eval")
        layers = [handle.arch.layer(model, i) for i in range(handle.arch.n_layers)]
        ppl = yield from result_of(perplexity(model, wins, layers=layers))
        result = {
            "model": handle.name,
            "recipe": recipe.name,
            "weights": recipe.weights if recipe.quantize else "-",
            "bits": str(bits) if recipe.quantize else "16-16-16",
            "bits_requested": str(bits),
            "ppl": ppl,
            "tokens": int(wins.numel()),
            "window": win,
            "corpus": corpus.label,
            "seed": cfg.seed,
            "tasks": {},
            "limit": cfg.limit,
            "code": CODE_VERSION,
            "clip": recipe.clip.mode if recipe.quantize else "-",
            "clips": plan.summary(handle.arch.n_layers),
            "clip_check": plan.check,
        }
        if cfg.tasks:
            from engine.data.tasks import zero_shot

            result["tasks"] = yield from result_of(zero_shot(model, handle.tokenizer, list(cfg.tasks), cfg.limit))
        del model
    result["seconds"] = time.perf_counter() - t0
    store.save_json("eval", key, result)
    yield Done(result, seconds=result["seconds"])


def run_label(recipe: Recipe, bits: Bits) -> str:
    """How progress names one run: 'rtn 4-4-4 (gptq weights)', or 'fp (unquantized)'."""
    return f"{recipe.name} {bits} ({recipe.weights} weights)" if recipe.quantize else f"{recipe.name} (unquantized)"


def table_row(result: dict, recipe: Recipe, cached: bool = False) -> dict:
    """One row of a comparison table: eval_job's result (its `clip` mode, the `clips` chosen and the end-to-end
    `clip_check`: engine.quant.clip_check), plus `w_search` (the weights had QuaRot's range search),
    `cached` (served from cache/) and one column per task metric ('piqa acc', 'piqa acc_norm')."""
    row = {**result, "w_search": bool(recipe.quantize and recipe.weight_range_search), "cached": cached}
    for task, m in result["tasks"].items():
        row[f"{task} acc"] = m.get("acc")
        if m.get("acc_norm") is not None:
            row[f"{task} acc_norm"] = m.get("acc_norm")
    return row


# Where each stage of one run sits in that run's share of the overall bar: (start, span); zero-shot tasks take
# the last tenth when asked for. The figures only place the bar; the ETA comes from the measured pace.
PHASES = {
    "rotate": (0.0, 0.15),
    "calibrate": (0.15, 0.05),
    "weights": (0.2, 0.15),
    "gptq": (0.2, 0.15),
    "clips": (0.35, 0.05),
    "clip check": (0.4, 0.1),
    "perplexity": (0.5, 0.4),
    "zero-shot": (0.9, 0.1),
}


def eval_table_job(handle, runs: Iterable[tuple[Recipe | str, Bits | str]], cfg: EvalConfig, use_cache: bool = True):
    """Generator: eval_job for each (recipe, bits) run in turn, then Done(rows), one table_row per run.

    Every run's own Progress comes through with its message prefixed by 'run i/n <label>: '; after each run a
    Progress('runs', i, n) carries partial = the rows so far (a live table). The Evaluate and Optimize pages and
    `python -m engine eval` all build their comparison tables from these rows. An error (ValueError) ends the
    job; the rows finished before it were in the last partial."""
    runs = [(get_recipe(r) if isinstance(r, str) else r, Bits.parse(b) if isinstance(b, str) else b) for r, b in runs]
    rows: list[dict] = []
    t0 = time.perf_counter()
    n, overall, first_phase = len(runs), 0.0, None
    for i, (recipe, bits) in enumerate(runs):
        what = f"run {i + 1}/{n} {run_label(recipe, bits)}"

        def on_the_whole_bar(ev, i=i, what=what):
            nonlocal overall, first_phase
            start, span = PHASES.get(ev.stage, (None, None))
            if start is not None:
                span = span if cfg.tasks or ev.stage != "perplexity" else 1.0 - start
                overall = max(overall, (i + start + span * ev.fraction) / n)  # one bar that never goes back
            first_phase = first_phase or ev.stage
            elapsed = time.perf_counter() - t0
            eta = elapsed * (1 - overall) / overall if overall > 0 and ev.stage != first_phase else None
            return replace(
                ev, message=f"{what}: {ev.stage}: {ev.message}", partial=None, overall=overall, seconds=elapsed, eta=eta
            )

        done = yield from done_of(eval_job(handle, recipe, bits, cfg, use_cache=use_cache), on_the_whole_bar)
        rows.append(table_row(done.result, recipe, done.cached))
        overall = (i + 1) / n
        yield Progress(
            "runs",
            i + 1,
            n,
            time.perf_counter() - t0,
            f"{what}: perplexity {done.result['ppl']:.2f}" + (" (cached)" if done.cached else ""),
            partial=list(rows),
            overall=overall,
        )
    yield Done(rows, seconds=time.perf_counter() - t0, cached=bool(rows) and all(r["cached"] for r in rows))


def beside_baselines(
    recipe: Recipe, bits: Bits | str, weights: str, weight_range_search: bool
) -> list[tuple[Recipe, Bits]]:
    """The runs that put `recipe` (e.g. learned rotations) in context: fp, then rtn, quarot and `recipe` at
    `bits`, all three with the same weight quantizer, the fixed activation and KV clips that training used, and
    the weight range search or not."""
    bits = Bits.parse(bits) if isinstance(bits, str) else bits
    clip = ClipPolicy("fixed", weight_range_search=weight_range_search)
    return [(get_recipe("fp"), Bits(16, 16, 16))] + [
        (replace(r.with_weights(weights), clip=clip), bits) for r in (get_recipe("rtn"), get_recipe("quarot"), recipe)
    ]


def cached_runs() -> list[dict]:
    """Every saved evaluation (for the page's history table)."""
    out = []
    for key in store.entries("eval"):
        hit = store.load("eval", key)
        if hit is not None:
            out.append(hit[0])
    return out
