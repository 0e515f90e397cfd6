"""OCP MX block floating point: MXFP4, MXFP6, MXFP8 (and the other elements)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.base import Format, NotExportable, Scales, check_block, e8m0_scales, e8m0_values
from engine.quant.formats.minifloat import ELEMENTS, minifloat_codes, minifloat_values

MX_REFUSED_DYNAMIC = (
    "compressed-tensors' dynamic MX scale rounds each block's max to the nearest power of two before taking its "
    "exponent (round_to_power_2: up once the mantissa reaches 1.75, or 1.9375 for E2M3), where the engine takes "
    "floor(log2 max) as OCP MX v1.0 does, so such blocks get twice the engine's scale"
)


@dataclass(frozen=True)
class MXFormat(Format):
    """OCP MX: one E8M0 power-of-two scale per block of 32 minifloats. Names mxfp4 (e2m1), mxfp6 (e2m3), mxfp8
    (e4m3); the other elements are named mxfp6_e3m2 / mxfp8_e5m2, and a block other than 32 adds 'b<block>'."""

    element: str = "e2m1"
    block: int = 32
    rule: ClassVar[str] = (
        "OCP Microscaling Formats (MX) v1.0, section 6.3: shared_exp = floor(log2 amax) - emax_elem, "
        "elements rounded to nearest even and saturated to the max normal."
    )
    summary: ClassVar[str] = "32 values share a power-of-two scale"
    CT_NAMES: ClassVar[dict] = {
        "e2m1": (4, "mxfp4-pack-quantized"),
        "e2m3": (6, "mxfp6-pack-quantized"),
        "e4m3": (8, "mxfp8-quantized"),
    }

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise ValueError(f"MX element must be one of {', '.join(ELEMENTS)}, got {self.element!r}")
        check_block(self.block)

    @property
    def group(self) -> int:
        return self.block

    @property
    def name(self) -> str:
        el = ELEMENTS[self.element]
        base = {"e2m1": "mxfp4", "e2m3": "mxfp6", "e4m3": "mxfp8"}.get(self.element, f"mxfp{el.bits}_{el.name}")
        return base if self.block == 32 else f"{base}b{self.block}"

    @property
    def kernel(self) -> str | None:  # type: ignore[override]
        return self.name if self.name in ("mxfp4", "mxfp8") else None

    @property
    def element_bits(self) -> int:
        return ELEMENTS[self.element].bits

    def bits_per_value(self, d: int) -> float:
        return ELEMENTS[self.element].bits + 8 / self.block  # nominal: the padding of a ragged block is ignored

    def fit(self, groups, clip, context, search) -> Scales:
        return e8m0_scales(groups, clip, ELEMENTS[self.element].emax)

    def elements(self, groups, scales, context) -> Tensor:
        return ELEMENTS[self.element].round(groups / scales.value)

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements * scales.value

    def to_codes(self, elements: Tensor) -> Tensor:
        return minifloat_codes(elements, ELEMENTS[self.element])

    def from_codes(self, codes: Tensor) -> Tensor:
        return minifloat_values(codes, ELEMENTS[self.element])

    def load_scales(self, stored: Tensor) -> Tensor:
        return e8m0_values(stored)

    def ct_weights(self) -> tuple[dict, str]:
        if self.block != 32 or self.element not in self.CT_NAMES:
            raise NotExportable("compressed-tensors holds MX weights as mxfp4/mxfp6/mxfp8 in blocks of 32 only")
        bits, name = self.CT_NAMES[self.element]
        return dict(
            num_bits=bits,
            type="float",
            strategy="group",
            group_size=32,
            symmetric=True,
            scale_dtype=torch.uint8,
            zp_dtype=torch.uint8,
        ), name

    def ct_input_activations(self) -> dict:
        raise NotExportable(MX_REFUSED_DYNAMIC)
