"""OCP MX MXINT8: 8-bit integer elements sharing one E8M0 scale per block of 32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.base import Format, NotExportable, Scales, check_block, e8m0_scales, e8m0_values


@dataclass(frozen=True)
class MXINT8Format(Format):
    """OCP MX MXINT8: one E8M0 power-of-two scale per block of 32 signed 8-bit integers with an implicit scale of
    2^-6, i.e. elements k / 64 for integers k. The shared exponent is the MX rule with emax_elem = 0 (the largest
    element magnitude lies in [1, 2)): shared_exp = floor(log2 amax); k = x / 2^shared_exp * 64 rounded to nearest
    even and saturated to [-127, 127], as the microxcaling reference does (max_norm = 127/64 for either sign: the
    grid stays odd-symmetric and code -128 is never written)."""

    block: int = 32
    rule: ClassVar[str] = (
        "OCP Microscaling Formats (MX) v1.0: MXINT8, INT8 elements with an implicit scale 2^-6 (emax_elem 0), "
        "shared_exp = floor(log2 amax), elements rounded to nearest even and saturated to +-127/64."
    )
    summary: ClassVar[str] = "32 8-bit integers share a power-of-two scale"
    emax: ClassVar[int] = 0
    implicit: ClassVar[float] = 64.0  # 2^6: the element k means k / 64

    def __post_init__(self) -> None:
        check_block(self.block)

    @property
    def group(self) -> int:
        return self.block

    @property
    def name(self) -> str:
        return "mxint8" if self.block == 32 else f"mxint8b{self.block}"

    def bits_per_value(self, d: int) -> float:
        return 8 + 8 / self.block

    def fit(self, groups, clip, context, search) -> Scales:
        return e8m0_scales(groups, clip, self.emax)

    def elements(self, groups, scales, context) -> Tensor:
        return torch.round(groups / scales.value * self.implicit).clamp(-127, 127)  # powers of two: exact products

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements / self.implicit * scales.value

    def to_codes(self, elements: Tensor) -> Tensor:
        return elements.to(torch.int8)

    def from_codes(self, codes: Tensor) -> Tensor:
        return codes.float()

    def load_scales(self, stored: Tensor) -> Tensor:
        return e8m0_values(stored)

    def ct_weights(self) -> tuple[dict, str]:
        raise NotExportable(
            "compressed-tensors 0.20.1 has no MXINT8 scheme (its MX formats are mxfp4, mxfp6 and "
            "mxfp8, with float elements)"
        )

    def ct_input_activations(self) -> dict:
        raise NotExportable("compressed-tensors 0.20.1 has no MXINT8 scheme for dynamic activations or KV cache")
