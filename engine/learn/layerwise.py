"""Layer-wise training of the per-layer transforms, one decoder block at a time (FlatQuant's schedule), beside the
end-to-end training of engine.learn.spinquant.

Protocol, for block k (inputs X [N windows, T tokens, hidden], kept in CPU memory):
    target   Y_k = f_k(X_k)          the floating-point block on the floating-point inputs X_k (the FP network's own
                                     hidden state entering block k + 1)
    inputs   Z_k                     what blocks 0..k-1 produce once quantized with their learned transforms
                                     (Z_0 = X_0, the embeddings); cfg.inputs = "fp" trains on X_k instead
    loss     mean (g_k(Z_k) - Y_k)^2  g_k: block k rotated and fake-quantized with its transforms being learned
So the loss also asks block k to undo part of the error its inputs carry. (FlatQuant's public code trains each
block on the floating-point inputs, both for the target and for the quantized block: cfg.inputs = "fp".)
The gradient is that of loss / loss.detach() (FlatQuant's normalisation): Cayley SGD's step cap then means the same
on every block whatever the scale of its residual stream; the reported loss is the plain MSE.

What is learned, per block: R2 [head_dim, head_dim] (orthogonal, Cayley SGD); FLRot adds R3 [head_dim, head_dim] and
a block-diagonal R4 [nb, b, b] (b = cfg.block, or the intermediate width if smaller); and with cfg.clip = "learned"
one clip ratio per activation and KV site (engine.learn.learned_clip, Adam), kept in the rotation file.
R1 (shared by all blocks) stays the random Hadamard that QuaRot uses, fused once before training: an objective of
one block cannot own a matrix every block reads and writes, since moving R1 for block k changes the inputs and
targets of all blocks before it. Fitting R1 to all blocks' inputs without back-propagation (KurTail, DartQuant) is
future work.

Only one block and one mini-batch are on the compute device at a time; X, Z and Y stay on the CPU (3 x N x T x
hidden values in the store dtype) and move per mini-batch. The per-layer rotations (and spinquant's fixed R3/R4) are
engine.learn.rotated_network.LearnedRotations, the weights are its RotatedWeight parametrization over the one
rotation algebra, so the result is a rotation file the 'rotated' recipe loads (engine.rotation.files).
"""

from __future__ import annotations

import copy
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from engine import store
from engine.events import Done, Metric, Progress
from engine.learn.cayley import CayleySGD
from engine.learn.learned_clip import ClipRatios, clip_fake_quant
from engine.learn.rotated_network import LearnedRotations, RotatedWeight
from engine.learn.spinquant import METHODS, cosine_lr
from engine.model import attention
from engine.model.arch import ArchInfo
from engine.observe.capture import StopForward
from engine.quant.calibrate import ClipPlan
from engine.quant.quantizers import quantize_activation, quantize_kv
from engine.quant.recipes import Bits
from engine.rotation.algebra import rotated_weight
from engine.rotation.files import save_rotations
from engine.rotation.fusion import fold_norms, fuse_r1
from engine.rotation.orthogonal import check_block_divides

CLIPS = ("learned", "fixed", "none")
INPUTS = ("quantized", "fp")
CODE_VERSION = "layerwise-1"
KV_SITES = ("k_cache", "v_cache")
_NORM_SITES = {"input_norm": "attn_in", "post_attn_norm": "mlp_in"}


@dataclass(frozen=True)
class LayerwiseConfig:
    method: str = "spinquant"  # spinquant: R2 per block | flrot: R2, R3 and block-diagonal R4 per block
    bits: str = "4-4-4"  # W-A-KV of the fake quantizers while training
    steps: int = 20  # optimizer steps per block
    windows: int = 16  # calibration windows (cycled through, `batch` per step)
    window: int = 256  # tokens per window
    batch: int = 4  # windows per step (and per mini-batch of the streamed passes)
    lr: float = 0.1  # Cayley SGD step cap, cosine-decayed to 0 over each block's steps; the loss is
    # normalised to 1 (see the top), and 1.5 (SpinQuant's) overshoots on it
    clip_lr: float = 0.05  # Adam on the clip ratios' logits, cosine-decayed likewise
    clip: str = "learned"  # learned (from a_clip/kv_clip) | fixed (a_clip/kv_clip) | none
    a_clip: float = 0.9  # activation clip ratio: the fixed one, or where a learned one starts (QuaRot's)
    kv_clip: float = 0.95  # the KV cache's
    block: int = 128  # FLRot's R4 block size (the intermediate width if smaller)
    inputs: str = "quantized"  # quantized: block k sees the quantized blocks' outputs | fp: the FP hidden states
    w_clip_search: bool = False  # QuaRot's weight clipping search inside the loss (80 RTN passes per weight per step)
    seed: int = 0  # random Hadamard initialisation (QuaRot's for seed 0) and calibration sampling
    corpus: str = "wiki"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not Bits.parse(self.bits).integer:
            raise ValueError(
                f"training quantizes with integer grids: bits must be bit widths (e.g. 4-4-4), got {self.bits!r}"
            )
        for name in ("steps", "windows", "window", "batch", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.batch > self.windows:
            raise ValueError(f"batch ({self.batch}) cannot exceed the number of windows ({self.windows})")
        if not 0 < self.lr <= 10:
            raise ValueError(f"lr must be in (0, 10] (SpinQuant uses 1.5), got {self.lr}")
        if not self.clip_lr > 0:
            raise ValueError(f"clip_lr must be positive, got {self.clip_lr}")
        if self.clip not in CLIPS:
            raise ValueError(f"layer-wise clipping must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        for name in ("a_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1] (1.0 = no clipping), got {getattr(self, name)}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")

    @property
    def parsed_bits(self) -> Bits:
        return Bits.parse(self.bits)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerwiseResult:
    config: dict
    path: str  # the rotation file (R1, R2 per layer; FLRot R3, R4; clip ratios)
    history: list = field(default_factory=list)  # {"block", "step", "loss", "lr", "seconds"} per step
    blocks: list = field(default_factory=list)  # {"block", "first_loss", "mse", "seconds", "clips"} per block
    seconds: float = 0.0
    peak_bytes: int = 0  # torch.cuda.max_memory_allocated on a CUDA device, else 0


# ---- the sites a clip ratio belongs to -------------------------------------------------------------------------
def site_of(arch: ArchInfo, role: str) -> str:
    """The activation site of a linear's input: linears fed by one norm share it (attn_in: q, k, v; mlp_in: gate,
    up); the others have their own (o_in, down_in)."""
    for norm, readers in arch.norm_feeds:
        if role in readers and norm in _NORM_SITES:
            return _NORM_SITES[norm]
    return f"{role}_in"


def clip_sites(arch: ArchInfo) -> tuple:
    return tuple(dict.fromkeys(site_of(arch, r) for r in arch.linears)) + KV_SITES


def learned_clip_plan(clips: list[dict[str, float]], arch: ArchInfo) -> ClipPlan:
    """The ClipPlan (engine.quant.calibrate) of a file's learned ratios: what install_activation_quant and
    install_kv_quant take to evaluate with them."""
    plan = ClipPlan()
    for i, layer in enumerate(clips):
        for role in arch.linears:
            if site_of(arch, role) in layer:
                plan.activations[(i, role)] = layer[site_of(arch, role)]
        plan.k[i], plan.v[i] = layer.get("k_cache", 1.0), layer.get("v_cache", 1.0)
    return plan


# ---- the floating-point model and the block inputs --------------------------------------------------------------
def prepare_fp(model: nn.Module, arch: ArchInfo, r1: torch.Tensor) -> nn.Module:
    """A CPU copy with the RMSNorm gains folded and R1 fused (float64, cast back): the floating-point network whose
    residual stream is x R1, routed through SpinScope's attention (so blocks copied from it take q/k/v hooks)."""
    fp = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    fold_norms(fp, arch)
    fuse_r1(fp, arch, r1.double())
    attention.install(fp)
    return fp


def _to(obj, device, dtype=None):
    """Tensors (floating ones cast to dtype) inside tuples, lists and dicts, moved to device."""
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def block_inputs(
    fp: nn.Module, arch: ArchInfo, calib: torch.Tensor, batch: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, dict]:
    """(X_0 [N, T, hidden] on the CPU: the residual stream entering block 0 of `fp` for windows calib [N, T], the
    keyword arguments block 0 receives for one window: position embeddings, mask; they broadcast over a batch)."""
    found: dict = {}

    def catch(module, args, kwargs):
        found["x"], found["kwargs"] = args[0] if args else kwargs["hidden_states"], kwargs
        raise StopForward

    h = arch.layer(fp, 0).register_forward_pre_hook(catch, with_kwargs=True)
    x, kwargs = None, None
    try:
        for s in range(0, calib.shape[0], batch):
            try:
                fp(calib[s : s + batch], use_cache=False)
            except StopForward:
                pass
            part = found["x"].to("cpu", dtype or found["x"].dtype)
            x = torch.empty((calib.shape[0], *part.shape[1:]), dtype=part.dtype) if x is None else x
            x[s : s + batch] = part
            if kwargs is None:
                kwargs = {k: v for k, v in found["kwargs"].items() if k != "hidden_states"}
    finally:
        h.remove()
    if torch.is_tensor(kwargs.get("attention_mask")) and kwargs["attention_mask"].shape[0] > 1:
        kwargs["attention_mask"] = kwargs["attention_mask"][:1]  # one window's mask broadcasts over any batch
    return x, kwargs


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def stream(
    block: nn.Module,
    x: torch.Tensor,
    out: torch.Tensor,
    kwargs: dict,
    batch: int,
    device,
    dtype: torch.dtype,
    target: torch.Tensor | None = None,
) -> float:
    """out[n] = block(x[n]) for every window, mini-batch by mini-batch (x and out on the CPU; out may be x); with a
    target, the MSE of the outputs against it."""
    se, count = 0.0, 0
    for s in range(0, x.shape[0], batch):
        y = run_block(block, x[s : s + batch].to(device, dtype), kwargs)
        if target is not None:
            se += float(((y.float() - target[s : s + batch].to(device).float()) ** 2).sum())
            count += y.numel()
        out[s : s + batch] = y.to("cpu", out.dtype)
    return se / count if count else math.nan


# ---- one block, rotated and fake-quantized with its transforms being learned -------------------------------------
class _LayerFactors:
    """The factors block `layer`'s weights carry during layer-wise training: R1 is already fused (None)."""

    def __init__(self, rots: LearnedRotations):
        self.rots = rots

    def weight_factors(self, i: int):
        _, r2, r4 = self.rots.weight_factors(i)
        return None, r2, r4


def layer_modules(rots: LearnedRotations, i: int) -> list[nn.Module]:
    """Layer i's learned rotation modules (R2; FLRot's R3 and R4)."""
    return [rots.r2[i]] + ([rots.r3[i], rots.r4[i]] if rots.r4 is not None else [])


def _quantizer(bits: int, ratio, kv_group: int | None = None):
    """x -> fake-quantized x: with a learnable ratio (a callable giving a 0-d tensor) the learned-clip quantizer,
    with a float the engine's own (engine.quant.quantizers); None at 16 bits."""
    if bits >= 16:
        return None
    if callable(ratio):
        return lambda x: clip_fake_quant(x, bits, ratio())
    if kv_group is not None:
        return lambda x: quantize_kv(x, bits, kv_group, clip_ratio=ratio)
    return lambda x: quantize_activation(x, bits, clip_ratio=ratio)


def quantized_block(
    fp_block: nn.Module,
    arch: ArchInfo,
    rots: LearnedRotations,
    layer: int,
    bits: Bits,
    ratios: dict,
    device,
    dtype: torch.dtype,
    w_clip_search: bool = False,
) -> nn.Module:
    """A copy of the (norm-folded, R1-fused) block on `device` in `dtype` computing, on every forward, the rotated
    and fake-quantized block from layer `layer`'s rotations in `rots` (which must be on `device`): weights through
    RotatedWeight, R3 on q and k after RoPE, R4 on the down_proj input, then the activation and KV quantizers with
    `ratios` {site: float, or a callable giving a learnable 0-d tensor}, as engine.learn.rotated_network does for the
    whole model."""
    blk = copy.deepcopy(fp_block).to(device, dtype).requires_grad_(False)
    if rots.r4 is None:  # a fixed R4 folds once (float64, cast back), as engine.rotation.fusion.install_r4 does
        for role in arch.down_roles:
            down = arch.module(blk, role)
            down.weight.data = rotated_weight(arch, role, down.weight.double(), r4=rots.r4_fixed.double()).to(dtype)
    factors = _LayerFactors(rots)
    for role in arch.linears:
        parametrize.register_parametrization(
            arch.module(blk, role),
            "weight",
            RotatedWeight(factors, arch, role, layer, bits.w, w_clip_search),
            unsafe=True,
        )
    attn = arch.module(blk, "attn")

    def r3(module, q, k, v):
        r = rots.r3_matrix(layer)
        return q @ r.to(q.dtype), k @ r.to(k.dtype), v

    attention.add_hook(attn, r3)  # before the KV quantizers: they must see its output
    for role in arch.down_roles:
        arch.module(blk, role).register_forward_pre_hook(
            lambda mod, args: (rots.rotate_down_input(layer, args[0]), *args[1:])
        )
    for role in arch.linears:
        quant = _quantizer(bits.a, ratios[site_of(arch, role)])
        if quant is not None:
            arch.module(blk, role).register_forward_pre_hook(lambda mod, args, q=quant: (q(args[0]), *args[1:]))
    qk = _quantizer(bits.kv, ratios["k_cache"], arch.head_dim)
    qv = _quantizer(bits.kv, ratios["v_cache"], arch.head_dim)
    if qk is not None:
        attention.add_hook(attn, lambda module, q, k, v: (q, qk(k), qv(v)))
    return blk


def _ratios(cfg: LayerwiseConfig, arch: ArchInfo, clips: ClipRatios | None) -> dict:
    """{site: ratio} for quantized_block: learnable (callables) or the fixed floats, 1.0 with no clipping."""
    if clips is not None:
        return {s: (lambda s=s: clips.ratio(s)) for s in clips.sites}
    a, kv = (cfg.a_clip, cfg.kv_clip) if cfg.clip == "fixed" else (1.0, 1.0)
    return {s: (kv if s in KV_SITES else a) for s in clip_sites(arch)}


def train_block(
    fp_block: nn.Module,
    arch: ArchInfo,
    rots: LearnedRotations,
    layer: int,
    z: torch.Tensor,
    y: torch.Tensor,
    kwargs: dict,
    cfg: LayerwiseConfig,
    device,
    dtype: torch.dtype,
    t0: float,
    total_steps: int,
    done_steps: int,
):
    """Generator: learn layer `layer`'s transforms on inputs z against targets y ([N, T, hidden], CPU), a Metric("loss")
    and a Progress per step; returns (the trained block, its ClipRatios or None, the per-step history)."""
    bits = cfg.parsed_bits
    for m in layer_modules(rots, layer):
        m.to(device)
    clips = None
    if cfg.clip == "learned":
        clips = ClipRatios({s: (cfg.kv_clip if s in KV_SITES else cfg.a_clip) for s in clip_sites(arch)}).to(device)
    blk = quantized_block(
        fp_block, arch, rots, layer, bits, _ratios(cfg, arch, clips), device, dtype, cfg.w_clip_search
    )
    params = [p for m in layer_modules(rots, layer) for p in m.parameters()]
    opt = CayleySGD(params, lr=cfg.lr)
    adam = torch.optim.Adam(clips.parameters(), lr=cfg.clip_lr) if clips is not None else None
    n, history = z.shape[0], []
    for step in range(cfg.steps):
        lr, clip_lr = cosine_lr(cfg.lr, step, cfg.steps), cosine_lr(cfg.clip_lr, step, cfg.steps)
        idx = [(step * cfg.batch + j) % n for j in range(cfg.batch)]
        out = run_block(blk, z[idx].to(device, dtype), kwargs)
        mse = ((out.float() - y[idx].to(device).float()) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        if adam is not None:
            adam.zero_grad(set_to_none=True)
        (mse / mse.detach().clamp_min(1e-30)).backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        if adam is not None:
            for group in adam.param_groups:
                group["lr"] = clip_lr
            adam.step()
        seconds = time.perf_counter() - t0
        loss = float(mse.detach())
        history.append({"block": layer, "step": step + 1, "loss": loss, "lr": lr, "seconds": seconds})
        yield Metric(
            "loss", done_steps + step + 1, loss, extra={"block": layer, "step": step + 1, "lr": lr, "seconds": seconds}
        )
        yield Progress(
            "layerwise",
            done_steps + step + 1,
            total_steps,
            seconds,
            f"block {layer + 1}/{arch.n_layers}, step {step + 1}/{cfg.steps}: MSE {loss:.4g}",
        )
    return blk, clips, history


# ---- the job ---------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def export_path(key: str, method: str) -> Path:
    """One file per run key: evaluation caches key on the file's content, but a path is never rewritten in place."""
    return store.cache_root() / "rotations" / f"{method}-layerwise-{key}.bin"


def train_layerwise(
    model: nn.Module,
    arch: ArchInfo,
    calib: torch.Tensor,
    cfg: LayerwiseConfig,
    key: str | None = None,
    device=None,
    probe=None,
):
    """Generator: per block, Progress and Metric("loss") per step (extra: block, step, lr, seconds) and
    Metric("block_mse", k, MSE of the trained block over all windows, extra: first_loss, clips); Done(LayerwiseResult).

    calib [N, T] token windows. device: where each block trains (default: CUDA if available); the model and every
    block's inputs stay on the CPU. probe(k, z): called with block k's inputs before it trains (tests)."""
    arch.check_learnable()
    if arch.n_experts:
        raise ValueError(
            "layer-wise training covers dense MLPs: in a mixture of experts each expert's R4 and clip "
            "ratios would learn from the few tokens routed to it; use the end-to-end mode"
        )
    if calib.dim() != 2 or calib.shape[0] < cfg.batch or calib.shape[1] < 2:
        raise ValueError(f"calibration windows must be [N >= batch, T >= 2], got {tuple(calib.shape)}")
    block = min(cfg.block, arch.intermediate)
    if cfg.method == "flrot":
        check_block_divides(arch.intermediate, block)
    device = torch.device(device) if device is not None else default_device()
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rots = LearnedRotations(arch, cfg.method, block, cfg.seed).requires_grad_(True)
    if rots.r4 is None:  # spinquant's fixed R3/R4 are read by every block: on the device once
        rots.r3_fixed, rots.r4_fixed = rots.r3_fixed.to(device), rots.r4_fixed.to(device)
    fp = prepare_fp(model, arch, rots.r1.weight.detach())
    dtype = torch.float64 if next(fp.parameters()).dtype == torch.float64 else torch.float32  # float32 at least
    store_dtype = next(fp.parameters()).dtype
    yield Progress("layerwise", 0, arch.n_layers * cfg.steps, 0.0, "embedding the calibration windows")
    x, kwargs = block_inputs(fp, arch, calib, cfg.batch, store_dtype)  # X_0 [N, T, hidden] on the CPU
    kwargs = _to(kwargs, device, dtype)
    z = x.clone() if cfg.inputs == "quantized" else x  # Z_0 = X_0
    y = torch.empty_like(x)
    result = LayerwiseResult(cfg.to_dict(), "")
    total = arch.n_layers * cfg.steps
    clips_per_layer = []
    for k in range(arch.n_layers):
        if probe is not None:
            probe(k, z)
        fp_block = arch.layer(fp, k)
        on_device = copy.deepcopy(fp_block).to(device, dtype)
        stream(on_device, x, y, kwargs, cfg.batch, device, dtype)  # Y_k = f_k(X_k)
        del on_device
        blk, clips, history = yield from train_block(
            fp_block, arch, rots, k, z, y, kwargs, cfg, device, dtype, t0, total, k * cfg.steps
        )
        with parametrize.cached():  # the rotated, quantized weights once for all windows
            if cfg.inputs == "quantized":
                mse = stream(blk, z, z, kwargs, cfg.batch, device, dtype, target=y)  # Z_{k+1} = g_k(Z_k)
            else:
                mse = stream(blk, x, torch.empty_like(x), kwargs, cfg.batch, device, dtype, target=y)
        ratios = clips.values() if clips is not None else None
        clips_per_layer.append(ratios)
        for m in layer_modules(rots, k):
            m.to("cpu")
        del blk, clips
        x, y = y, x  # X_{k+1} = Y_k; the old X is the next Y
        if cfg.inputs == "fp":
            z = x
        result.history += history
        seconds = time.perf_counter() - t0
        result.blocks.append(
            {"block": k, "first_loss": history[0]["loss"], "mse": mse, "seconds": seconds, "clips": ratios}
        )
        yield Metric("block_mse", k, mse, extra={"first_loss": history[0]["loss"], "clips": ratios})
    rs = rots.rotation_set()
    if cfg.clip == "learned":
        rs.clips = clips_per_layer
    path = export_path(key or uuid.uuid4().hex[:16], cfg.method)
    save_rotations(rs, path)
    result.path, result.seconds = str(path), time.perf_counter() - t0
    result.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    yield Done(result, seconds=result.seconds)


def run_key(model_fingerprint: str, corpus_fingerprint: str, cfg: LayerwiseConfig) -> str:
    return store.make_key(
        kind="layerwise", model=model_fingerprint, corpus=corpus_fingerprint, cfg=cfg.to_dict(), code=CODE_VERSION
    )


def layerwise_job(handle, cfg: LayerwiseConfig, use_cache: bool = True, device=None):
    """train_layerwise() on a loaded model (engine.model.loading.ModelHandle), calibration windows from the calib
    split (seeded random positions); a finished run is cached under cache/layerwise/ with its file."""
    from engine.data.corpus import load_corpus, windows

    handle.arch.check_learnable()  # before any data work
    bits = cfg.parsed_bits
    if bits.w >= 16 and bits.a >= 16 and bits.kv >= 16:
        raise ValueError("at 16-16-16 the network is rotation invariant: nothing to learn; train at 4-4-4")
    if cfg.method == "flrot":
        check_block_divides(handle.arch.intermediate, min(cfg.block, handle.arch.intermediate))
    if handle.dispatched:
        raise ValueError("layer-wise training streams one block at a time itself: load the model without a device map")
    corpus = load_corpus(cfg.corpus)
    key = run_key(handle.fingerprint, corpus.fingerprint, cfg)
    hit = store.load("layerwise", key) if use_cache else None
    if hit is not None and Path(hit[0]["path"]).exists():
        yield Done(LayerwiseResult(**hit[0]), seconds=hit[0]["seconds"], cached=True)
        return
    window = min(cfg.window, handle.max_length)
    calib = windows(corpus, handle.tokenizer, cfg.windows * window, window, "calib", seed=cfg.seed)
    for ev in train_layerwise(handle.model, handle.arch, calib, cfg, key=key, device=device):
        if isinstance(ev, Done):
            store.save_json("layerwise", key, asdict(ev.result))
        yield ev
