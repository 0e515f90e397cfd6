"""The what-if matrix: number formats (rows) x rotations (columns), each cell one cached evaluation row.

A column names what R1 and R4 are (the rotations whose outputs meet the microscaling groups of the GEMMs along
the hidden and intermediate widths); R2 and R3 are QuaRot's head-wide random Hadamards whenever a column rotates:

- `none`: no rotation (recipe rtn); `hadamard`: QuaRot's global random Hadamard R1-R4;
- `block<b>`: block-diagonal random Hadamard R1 and R4 of b (BRQ: a block the size of the MX group);
- `block<b>p`: the same with R4 after a channel permutation dealing outlier channels over the blocks;
- `file:<path>`: R1/R2 (and R3/R4 if present) from a rotation file.

A row is a format for weights and activations (a bit width means QuaRot's integers: per-row weights, per-token
activations) with the KV cache at `kv`. Weights are RTN (or GPTQ) in the row's format; clip ratios calibrated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from engine.data.corpus import load_corpus, windows
from engine.evaluate import EvalConfig, eval_table_job
from engine.events import Done, Progress, done_of, result_of
from engine.quant.clipping import ClipPolicy
from engine.quant.methods import ACTIVATION_METHODS, weight_format
from engine.quant.recipes import RECIPES, Bits, Recipe, get_recipe
from engine.rotation.fusion import BLOCK_KINDS, PERMUTED_KINDS, RotationConfig, rotate_job

DEFAULT_FORMATS = ("4", "mxfp4", "nvfp4", "fp8")
DEFAULT_ROTATIONS = ("none", "hadamard", "block16", "block32", "block128", "block32p")
COLUMN_KINDS = ("none", "hadamard") + BLOCK_KINDS + PERMUTED_KINDS


def column_recipe(column: str, weights: str = "rtn", clip: ClipPolicy | str = "calibrated") -> Recipe:
    """The recipe of a rotation column (see the module's docstring)."""
    column = column.strip()
    if column.startswith("file:"):
        return get_recipe("rotated", weights=weights, rotation_file=column[5:], clip=clip)
    if column not in COLUMN_KINDS:
        raise ValueError(
            f"unknown rotation column {column!r}: expected one of {', '.join(COLUMN_KINDS)} or "
            "file:<path to a rotation file>"
        )
    if column == "none":
        return get_recipe("rtn", weights=weights, clip=clip)
    if column == "hadamard":
        return get_recipe("quarot", weights=weights, clip=clip)
    r1 = column.rstrip("p")
    rot = RotationConfig(r1=r1, r2="hadamard", r3="hadamard", r4=column)
    return replace(
        RECIPES["quarot"],
        name=column,
        description=f"block Hadamard R1/R4 ({column})",
        rotation=rot,
        weights=weights,
        clip=ClipPolicy.parse(clip),
    )


def row_bits(fmt: str, kv: str = "16") -> Bits:
    """A row's setting: weights and activations in `fmt`, the KV cache at `kv`."""
    return Bits.parse(f"{fmt}-{fmt}-{kv}")


@dataclass(frozen=True)
class MatrixConfig:
    formats: tuple = DEFAULT_FORMATS
    rotations: tuple = DEFAULT_ROTATIONS
    kv: str = "16"
    weights: str = "rtn"
    clip: ClipPolicy = ClipPolicy()  # a mode name is parsed into a policy here

    def __post_init__(self):
        object.__setattr__(self, "clip", ClipPolicy.parse(self.clip))
        if not self.formats or not self.rotations:
            raise ValueError("choose at least one format and one rotation")
        for f in self.formats:  # refuse a bad name before any work
            row_bits(f, self.kv)
        for c in self.rotations:
            column_recipe(c, self.weights, self.clip).rotation.key()  # a rotation file is read (and hashed) here

    def runs(self) -> list[tuple[str, str, Recipe, Bits]]:
        return [
            (f, c, column_recipe(c, self.weights, self.clip), row_bits(f, self.kv))
            for f in self.formats
            for c in self.rotations
        ]


def matrix_job(handle, mcfg: MatrixConfig, cfg: EvalConfig, use_cache: bool = True):
    """Generator: every cell through eval_table_job (one overall bar; each cell cached as an evaluation row);
    after each cell a Progress whose `partial` is the list of cells so far; Done(cells). A cell is
    {format, rotation, ppl, bits, bits_per_value, seconds, cached, clips}."""
    runs = mcfg.runs()
    cells = []

    def as_cells(ev):  # eval_table_job's live table of rows becomes the list of cells so far
        if ev.partial is None:
            return ev
        rows = ev.partial
        fmt, col, recipe, bits = runs[len(rows) - 1]
        row = rows[-1]
        wf = weight_format(bits.w, recipe)
        cells.append(
            {
                "format": fmt,
                "rotation": col,
                "ppl": row["ppl"],
                "bits": row["bits"],
                "weight_bits_per_value": wf.bits_per_value(handle.arch.hidden),
                "seconds": row["seconds"],
                "cached": row["cached"],
                "clips": row.get("clips", {}),
                "tokens": row["tokens"],
            }
        )
        return replace(ev, partial=list(cells))

    done = yield from done_of(
        eval_table_job(handle, [(r, b) for _, _, r, b in runs], cfg, use_cache=use_cache), as_cells
    )
    yield Done(cells, seconds=done.seconds, cached=done.cached)


def cell_sqnr_job(handle, fmt: str, column: str, tokens: int = 512, window: int = 512, seed: int = 0):
    """Generator: for one cell, per layer, the SQNR (dB) of the cell's activation quantizer (no clipping) on the
    down_proj input (after R4) and on the residual stream as the attention's input linears read it (after R1);
    Progress per window; Done({"down_in": [...], "attn_in": [...]})."""
    recipe, bits = column_recipe(column), row_bits(fmt)
    quant = ACTIVATION_METHODS["rtn"].activation_quant(bits.a)
    if quant is None:
        raise ValueError("a 16-bit row quantizes nothing: choose a format")
    arch = handle.arch
    corpus = load_corpus("wiki")
    wins = windows(corpus, handle.tokenizer, tokens, min(window, handle.max_length, tokens), "eval")
    calib = windows(corpus, handle.tokenizer, 2048, 512, "calib", seed=seed) if recipe.rotation.permutes else None
    t0 = time.perf_counter()
    sums = {site: [[0.0, 0.0] for _ in range(arch.n_layers)] for site in ("down_in", "attn_in")}
    with handle.working_model() as model:
        if recipe.rotation.active:
            model = yield from result_of(
                rotate_job(model, arch, replace(recipe.rotation, seed=seed), inplace=True, calib=calib)
            )
        hooks = []
        for i in range(arch.n_layers):
            for site, role in (("down_in", arch.down_roles[0]), ("attn_in", arch.roles.attn_reader)):

                def keep(m, args, site=site, i=i):
                    x = args[0].detach().float()
                    err = x - quant(x, 1.0)
                    sums[site][i][0] += float(x.double().pow(2).sum())
                    sums[site][i][1] += float(err.double().pow(2).sum())

                hooks.append(arch.module(model, role, i).register_forward_pre_hook(keep))
        try:
            with torch.no_grad():
                for n, w in enumerate(wins):
                    model(w.unsqueeze(0).to(next(model.parameters()).device), use_cache=False)
                    yield Progress("sqnr", n + 1, len(wins), time.perf_counter() - t0, f"window {n + 1}/{len(wins)}")
        finally:
            for h in hooks:
                h.remove()
    out = {site: [10 * math.log10(s / e) if e > 0 else math.inf for s, e in layers] for site, layers in sums.items()}
    yield Done(out, seconds=time.perf_counter() - t0)
