"""Clip ratios calibrated per layer on the calibration split, chosen on the error that matters downstream.

Fixed ratios tuned on one model can flip a comparison on another (a KV clip of 0.95 on rotated keys took one
model's QuaRot from 138 to 1408). So each ratio is chosen here, on calibration data, from a small grid whose first
candidate is 1.0 (no clipping); a later candidate must be strictly better, so each choice is never worse than no
clipping on its local calibration objective:

- weights (RTN), per output row: the shrink of the row's range minimizing its output error ||(w_hat - w) X^T||^2
  over the calibration inputs X of that linear (not the weight's own error, which ignores which input channels
  carry energy);
- activations, per linear: the clip ratio of the per-token quantizer of its input minimizing ||(x_hat - x) W_hat^T||^2,
  the error of the linear's output with its quantized weight;
- keys, per layer: the ratio minimizing the error of the causal attention scores q k^T (q after RoPE and R3, as
  the quantizer sees k); values, per layer: V's own error (the attention output mixes values with weights that sum
  to one, so its error is bounded by theirs).

The inputs are a seeded sample of calibration tokens captured in one forward pass of the floating-point (rotated)
model, after any online rotation, as GPTQ calibrates in QuaRot.

Each choice is no worse than no clipping on its own local error only: the errors of many layers compound. The
plan is then checked end to end, and a layer's choices are kept only where they lower the quantized model's loss
on calibration windows (engine.quant.clip_check).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from engine.events import Progress
from engine.model import attention, dispatch
from engine.model.arch import ArchInfo

WEIGHT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
ACTIVATION_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
KV_GRID = (1.0, 0.975, 0.95, 0.9, 0.85)
SAMPLE_TOKENS = 256  # calibration tokens kept per linear input: the search costs rows x inputs x this per candidate
KV_TOKENS = 512  # tokens of K, V and Q kept per layer (whole windows: scores need positions)
WINDOWS = 4  # calibration windows run (at most): the sample is spread over them


@dataclass
class CalibrationInputs:
    """What the calibration forward pass saw: a token sample of each linear's input, and q, k, v per layer."""

    x: dict = field(default_factory=dict)  # (layer, role) -> [n, in] float32
    qkv: dict = field(default_factory=dict)  # layer -> list of (q, k, v) per window, [1, heads, T, head_dim]


@dataclass
class ClipPlan:
    """The chosen ratios: per-row weight shrinks, a ratio per linear input, and K and V ratios per layer."""

    weights: dict = field(default_factory=dict)  # (layer, role) -> [out] shrink per row
    activations: dict = field(default_factory=dict)  # (layer, role) -> ratio
    k: dict = field(default_factory=dict)  # layer -> ratio
    v: dict = field(default_factory=dict)
    check: dict | None = None  # the end-to-end check's losses, kept and reverted layers (engine.quant.clip_check)

    def summary(self, n_layers: int) -> dict:
        """JSON for rows and heat maps: per site a list over layers (weights: the rows' mean shrink; a layer the
        end-to-end check reverted shows 1.0), and under `check` per layer "kept", "reverted" or None (nothing
        clipped there, or no check ran)."""
        out = {}
        for kind, table in (("weights", self.weights), ("activations", self.activations)):
            roles = dict.fromkeys(role for _, role in table)
            out[kind] = {role: [_mean(table.get((i, role))) for i in range(n_layers)] for role in roles}
        for kind, table in (("k", self.k), ("v", self.v)):
            if table:
                out[kind] = [table.get(i) for i in range(n_layers)]
        if self.check is not None:
            verdict = {**dict.fromkeys(self.check["kept"], "kept"), **dict.fromkeys(self.check["reverted"], "reverted")}
            out["check"] = [verdict.get(i) for i in range(n_layers)]
        return out


def _mean(value) -> float | None:
    if value is None:
        return None
    return float(value.float().mean()) if torch.is_tensor(value) else float(value)


def capture_inputs(model: nn.Module, arch: ArchInfo, windows: Tensor, kv: bool, seed: int = 0):
    """Generator: one forward pass per calibration window (the first WINDOWS of [N, T]) with hooks on every linear's
    input (registered last, so after any online rotation) and, with `kv`, on q, k, v; Progress per window; returns
    the inputs."""
    windows = windows[: max(WINDOWS, -(-KV_TOKENS // windows.shape[1]))]
    n, t = windows.shape
    per_window = max(1, min(t, SAMPLE_TOKENS // n + 1))
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(t, generator=gen)[:per_window].sort().values for _ in range(n)]
    kv_windows = max(1, KV_TOKENS // t)
    got, current = CalibrationInputs(), [0]
    hooks, qkv_hooks = [], []
    for i in range(arch.n_layers):
        for role in arch.linears:

            def keep(m, args, key=(i, role)):
                x = args[0].detach()
                if x.dim() == 3 and x.shape[1] == t:  # a dense linear [1, T, in]: the sampled positions
                    rows = x[0, picks[current[0]].to(x.device)]
                else:  # an expert [routed, in] sees only its routed tokens: keep a share of them
                    rows = x.reshape(-1, x.shape[-1])[: max(1, x.shape[0] * per_window // t)]
                got.x.setdefault(key, []).append(rows.float().cpu())

            hooks.append(arch.module(model, role, i).register_forward_pre_hook(keep))
        if kv:

            def keep_qkv(module, q, k, v, layer=i):
                if current[0] < kv_windows:
                    got.qkv.setdefault(layer, []).append(
                        (q.detach().float().cpu(), k.detach().float().cpu(), v.detach().float().cpu())
                    )
                return q, k, v

            attention.install(model)
            attn = arch.module(model, "attn", i)
            attention.add_hook(attn, keep_qkv)
            qkv_hooks.append((attn, keep_qkv))
    device = dispatch.input_device(model)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for w in range(n):
                current[0] = w
                model(windows[w : w + 1].to(device), use_cache=False)
                yield Progress(
                    "calibrate", w + 1, n, time.perf_counter() - t0, f"calibration inputs, window {w + 1}/{n}"
                )
    finally:
        for h in hooks:
            h.remove()
        for attn, hook in qkv_hooks:
            attention.remove_hook(attn, hook)
    got.x = {key: torch.cat(parts)[:SAMPLE_TOKENS] for key, parts in got.x.items()}
    return got


def search_weight(w: Tensor, x: Tensor | None, fmt) -> tuple[Tensor, Tensor]:
    """Round to nearest of w [out, in] in `fmt` (engine.quant.formats: an integer grid or a microscaling format,
    whose clip ratio shrinks the range its scales come from) with, per row, the ratio of WEIGHT_GRID of least
    output error on inputs x [n, in]; returns (the quantized weight in float32, the chosen ratios [out]).
    Without inputs (an expert no calibration token reached): no clipping."""
    w = w.detach().float()
    shrink = torch.ones(w.shape[0], device=w.device)
    xt = x.to(w.device).T if x is not None and x.shape[0] else None
    best = best_err = None
    for ratio in WEIGHT_GRID if xt is not None else WEIGHT_GRID[:1]:
        w_hat = fmt.fake_quantize(w, clip_ratio=ratio)
        if xt is None:
            return w_hat, shrink
        err = ((w_hat - w) @ xt).pow(2).sum(1)  # [out]: each row's output error over the sampled tokens
        if best is None:
            best, best_err = w_hat, err
            continue
        better = err < best_err
        best = torch.where(better[:, None], w_hat, best)
        best_err = torch.where(better, err, best_err)
        shrink[better] = ratio
    return best, shrink


def search_activation(x: Tensor | None, w_hat: Tensor, quant) -> float:
    """The clip ratio of ACTIVATION_GRID for quant(x, ratio) (a per-token integer grid or a format) of least error
    of the linear's output x @ w_hat^T."""
    if x is None or not x.shape[0]:
        return 1.0
    x, w_hat = x.to(w_hat.device), w_hat.float()
    best, best_err = 1.0, None
    for ratio in ACTIVATION_GRID:
        err = float(((quant(x, ratio) - x) @ w_hat.T).pow(2).sum())
        if best_err is None or err < best_err:
            best, best_err = ratio, err
    return best


def _causal_scores(q: Tensor, k: Tensor) -> Tensor:
    """q k^T per query head (k repeated over its group of query heads), masked to j <= i."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-1, -2)).tril()


def search_kv(qkv: list, quant) -> tuple[float, float]:
    """(K ratio, V ratio) from KV_GRID for quant(x, ratio): K on the causal attention scores' error, V on its own."""
    best_k, best_v, err_k, err_v = 1.0, 1.0, None, None
    for ratio in KV_GRID:
        ek = ev = 0.0
        for q, k, v in qkv:
            ek += float(_causal_scores(q, quant(k, ratio) - k).pow(2).sum())
            ev += float((quant(v, ratio) - v).pow(2).sum())
        if err_k is None or ek < err_k:
            best_k, err_k = ratio, ek
        if err_v is None or ev < err_v:
            best_v, err_v = ratio, ev
    return best_k, best_v
