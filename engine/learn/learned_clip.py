"""Learnable clip ratios for the asymmetric activation and KV quantizers (FlatQuant's learnable clipping,
OmniQuant's LWC): one scalar per quantizer site, trained with Adam beside the rotations.

The ratio is sigmoid-parametrised, r = sigmoid(theta), so every value the optimizer reaches lies in (0, 1]
(in float32, sigmoid saturates to exactly 1.0 above theta ~ 17, and stays above 0 down to theta ~ -87; theta is
clamped to [-THETA_BOUND, THETA_BOUND], where r >= 4e-18). "No clipping" (1.0) has no finite theta: a start at 1.0
begins at sigmoid(INIT_CAP) = 0.9975, which clips nothing a 4-bit grid can see (its step is 1/15 of the range).

The quantizer is the one of engine.quant.quantizers.quantize_activation / quantize_kv (same grid, same order of
float32 operations), written once more only where it must differ: the ratio carries a gradient (through the scale
and the zero point), and rounding is straight-through. The token range max/min is detached, and clipped values pass
no gradient to x (PACT/LSQ's choice); inside the range the gradient w.r.t. x is the identity, as the fixed
quantizers' STE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from engine.quant.quantizers import integer_range

INIT_CAP = 6.0  # theta of a start at 1.0: sigmoid(6) = 0.9975
THETA_BOUND = 40.0  # sigmoid(-40) = 4e-18 > 0 and sigmoid(40) = 1.0 in float32


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def clip_fake_quant(x: Tensor, bits: int, ratio: Tensor) -> Tensor:
    """Asymmetric per-row fake quantization of x [..., d] over its last dim (a token, or one head of K or V), the
    range scaled by `ratio` (a 0-d tensor with a gradient). Float32 inside, x's dtype out."""
    qmin, qmax = integer_range(bits, symmetric=False)
    xf = x.float()
    zeros = torch.zeros((), device=x.device)
    xmin = torch.minimum(xf.detach().amin(-1, keepdim=True), zeros) * ratio  # [..., 1], <= 0
    xmax = torch.maximum(xf.detach().amax(-1, keepdim=True), zeros) * ratio  # [..., 1], >= 0
    scale = (xmax - xmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    zero = torch.clamp(_round_ste(qmin - xmin / scale), qmin, qmax)
    q = torch.clamp(_round_ste(xf / scale + zero), qmin, qmax)
    return (scale * (q - zero)).to(x.dtype)


def ratio_logit(ratio: float) -> float:
    """theta with sigmoid(theta) = ratio; a ratio of 1.0 (or above sigmoid(INIT_CAP)) starts at INIT_CAP."""
    if not 0 < ratio <= 1:
        raise ValueError(f"a clip ratio must be in (0, 1] (1.0 = no clipping), got {ratio!r}")
    return min(math.log(ratio / (1 - ratio)) if ratio < 1 else INIT_CAP, INIT_CAP)


class ClipRatios(nn.Module):
    """One learnable clip ratio per named site; `ratio(site)` is a 0-d tensor in (0, 1]."""

    def __init__(self, initial: dict[str, float]):
        super().__init__()
        self.sites = tuple(initial)
        self.theta = nn.Parameter(torch.tensor([ratio_logit(r) for r in initial.values()], dtype=torch.float32))

    def ratio(self, site: str) -> Tensor:
        return torch.sigmoid(self.theta.clamp(-THETA_BOUND, THETA_BOUND)[self.sites.index(site)])

    def values(self) -> dict[str, float]:
        with torch.no_grad():
            return {s: float(self.ratio(s)) for s in self.sites}
