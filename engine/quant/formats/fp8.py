"""FP8 E4M3 with one FP32 scale per row (or per tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.base import Format, NotExportable, Scales
from engine.quant.formats.minifloat import E4M3, minifloat_codes, minifloat_values


@dataclass(frozen=True)
class FP8Format(Format):
    """FP8 E4M3 with one FP32 scale per row (token / output channel): scale = amax_row * clip / 448 (1 for a zero
    row), x_hat = e4m3(x / scale) * scale. axis_per_row=False uses one scale for the whole tensor ('fp8_tensor')."""

    axis_per_row: bool = True
    rule: ClassVar[str] = "FP8 E4M3 (OCP 8-bit floating point, 'fn' variant) with a per-row FP32 amax / 448 scale."
    summary: ClassVar[str] = "one scale per row"

    @property
    def group(self) -> None:
        return None

    @property
    def name(self) -> str:
        return "fp8" if self.axis_per_row else "fp8_tensor"

    def bits_per_value(self, d: int) -> float:
        return E4M3.bits + (32 / d if self.axis_per_row else 0.0)

    def fit(self, groups, clip, context, search) -> Scales:
        amax = (
            groups.abs().amax(-1, keepdim=True)
            if self.axis_per_row
            else groups.abs().amax().expand(groups.shape[:-1] + (1,))
        )
        scale = amax * clip / E4M3.max_normal
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return Scales(scale, scale)

    def elements(self, groups, scales, context) -> Tensor:
        return E4M3.round(groups / scales.value)

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements * scales.value

    def to_codes(self, elements: Tensor) -> Tensor:
        return minifloat_codes(elements, E4M3)

    def from_codes(self, codes: Tensor) -> Tensor:
        return minifloat_values(codes, E4M3)

    def _per_row(self) -> None:
        if not self.axis_per_row:
            raise NotExportable(
                "compressed-tensors' FP8 schemes scale per row (channel, token); fp8_tensor's one "
                "scale per tensor is not exported"
            )

    def ct_weights(self) -> tuple[dict, str]:
        self._per_row()
        return dict(num_bits=8, type="float", strategy="channel", symmetric=True), "float-quantized"

    def ct_input_activations(self) -> dict:  # FP8_DYNAMIC's per-token E4M3, scale amax / 448
        self._per_row()
        return dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)

    def ct_kv_cache(self, head_dim: int) -> dict:  # the same per token and head
        self._per_row()
        return dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=head_dim, dynamic=True)
