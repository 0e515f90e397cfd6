"""Fake quantizers (quantize then dequantize) for weights, activations and the KV cache.

Conventions follow the SpinQuant / QuaRot code, with two deliberate differences noted below:

- Weights: per output channel (one row of W [out, in], HF layout y = x @ W.T) or per group of
  `group_size` input columns within a row; symmetric, round to nearest, optional clipping search.
- Activations: per token (over the last dim), asymmetric with a clip ratio and a zero point.
- KV cache: asymmetric, one group per head along the last dim (group = head_dim).

Integer grids:
- symmetric:  q in [-maxq, maxq] with maxq = 2^(b-1) - 1 and scale = absmax / maxq; x_hat = scale * q.
  The reference code clamps to [-(maxq+1), maxq]; the extra negative level is only reachable when the
  range is clipped, so we keep the grid odd-symmetric (quantize(-x) = -quantize(x)) instead.
- asymmetric: q in [-2^(b-1), 2^(b-1) - 1], scale = (xmax - xmin) / (2^b - 1),
  zero = round(-2^(b-1) - xmin / scale), q = round(x / scale + zero), x_hat = scale * (q - zero). As in the
  reference, the range always includes 0 (xmin <= 0 <= xmax), so 0 is exactly representable and zero padding of
  a ragged last group never changes a grid. The reference's grid is [0, 2^b - 1] with q = round(x / scale) + zero:
  the same values shifted by 2^(b-1), but we take compressed-tensors' signed grid and its order of float32
  operations (calculate_qparams, _quantize), so that its dynamic quantizers in an exported checkpoint round every
  value as we did (in float32 the two orders part on about 1e-7 of the values, at half steps).
bits = 16 means "no quantization": every function returns its input unchanged.

Every fake quantizer returns `x + (x_hat - x).detach()`: the forward value is x_hat and the gradient
w.r.t. x is the identity (straight-through estimator), so rotations can be trained through it.
Grids are computed in float32 and carry no gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 16
# Clipping search as in the QuaRot/GPTQ code: shrink factors 1.00, 0.99, ..., 0.21 of the range,
# keeping per row the one with the lowest sum |err|^2.4.
CLIP_SEARCH_GRID = 100
CLIP_SEARCH_STEPS = 80
CLIP_SEARCH_NORM = 2.4


def check_bits(bits: int) -> int:
    """Return bits if it is an int in 2..16, else raise a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits!r} (16 means no quantization)")
    return bits


def check_group_size(group_size: int | None) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None (whole row), got {group_size!r}")
    return group_size


def check_clip_ratio(clip_ratio: float) -> float:
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1] (1.0 = no clipping), got {clip_ratio!r}")
    return float(clip_ratio)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor kind (weights, activations or KV cache)."""

    bits: int  # 2..16; 16 means identity (no quantization)
    symmetric: bool  # True: q in [-maxq, maxq], no zero point; False: q in [-2^(b-1), 2^(b-1)-1] with zero point
    group_size: int | None = None  # None: one grid per row (last dim); else per group of this many values
    clip_ratio: float = 1.0  # shrink the range by this factor before quantizing (activations, KV)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_clip_ratio(self.clip_ratio)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")

    @property
    def is_identity(self) -> bool:
        return self.bits >= MAX_BITS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return cls(**data)


@dataclass(frozen=True)
class QuantGrid:
    """A uniform integer grid per row: scale and zero broadcast over the last dim of x."""

    scale: Tensor  # [..., 1] float32, > 0
    zero: Tensor  # [..., 1] float32 integers; 0 for symmetric grids
    qmin: int
    qmax: int

    def to_int(self, x: Tensor) -> Tensor:
        """Integer codes (as float32) of x, clamped to [qmin, qmax]."""
        return torch.round(x.float() / self.scale + self.zero).clamp(self.qmin, self.qmax)

    def dequantize(self, q: Tensor) -> Tensor:
        return self.scale * (q - self.zero)

    def round_trip(self, x: Tensor) -> Tensor:
        """Quantize then dequantize, float32, no gradient trick."""
        return self.dequantize(self.to_int(x))


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: [-(2^(b-1)-1), 2^(b-1)-1] or [-2^(b-1), 2^(b-1)-1]."""
    check_bits(bits)
    maxq = 2 ** (bits - 1) - 1
    return (-maxq, maxq) if symmetric else (-maxq - 1, maxq)


def find_grid(x: Tensor, bits: int, symmetric: bool, shrink: float | Tensor = 1.0) -> QuantGrid:
    """Per-row grid over the last dim of x [..., d]; the range is scaled by `shrink` (float or [..., 1])."""
    qmin, qmax = integer_range(bits, symmetric)
    x = x.detach().float()
    zeros = torch.zeros((), device=x.device)
    xmin = torch.minimum(x.amin(-1, keepdim=True), zeros) * shrink  # [..., 1], <= 0
    xmax = torch.maximum(x.amax(-1, keepdim=True), zeros) * shrink  # [..., 1], >= 0
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / qmax
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    # An all-zero row: any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.zeros_like(scale) if symmetric else torch.round(qmin - xmin / scale).clamp(qmin, qmax)
    return QuantGrid(scale=scale, zero=zero, qmin=qmin, qmax=qmax)


def clip_search_error(x: Tensor, grid: QuantGrid, buffer: Tensor | None = None) -> Tensor:
    """The clipping-search objective per row: sum over the last dim of |x_hat - x|^2.4, shape [...].

    The same operations as grid.round_trip, done in place in one float32 buffer of x's shape (pass `buffer` to
    reuse it across calls): the search runs 80 of these per weight, and allocating each step's six temporaries
    made it 2.5x slower on the CPU.
    """
    x = x.float()
    err = torch.div(x, grid.scale, out=buffer) if buffer is not None else x / grid.scale
    err.add_(grid.zero).round_().clamp_(grid.qmin, grid.qmax).sub_(grid.zero).mul_(grid.scale)
    return err.sub_(x).abs_().pow_(CLIP_SEARCH_NORM).sum(-1)


def search_clip_grid(x: Tensor, bits: int, symmetric: bool) -> QuantGrid:
    """Per row of x [..., d], the grid with shrink in 1.00, 0.99, ..., 0.21 of lowest sum |err|^2.4.

    Shrink 1.0 comes first and a later shrink must be strictly better, so the result is never worse
    than no clipping on this objective.
    """
    x = x.detach().float()
    best_shrink = torch.ones(x.shape[:-1] + (1,), device=x.device)
    best_error = torch.full(x.shape[:-1], float("inf"), device=x.device)
    buffer = torch.empty_like(x)
    for step in range(CLIP_SEARCH_STEPS):
        shrink = 1.0 - step / CLIP_SEARCH_GRID
        error = clip_search_error(x, find_grid(x, bits, symmetric, shrink), buffer)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_shrink[better] = shrink
    return find_grid(x, bits, symmetric, best_shrink)


def straight_through(x: Tensor, x_hat: Tensor) -> Tensor:
    """Forward value x_hat (cast to x's dtype), gradient w.r.t. x the identity."""
    return x + (x_hat.to(x.dtype) - x).detach()


def split_groups(x: Tensor, group_size: int | None) -> Tensor:
    """[..., d] -> [..., ceil(d / g), g], the ragged last group padded with zeros (harmless, see top)."""
    if group_size is None:
        return x.unsqueeze(-2)
    d = x.shape[-1]
    n_groups = -(-d // group_size)
    pad = n_groups * group_size - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[:-1] + (n_groups, group_size))


def merge_groups(x: Tensor, d: int) -> Tensor:
    """Inverse of split_groups: [..., G, g] -> [..., d]."""
    return x.flatten(-2)[..., :d]


def fake_quantize(x: Tensor, spec: QuantSpec, clip_search: bool = False) -> Tensor:
    """Fake-quantize x [..., d] per row of the last dim (or per group of it) as `spec` says; STE gradient.

    clip_search replaces spec.clip_ratio by the per-row (per-group) search of search_clip_grid.
    """
    if spec.is_identity:
        return x
    groups = split_groups(x.detach().float(), spec.group_size)  # [..., G, g]
    if clip_search:
        grid = search_clip_grid(groups, spec.bits, spec.symmetric)
    else:
        grid = find_grid(groups, spec.bits, spec.symmetric, spec.clip_ratio)
    x_hat = merge_groups(grid.round_trip(groups), x.shape[-1])
    return straight_through(x, x_hat)


# ---------------------------------------------------------------- weights


def _check_weight(W: Tensor) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"a weight must be a 2-D tensor [out, in] (HF layout y = x @ W.T), got {shape}")


def weight_grid(W: Tensor, bits: int, group_size: int | None = None, clip_search: bool = False) -> QuantGrid:
    """Symmetric grid of W [out, in]: scale and zero of shape [out, n_groups, 1] (n_groups = 1 per row)."""
    _check_weight(W)
    check_bits(bits)
    groups = split_groups(W.detach().float(), check_group_size(group_size))  # [out, G, g]
    if clip_search:
        return search_clip_grid(groups, bits, symmetric=True)
    return find_grid(groups, bits, symmetric=True)


def weight_scales(W: Tensor, bits: int, group_size: int | None = None, clip_search: bool = False) -> Tensor:
    """Scales [out, n_groups] (n_groups = ceil(in / group_size), 1 without groups) of quantize_weight."""
    return weight_grid(W, bits, group_size, clip_search).scale.squeeze(-1)


def quantize_weight(W: Tensor, bits: int, group_size: int | None = None, clip_search: bool = False) -> Tensor:
    """Round-to-nearest fake quantization of W [out, in]: symmetric, per row or per input-column group.

    Dequantized values are scale * q with integer q in [-(2^(b-1)-1), 2^(b-1)-1] and the scale of
    weight_scales(W, bits, group_size, clip_search). Same dtype as W, STE gradient.
    """
    _check_weight(W)
    spec = QuantSpec(bits=bits, symmetric=True, group_size=group_size)
    return fake_quantize(W, spec, clip_search=clip_search)


# ---------------------------------------------------------------- activations and KV cache


def quantize_activation(x: Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = False) -> Tensor:
    """Per-token fake quantization of x [..., d] over its last dim; asymmetric by default; STE gradient."""
    return fake_quantize(x, QuantSpec(bits=bits, symmetric=symmetric, clip_ratio=clip_ratio))


def quantize_kv(x: Tensor, bits: int, group_size: int, clip_ratio: float = 1.0) -> Tensor:
    """Asymmetric fake quantization of K or V x [..., d] in groups of `group_size` along the last dim.

    With x laid out [..., heads * head_dim] (or [..., head_dim]) and group_size = head_dim, each head
    of each token gets its own grid. STE gradient.
    """
    if group_size is None:
        raise ValueError("quantize_kv needs a group_size (normally head_dim), got None")
    return fake_quantize(x, QuantSpec(bits=bits, symmetric=False, group_size=group_size, clip_ratio=clip_ratio))
