"""How much do random rotations vary? Evaluate N random Hadamard and N random orthogonal rotations at one bit
setting (SpinQuant's Figure on 100 random rotations), and the learned rotations beside them.

A "random Hadamard" run with seed s is the 'quarot' recipe at EvalConfig(seed=s): R1-R4 random Hadamard, drawn by
engine.rotation.fusion.rotate from s. A "random orthogonal" run draws R1 and every R2 Haar-random instead; R3/R4 stay
random Hadamard as in QuaRot. Every run goes through engine.evaluate.eval_job, so it is cached like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import pandas as pd

from engine.evaluate import EvalConfig, eval_job
from engine.events import Done, Metric, Progress, result_of
from engine.learn.rotated_network import ONLINE_SEED
from engine.learn.spinquant import METHODS, learned_recipe
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import RECIPES, Bits, Recipe
from engine.rotation.fusion import RotationConfig

FAMILIES: dict[str, Recipe] = {
    "hadamard": RECIPES["quarot"],
    "orthogonal": Recipe(
        "random-orthogonal",
        "Haar-random orthogonal R1 and R2, random Hadamard R3/R4",
        rotation=RotationConfig(r1="orthogonal", r2="orthogonal", r3="hadamard", r4="hadamard"),
    ),
}


@dataclass(frozen=True)
class SpreadConfig:
    seeds: int = 10  # random rotations per family
    families: tuple = ("hadamard", "orthogonal")
    bits: str = "4-4-4"
    weights: str = "rtn"  # rtn | gptq
    w_clip_search: bool = True  # weight clipping search for every row (learned ones included)
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tokens=4096, window=1024))

    def __post_init__(self):
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds <= 0:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {', '.join(FAMILIES)}, got {self.families!r}")
        Bits.parse(self.bits)
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"weights must be rtn or gptq, got {self.weights!r}")
        if self.first_seed < 0:
            raise ValueError(f"first_seed must be >= 0, got {self.first_seed}")


@dataclass
class SpreadResult:
    """rows: one per evaluation (family, seed, label, ppl); learned rows have family 'learned' and seed None."""

    rows: pd.DataFrame
    bits: str
    weights: str
    w_clip_search: bool

    def random(self) -> pd.DataFrame:
        return self.rows[self.rows.family != "learned"]

    def learned(self) -> pd.DataFrame:
        return self.rows[self.rows.family == "learned"]

    def summary(self) -> pd.DataFrame:
        """Per family: count, median, quartiles, min, max of perplexity; then each learned result with the share
        of every family's random rotations it beats."""
        stats = self.random().groupby("family").ppl.describe()[["count", "min", "25%", "50%", "75%", "max"]]
        stats = stats.rename(columns={"50%": "median"})
        for _, row in self.learned().iterrows():
            for fam, g in self.random().groupby("family"):
                stats.loc[fam, f"{row.label} beats"] = float((g.ppl > row.ppl).mean())
        return stats


def spread_job(handle, cfg: SpreadConfig, learned: dict[str, tuple[str, str]] | None = None, use_cache: bool = True):
    """Generator: Progress per evaluation, Metric("ppl", i, value, extra=row), then Done(SpreadResult).

    learned: label -> (rotation file, method) evaluated at the same bits to mark, with EvalConfig seed ONLINE_SEED
    (the seed whose random Hadamard R3/R4 SpinQuant training used).
    """
    learned = learned or {}
    for label, (_, method) in learned.items():
        if method not in METHODS:
            raise ValueError(f"learned rotation {label!r}: method must be one of {', '.join(METHODS)}")
    bits = Bits.parse(cfg.bits)
    clip = ClipPolicy("fixed", weight_range_search=cfg.w_clip_search)  # as training quantized
    quantizer = lambda r: replace(r.with_weights(cfg.weights), clip=clip)  # noqa: E731
    runs = [
        (fam, seed, f"{fam} seed {seed}", quantizer(FAMILIES[fam]), replace(cfg.eval, seed=seed))
        for fam in cfg.families
        for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    ]
    runs += [
        ("learned", None, label, quantizer(learned_recipe(path, method)), replace(cfg.eval, seed=ONLINE_SEED))
        for label, (path, method) in learned.items()
    ]
    rows, t0 = [], time.perf_counter()
    for i, (fam, seed, name, recipe, ecfg) in enumerate(runs):
        yield Progress("spread", i, len(runs), time.perf_counter() - t0, f"{name} ({i + 1}/{len(runs)})")
        # one Progress per run here: the run's own events are not handed on
        result = yield from result_of(eval_job(handle, recipe, bits, ecfg, use_cache=use_cache), lambda ev: None)
        row = {"family": fam, "seed": seed, "label": name, "ppl": result["ppl"], "recipe": recipe.name}
        rows.append(row)
        yield Metric("ppl", i, result["ppl"], extra=row)
    yield Progress("spread", len(runs), len(runs), time.perf_counter() - t0, "done")
    yield Done(
        SpreadResult(pd.DataFrame(rows), str(bits), cfg.weights, cfg.w_clip_search), seconds=time.perf_counter() - t0
    )
