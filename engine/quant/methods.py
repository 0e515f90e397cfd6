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

from engine.quant.formats import Encoded, Format, IntFormat
from engine.quant.gptq import gptq_encode
from engine.quant.qrazor import ROLE_BASE_BITS, dequantize, qrazor_fake_quant, quantize_absmax

if TYPE_CHECKING:
    from engine.quant.recipes import Recipe

TensorFn = Callable[[Tensor], Tensor]
ClipFn = Callable[[Tensor, float], Tensor]  # (x, clip ratio) -> fake-quantized x
FP_BITS = 16  # a setting of 16 bits leaves that tensor in floating point
QRAZOR_GROUP = 16  # integers sharing one razoring flag (the paper's group size)


# ---- weights ---------------------------------------------------------------------------------------------------
def weight_format(spec: int | Format, recipe: Recipe) -> Format:
    """The format of a weight setting: a bit width is the symmetric per-row (or the recipe's per-group) integer
    grid; a named format (engine.quant.formats, as Bits holds it) is itself, quantized along the input dim."""
    return spec if isinstance(spec, Format) else IntFormat(spec, group=recipe.w_group)


def activation_format(spec: int | Format) -> Format | None:
    """A bit width is the per-token asymmetric integer grid; None at 16 bits (floating point)."""
    if isinstance(spec, Format):
        return spec
    return None if spec == FP_BITS else IntFormat(spec, symmetric=False)


def kv_format(spec: int | Format, head_dim: int) -> Format | None:
    """A bit width is the asymmetric integer grid per head (groups of head_dim along K's and V's last dim)."""
    if isinstance(spec, Format):
        return spec
    return None if spec == FP_BITS else IntFormat(spec, group=head_dim, symmetric=False)


class RTNWeights:
    """Round to nearest per output row (or per group, or in a named format), optionally with QuaRot's clipping
    search (integer grids). Returns the weight's codes and scales (Encoded)."""

    needs_calibration = False

    def check(self, bits: int | Format) -> None:
        """Refuse a setting this method cannot honour (before any work)."""

    def quantize(self, w: Tensor, bits: int | Format, recipe: Recipe) -> Encoded:
        return weight_format(bits, recipe).encode(w, search=recipe.weight_range_search)


class GPTQWeights(RTNWeights):
    """GPTQ on the same grid as RTN (integers, or a floating-point format's grid with its group scales fixed per
    group), given the Hessian of the layer's calibration inputs."""

    needs_calibration = True

    def quantize_with_hessian(
        self, w: Tensor, hessian: Tensor, bits: int | Format, recipe: Recipe, damp: float = 0.01, block: int = 128
    ) -> Encoded:
        rounder = weight_format(bits, recipe).column_rounder(w, search=recipe.weight_range_search)
        return gptq_encode(w, hessian, rounder, damp=damp, block=block)


class QRazorWeights:
    """QRazor: per-row absmax integers at the weight base precision, razored (SDR) to the requested bits. Returns
    the dequantized weight: SDR's per-group shift flags are no format's codes and scales."""

    needs_calibration = False

    def check(self, bits: int | Format) -> None:
        _check_integer(bits)
        if bits < FP_BITS:
            qrazor_target("weight", bits)

    def quantize(self, w: Tensor, bits: int, recipe: Recipe) -> Tensor:
        return qrazor(w, "weight", bits, per_channel=True)


# ---- activations and the KV cache -------------------------------------------------------------------------------
class RTNActivations:
    """Per-token asymmetric activations and per-head asymmetric K and V (bit widths), or a named format along the
    last dim; each with a clip ratio (the recipe's fixed one, or a calibrated one per site)."""

    calibrates = True  # its clip ratios can be chosen per layer (engine.quant.calibrate)

    def activation_quant(self, bits: int | Format) -> ClipFn | None:
        fmt = activation_format(bits)
        return None if fmt is None else fmt.fake_quantize

    def kv_quant(self, bits: int | Format, head_dim: int) -> ClipFn | None:
        fmt = kv_format(bits, head_dim)
        return None if fmt is None else fmt.fake_quantize

    def activation_fn(self, bits: int | Format, recipe: Recipe, ratio: float | None = None) -> TensorFn | None:
        quant = self.activation_quant(bits)
        if quant is None:
            return None
        ratio = recipe.clip.activation if ratio is None else ratio
        return lambda x: quant(x, ratio)

    def kv_fn(self, bits: int | Format, recipe: Recipe, head_dim: int, ratio: float | None = None) -> TensorFn | None:
        quant = self.kv_quant(bits, head_dim)
        if quant is None:
            return None
        ratio = recipe.clip.kv if ratio is None else ratio
        return lambda x: quant(x, ratio)


class QRazorActivations:
    """QRazor's absmax base integers (A16, KV8), razored when the requested bits are below the base."""

    calibrates = False  # SDR keeps the leading bits: no clip ratio to choose

    def activation_fn(self, bits: int | Format, recipe: Recipe, ratio: float | None = None) -> TensorFn | None:
        _check_integer(bits)
        qrazor_target("activation", bits)  # refuse an impossible setting before any forward pass
        return lambda x: qrazor(x, "activation", bits)  # at 16 bits: the 16-bit base integers

    def kv_fn(self, bits: int | Format, recipe: Recipe, head_dim: int, ratio: float | None = None) -> TensorFn | None:
        _check_integer(bits)
        if bits >= FP_BITS:
            return None
        # refuse before any weight is quantized, not in the middle of a forward pass
        if qrazor_target("kv", bits) is not None and head_dim % QRAZOR_GROUP:
            raise ValueError(
                f"qrazor razors K and V in groups of {QRAZOR_GROUP} along each head, but this model's "
                f"head_dim is {head_dim}; keep the KV cache at 16 bits (e.g. 4-4-16)"
            )
        return lambda x: qrazor(x, "kv", bits)


def _check_integer(bits: int | Format) -> None:
    if isinstance(bits, Format):
        raise ValueError(f"qrazor razors integers: its bits must be bit widths (e.g. 4-4-4), got the format {bits!r}")


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
    raise ValueError(
        f"qrazor {name} bits must be below its {base}-bit base precision (razored), {base} (base "
        f"integers only) or 16 (floating point), got {bits}"
    )


def qrazor(x: torch.Tensor, role: str, bits: int, group: int = QRAZOR_GROUP, per_channel: bool = False) -> torch.Tensor:
    """Base-precision absmax integers of the role; razored to `bits` when below the base (QRazor's W4A4KV4)."""
    base = ROLE_BASE_BITS[role]
    target = qrazor_target(role, bits)
    if target is None:
        q, scale = quantize_absmax(x.float(), base, per_channel=per_channel)
        return dequantize(q, scale).to(x.dtype)
    return qrazor_fake_quant(x, base, target_bits=target, group_size=group, per_channel=per_channel)
