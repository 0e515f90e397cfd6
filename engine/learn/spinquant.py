"""Learned rotations: SpinQuant (R1 and every layer's R2) and FLRot (also R3 and a block-diagonal R4), trained by
Cayley SGD on the next-token loss of the rotated, fake-quantized network (engine.learn.rotated_network).

This module is the job: its settings, the training loop with checkpoints every few steps (resumable, also under
torchrun), the quick perplexity and kurtosis probes, and the exported rotation file in SpinQuant's layout.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from engine import store
from engine.events import Done, Metric, Progress
from engine.learn import distributed
from engine.learn.cayley import CayleySGD
from engine.learn.rotated_network import LearnedRotations, RotatedTrainingModel
from engine.model.arch import ArchInfo
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import RECIPES, Bits, Recipe, get_recipe
from engine.rotation.files import save_rotations
from engine.rotation.fusion import RotationConfig, deal_channels, down_input_magnitudes
from engine.rotation.orthogonal import check_block_divides

METHODS = ("spinquant", "flrot")
TRAIN_BITS = ("4-4-4", "16-4-4")  # W4A4KV4 and W16A4KV4 (SpinQuant's choice when GPTQ follows)
CODE_VERSION = "optimize-2"  # 2: the asymmetric quantizer in compressed-tensors' order (engine.evaluate eval-2)


@dataclass(frozen=True)
class TrainConfig:
    method: str = "spinquant"  # spinquant (R1, R2) | flrot (R1, R2, R3, block-diagonal R4)
    bits: str = "4-4-4"  # W-A-KV of the fake quantizers during training
    steps: int = 20
    windows: int = 20  # calibration windows (cycled through, `batch` per step)
    window: int = 256  # tokens per window
    batch: int = 1  # windows per step
    lr: float = 1.5  # Cayley SGD step cap, cosine-decayed to 0 (SpinQuant's 1.5)
    block: int = 128  # FLRot's R4 block size (must divide the intermediate width)
    eval_every: int = 5  # kurtosis and quick perplexity every N steps (0: never)
    checkpoint_every: int = 5  # checkpoint under cache/optimize/ every N steps (0: only when stopped)
    eval_tokens: int = 512  # evaluation-split tokens of the quick perplexity
    seed: int = 0  # random Hadamard initialisation and calibration sampling
    corpus: str = "wiki"
    w_clip_search: bool = False  # weight clipping search in the loss, as SpinQuant's --w_clip (80 RTN passes per
    # weight per step, minutes on a CPU); evaluate with the quantizer trained for
    permute: bool = False  # FLRot: deal the down_proj input channels over R4's blocks (by their magnitude on
    # the first calibration windows) before learning the blocks

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        bits = Bits.parse(self.bits)
        if not bits.integer:
            raise ValueError(
                f"training quantizes with integer grids: bits must be bit widths (e.g. 4-4-4), got "
                f"{self.bits!r}; evaluate the learned rotations in other formats on the Evaluate page"
            )
        if bits.a >= 16 and bits.kv >= 16 and bits.w >= 16:
            raise ValueError(
                "at 16-16-16 the network is rotation invariant: nothing to learn; train at 4-4-4 "
                "(W4A4KV4) or 16-4-4 (W16A4KV4)"
            )
        for name in ("steps", "windows", "window", "batch", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.window < 2:
            raise ValueError(f"window must hold at least 2 tokens (next-token loss), got {self.window}")
        if self.batch > self.windows:
            raise ValueError(f"batch ({self.batch}) cannot exceed the number of windows ({self.windows})")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if not 0 < self.lr <= 10:
            raise ValueError(f"lr must be in (0, 10] (SpinQuant uses 1.5), got {self.lr}")
        if self.block < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.permute and self.method != "flrot":
            raise ValueError("a channel permutation before R4's blocks needs a learned block R4: method flrot")

    @property
    def parsed_bits(self) -> Bits:
        return Bits.parse(self.bits)

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """Learning rate of step `step` (0-based) of `steps`: lr/2 (1 + cos(pi step / steps)), no warm-up."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


# ---- the job -----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a resumed run needs besides the rotations; JSON-able (checkpoint meta)."""

    step: int = 0
    history: list = field(default_factory=list)  # {"step", "loss", "lr", "seconds"} per step
    kurtosis: list = field(default_factory=list)  # {"step", "attn_in": [per layer], "down_in": [...]}
    ppl: list = field(default_factory=list)  # {"step", "ppl"}
    seconds: float = 0.0  # training time so far, over all sessions
    opt_steps: list = field(default_factory=list)  # CayleySGD step count per parameter (its QR schedule)


@dataclass
class TrainResult:
    config: dict
    key: str
    path: str  # the exported rotation file (SpinQuant layout, plus R3/R4 for FLRot)
    state: TrainState
    finished: bool  # False when the run was stopped (a checkpoint holds it; resume continues)


def run_key(model_fingerprint: str, corpus_fingerprint: str, cfg: TrainConfig) -> str:
    return store.make_key(
        kind="optimize", model=model_fingerprint, corpus=corpus_fingerprint, cfg=cfg.to_dict(), code=CODE_VERSION
    )


def save_checkpoint(key: str, rots: LearnedRotations, opt: CayleySGD, state: TrainState, cfg: TrainConfig) -> None:
    state.opt_steps = [opt.state[p].get("step", 0) if p in opt.state else 0 for p in rots.manifold_params()]
    store.save(
        "optimize",
        key,
        {"state": asdict(state), "config": cfg.to_dict()},
        {name: p.detach() for name, p in rots.named_parameters()},
    )


def load_checkpoint(key: str, rots: LearnedRotations, opt: CayleySGD) -> TrainState | None:
    """Restore the rotations and the optimizer's step counts; None when there is no valid checkpoint."""
    hit = store.load("optimize", key)
    if hit is None:
        return None
    meta, tensors = hit
    with torch.no_grad():
        for name, p in rots.named_parameters():
            p.copy_(tensors[name])
    state = TrainState(**meta["state"])
    restore_opt_steps(rots, opt, state.opt_steps)
    return state


def restore_opt_steps(rots: LearnedRotations, opt: CayleySGD, opt_steps: list[int]) -> None:
    """CayleySGD's per-parameter step counts (its QR schedule) from a checkpoint's TrainState.opt_steps."""
    for p, n in zip(rots.manifold_params(), opt_steps, strict=False):
        if n:
            opt.state[p]["step"] = n


def export_path(key: str, method: str, step: int) -> Path:
    """One file per (run, step): evaluation caches key on the path, so a file is never rewritten in place."""
    return store.cache_root() / "rotations" / f"{method}-{key}-step{step}.bin"


def learned_recipe(path: str | Path, method: str) -> Recipe:
    """The evaluation recipe of an exported file: 'rotated' (R3/R4 random Hadamard) for SpinQuant; for FLRot the
    learned R3/R4 come from the file too."""
    if method == "spinquant":
        return get_recipe("rotated", rotation_file=str(path))
    base = RECIPES["rotated"]
    rot = RotationConfig(r1="file", r2="file", r3="file", r4="file", file=str(path))
    return replace(
        base, name="flrot", description="FLRot: R1-R4 learned (R4 block-diagonal), from a file", rotation=rot
    )


def train(
    model: nn.Module,
    arch: ArchInfo,
    calib: torch.Tensor,
    eval_wins: torch.Tensor,
    cfg: TrainConfig,
    key: str | None = None,
    resume: bool = True,
):
    """Generator: Progress and Metric("loss") per step (extra: lr, seconds); every cfg.eval_every steps
    Metric("ppl") and Metric("kurtosis") (extra: per-layer lists per site); Done(TrainResult) at the end. A resumed
    run first yields a Progress whose `partial` is the restored TrainState (its loss/ppl/kurtosis history).

    calib [N, T] calibration windows (step s uses windows s*batch .. s*batch+batch-1, modulo N); eval_wins [M, T']
    for the quick perplexity. With `key`, checkpoints go to cache/optimize/<key> every cfg.checkpoint_every steps
    and when the generator is closed early (Stop); resume=True continues from one, resume=False starts over.

    Under torch.distributed (world size W > 1, e.g. torchrun) every rank calls train() with the same arguments:
    rank r computes the loss on windows [r b/W, (r+1) b/W) of each step's batch, DistributedDataParallel averages
    the gradients, and the identical Cayley step then runs on every rank. Only rank 0 loads and writes checkpoints,
    runs the quick evaluations (ppl/kurtosis Metrics) and writes the exported file; reported losses are the mean
    over ranks. The rotations are checked to agree across ranks at the end.
    """
    arch.check_learnable()
    bits = cfg.parsed_bits
    if calib.dim() != 2 or calib.shape[0] < cfg.batch or calib.shape[1] < 2:
        raise ValueError(f"calibration windows must be [N >= batch, T >= 2], got {tuple(calib.shape)}")
    info = distributed.current()
    shard = distributed.local_batch(cfg.batch, info.world_size, info.rank)  # refuses b % W != 0 before any work
    rots = LearnedRotations(arch, cfg.method, cfg.block, cfg.seed).to(next(model.parameters()).device)
    if cfg.permute:  # the same windows on every rank and at every resume: the same permutation
        rots.r4_perm = r4_permutations(model, arch, calib, cfg.block)
    # SpinQuant trains with fixed clips (activations 0.9, KV 0.95): a calibration per step would cost more than the step
    net = RotatedTrainingModel(
        model, arch, rots, bits, replace(RECIPES["rotated"], clip=ClipPolicy("fixed")), cfg.w_clip_search
    )
    opt = CayleySGD(rots.manifold_params(), lr=cfg.lr)
    state = None
    if info.is_main:  # one process touches cache/: the others get rank 0's state and rotations
        if key and not resume:  # start over: a stale checkpoint must not come back if this run stops at step 0
            shutil.rmtree(store.entry_dir("optimize", key), ignore_errors=True)
        state = (load_checkpoint(key, rots, opt) if key and resume else None) or TrainState()
    if info.distributed:
        state = distributed.from_main(state)
        restore_opt_steps(rots, opt, state.opt_steps)
    step_loss = distributed.data_parallel(rots, net.loss, info)  # under DDP: broadcasts rank 0's rotations
    saved_step = state.step
    t0 = time.perf_counter() - state.seconds

    def probe():
        if not info.is_main:  # no collective inside: the other ranks simply go on to the next step's all-reduce
            return
        ppl, kurt = net.evaluate(eval_wins)
        state.ppl.append({"step": state.step, "ppl": ppl})
        state.kurtosis.append({"step": state.step, **kurt})
        yield Metric("ppl", state.step, ppl)
        yield Metric("kurtosis", state.step, float(sum(kurt["attn_in"]) / len(kurt["attn_in"])), extra=kurt)

    try:
        if state.step:  # resumed: a snapshot of the history, for charts that continue where the stop left off
            yield Progress(
                "optimize",
                state.step,
                cfg.steps,
                state.seconds,
                f"resumed from the checkpoint at step {state.step}",
                partial=copy.deepcopy(state),
            )
        if state.step == 0 and cfg.eval_every and not state.ppl:
            yield Progress("optimize", 0, cfg.steps, 0.0, "evaluating the initial (random Hadamard) rotations")
            yield from probe()
        while state.step < cfg.steps:
            lr = cosine_lr(cfg.lr, state.step, cfg.steps)
            idx = [(state.step * cfg.batch + j) % calib.shape[0] for j in range(cfg.batch)]  # the step's windows
            opt.zero_grad(set_to_none=True)
            loss = step_loss(calib[idx[shard]])  # this rank's share [b / W, T]; DDP averages the gradients
            loss.backward()
            loss = float(distributed.mean_over_ranks(loss.detach()))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            state.step += 1
            state.seconds = time.perf_counter() - t0
            state.history.append({"step": state.step, "loss": loss, "lr": lr, "seconds": state.seconds})
            yield Metric("loss", state.step, loss, extra={"lr": lr, "seconds": state.seconds})
            if cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                yield from probe()
            if key and info.is_main and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(key, rots, opt, state, cfg)
                saved_step = state.step
            yield Progress(
                "optimize",
                state.step,
                cfg.steps,
                state.seconds,
                f"step {state.step}/{cfg.steps}: loss {loss:.3f}, lr {lr:.3f}",
            )
    finally:  # also on Stop (the generator closed) or an error: unsaved steps are kept for a resume
        if key and info.is_main and state.step > saved_step:
            state.seconds = time.perf_counter() - t0
            save_checkpoint(key, rots, opt, state, cfg)
    distributed.check_same_on_all_ranks(rots.manifold_params(), "the learned rotations")
    path = export_path(key or "nokey", cfg.method, state.step)
    if info.is_main:
        save_rotations(rots.rotation_set(), path)
    distributed.barrier()  # every rank's Done names a file that exists
    yield Done(TrainResult(cfg.to_dict(), key or "", str(path), state, finished=True), seconds=state.seconds)


PERMUTATION_WINDOWS = 4  # calibration windows whose down_proj input magnitudes order R4's channels


def r4_permutations(model: nn.Module, arch: ArchInfo, calib: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Per layer, the channel order R4's blocks learn on (engine.rotation.fusion.deal_channels)."""
    mags = down_input_magnitudes(model, arch, calib[:PERMUTATION_WINDOWS])
    return [deal_channels(m, block) for m in mags]


def train_job(handle, cfg: TrainConfig, resume: bool = True):
    """train() on a loaded model (engine.model.loading.ModelHandle): calibration windows from the calib split (seeded
    random positions), quick-perplexity windows from the eval split, checkpoints keyed by model, data and cfg."""
    from engine.data.corpus import load_corpus, windows

    handle.arch.check_learnable()  # before any data work
    if handle.dispatched:
        raise ValueError(
            "Cayley training needs the whole model on each process's device (the rotations touch every "
            "weight at every step); load it on one device per process and spread the data over GPUs "
            "with torchrun (python -m engine optimize), not with a device map"
        )
    if cfg.method == "flrot":
        check_block_divides(handle.arch.intermediate, cfg.block)  # before any data work
    corpus = load_corpus(cfg.corpus)
    window = min(cfg.window, handle.max_length)
    calib = windows(corpus, handle.tokenizer, cfg.windows * window, window, "calib", seed=cfg.seed)
    eval_wins = windows(corpus, handle.tokenizer, cfg.eval_tokens, min(window, cfg.eval_tokens), "eval")
    key = run_key(handle.fingerprint, corpus.fingerprint, cfg)
    yield from train(handle.model, handle.arch, calib, eval_wins, cfg, key=key, resume=resume)


def checkpoint_result(handle, cfg: TrainConfig) -> TrainResult | None:
    """The saved state of a run (e.g. one that was stopped), its rotations exported; None if never started."""
    from engine.data.corpus import load_corpus

    key = run_key(handle.fingerprint, load_corpus(cfg.corpus).fingerprint, cfg)
    rots = LearnedRotations(handle.arch, cfg.method, cfg.block, cfg.seed)
    state = load_checkpoint(key, rots, CayleySGD(rots.manifold_params(), lr=cfg.lr))
    if state is None:
        return None
    if cfg.permute:
        from engine.data.corpus import windows

        window = min(cfg.window, handle.max_length)
        calib = windows(load_corpus(cfg.corpus), handle.tokenizer, cfg.windows * window, window, "calib", seed=cfg.seed)
        rots.r4_perm = r4_permutations(handle.model, handle.arch, calib, cfg.block)
    path = export_path(key, cfg.method, state.step)
    if not path.exists():
        save_rotations(rots.rotation_set(), path)
    return TrainResult(cfg.to_dict(), key, str(path), state, finished=state.step >= cfg.steps)
