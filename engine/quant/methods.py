"""Quantizers as types, looked up by the recipe's choice (torchao's handler-by-config pattern), not by if-chains.

A recipe names a weight method (rtn, gptq, qrazor) and an activation method (rtn, qrazor); `WEIGHT_METHODS` and
`ACTIVATION_METHODS` map those names to one small handler each. A new quantizer is one class and one table row.
engine.quant.apply walks the model and asks the handlers what to do with each weight, activation and K/V tensor.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.quant.gptq import gptq_quantize
from engine.quant.qrazor import ROLE_BASE_BITS, dequantize, qrazor_fake_quant, quantize_absmax
from engine.quant.quantizers import quantize_activation, quantize_kv, quantize_weight

if TYPE_CHECKING:
    from engine.quant.recipes import Recipe

TensorFn = Callable[[Tensor], Tensor]
FP_BITS = 16  # a setting of 16 bits leaves that tensor in floating point
QRAZOR_GROUP = 16  # integers sharing one razoring flag (the paper's group size)


# ---- weights ---------------------------------------------------------------------------------------------------
class RTNWeights:
    """Round to nearest per output row (or per group), optionally with QuaRot's clipping search."""

    needs_calibration = False

    def check(self, bits: int) -> None:
        """Refuse a setting this method cannot honour (before any work)."""

    def quantize(self, w: Tensor, bits: int, recipe: Recipe) -> Tensor:
        return quantize_weight(w, bits, group_size=recipe.w_group, clip_search=recipe.w_clip_search)


class GPTQWeights(RTNWeights):
    """GPTQ on the same grid as RTN, given the Hessian of the layer's calibration inputs."""

    needs_calibration = True

    def quantize_with_hessian(self, w: Tensor, hessian: Tensor, bits: int, recipe: Recipe, damp: float = 0.01,
                              block: int = 128) -> Tensor:
        return gptq_quantize(w, hessian, bits, group_size=recipe.w_group, damp=damp, block=block,
                             clip_search=recipe.w_clip_search)


class QRazorWeights:
    """QRazor: per-row absmax integers at the weight base precision, razored (SDR) to the requested bits."""

    needs_calibration = False

    def check(self, bits: int) -> None:
        if bits < FP_BITS:
            qrazor_target("weight", bits)

    def quantize(self, w: Tensor, bits: int, recipe: Recipe) -> Tensor:
        return qrazor(w, "weight", bits, per_channel=True)


# ---- activations and the KV cache -------------------------------------------------------------------------------
class RTNActivations:
    """Per-token asymmetric activations, per-head symmetric K and V, each with the recipe's clip ratio."""

    def activation_fn(self, bits: int, recipe: Recipe) -> TensorFn | None:
        if bits >= FP_BITS:
            return None
        return lambda x: quantize_activation(x, bits, clip_ratio=recipe.a_clip)

    def kv_fn(self, bits: int, recipe: Recipe, head_dim: int) -> TensorFn | None:
        if bits >= FP_BITS:
            return None
        return lambda x: quantize_kv(x, bits, head_dim, clip_ratio=recipe.kv_clip)


class QRazorActivations:
    """QRazor's absmax base integers (A16, KV8), razored when the requested bits are below the base."""

    def activation_fn(self, bits: int, recipe: Recipe) -> TensorFn | None:
        qrazor_target("activation", bits)  # refuse an impossible setting before any forward pass
        return lambda x: qrazor(x, "activation", bits)  # at 16 bits: the 16-bit base integers

    def kv_fn(self, bits: int, recipe: Recipe, head_dim: int) -> TensorFn | None:
        if bits >= FP_BITS:
            return None
        # refuse before any weight is quantized, not in the middle of a forward pass
        if qrazor_target("kv", bits) is not None and head_dim % QRAZOR_GROUP:
            raise ValueError(f"qrazor razors K and V in groups of {QRAZOR_GROUP} along each head, but this model's "
                             f"head_dim is {head_dim}; keep the KV cache at 16 bits (e.g. 4-4-16)")
        return lambda x: qrazor(x, "kv", bits)


WEIGHT_METHODS = {"rtn": RTNWeights(), "gptq": GPTQWeights(), "qrazor": QRazorWeights()}
ACTIVATION_METHODS = {"rtn": RTNActivations(), "qrazor": QRazorActivations()}


# ---- QRazor's base precision and target, per role ----------------------------------------------------------------
def qrazor_target(role: str, bits: int) -> int | None:
    """SDR target bits of a role's setting: below the base precision (engine.quant.qrazor.ROLE_BASE_BITS) it is
    razored to `bits`; at the base (or 16 for activations, whose base is 16) only the base integers are kept.
    Anything between base and 16 cannot be honoured (weights and KV have an 8-bit base) and is refused rather than
    silently run at 8 bits."""
    base = ROLE_BASE_BITS[role]
    if bits < base:
        return bits
    if bits == base:
        return None
    name = {"weight": "weight", "activation": "activation", "kv": "KV-cache"}[role]
    raise ValueError(f"qrazor {name} bits must be below its {base}-bit base precision (razored), {base} (base "
                     f"integers only) or 16 (floating point), got {bits}")


def qrazor(x: torch.Tensor, role: str, bits: int, group: int = QRAZOR_GROUP, per_channel: bool = False) -> torch.Tensor:
    """Base-precision absmax integers of the role; razored to `bits` when below the base (QRazor's W4A4KV4)."""
    base = ROLE_BASE_BITS[role]
    target = qrazor_target(role, bits)
    if target is None:
        q, scale = quantize_absmax(x.float(), base, per_channel=per_channel)
        return dequantize(q, scale).to(x.dtype)
    return qrazor_fake_quant(x, base, target_bits=target, group_size=group, per_channel=per_channel)
