"""NVIDIA NVFP4: E2M1 elements, E4M3 block scales and an FP32 tensor scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.base import Encoded, Format, NotExportable, Scales, check_block
from engine.quant.formats.minifloat import E2M1, E4M3, minifloat_codes, minifloat_values


@dataclass(frozen=True)
class NVFP4Format(Format):
    """NVIDIA NVFP4: E2M1 values, one E4M3 scale per block of 16 and one FP32 scale g per tensor.

    g = amax(|x|) / (6 * 448) over the whole tensor (1 if x is all zero) unless given; block scale
    s = e4m3(amax_block * clip / (6 * g)); value v = e2m1(x / (s * g)); dequantized (v * s) * g, all float32 in
    this order (as TensorRT Model Optimizer does). A block whose s * g is 0 dequantizes to 0.
    """

    block: int = 16
    rule: ClassVar[str] = (
        "NVIDIA NVFP4 recipe: E2M1 elements, an E4M3 scale per 16 values and an FP32 per-tensor scale amax / (6 * 448)."
    )
    summary: ClassVar[str] = "16 share an FP8 scale"

    def __post_init__(self) -> None:
        check_block(self.block)

    @property
    def group(self) -> int:
        return self.block

    @property
    def name(self) -> str:
        return "nvfp4" if self.block == 16 else f"nvfp4b{self.block}"

    @property
    def kernel(self) -> str | None:  # type: ignore[override]
        return "nvfp4" if self.block == 16 else None

    @property
    def element_bits(self) -> int:
        return E2M1.bits

    def bits_per_value(self, d: int) -> float:
        return E2M1.bits + 8 / self.block  # the one FP32 scale per tensor is ignored

    @staticmethod
    def global_scale(x: Tensor, global_scale: Tensor | float | None = None) -> Tensor:
        """The per-tensor FP32 scale g (0-dim float32): amax(|x|) / (6 * 448), 1 for an all-zero x, or the one given."""
        if global_scale is None:
            amax = x.detach().float().abs().amax()
            return torch.where(amax > 0, amax / (E2M1.max_normal * E4M3.max_normal), torch.ones_like(amax))
        g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if g.numel() != 1 or not bool(torch.isfinite(g).all() & (g > 0).all()):
            raise ValueError(f"global_scale must be one finite positive number, got {global_scale!r}")
        return g.reshape(())

    def context(self, x: Tensor, global_scale: Tensor | float | None = None) -> Tensor:
        return self.global_scale(x, global_scale)

    def fit(self, groups, clip, context, search) -> Scales:
        amax = groups.abs().amax(-1, keepdim=True) * clip
        s = E4M3.round(amax / (E2M1.max_normal * context))
        return Scales(s, minifloat_codes(s, E4M3))

    def elements(self, groups, scales, context) -> Tensor:
        scale = scales.value * context
        ok = scale > 0
        return torch.where(ok, E2M1.round(groups / torch.where(ok, scale, 1.0)), 0.0)

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements * scales.value * context

    def to_codes(self, elements: Tensor) -> Tensor:
        return minifloat_codes(elements, E2M1)

    def from_codes(self, codes: Tensor) -> Tensor:
        return minifloat_values(codes, E2M1)

    def load_scales(self, stored: Tensor) -> Tensor:
        return minifloat_values(stored, E4M3)

    def ct_weights(self) -> tuple[dict, str]:
        if self.block != 16:
            raise NotExportable("compressed-tensors holds NVFP4 weights in blocks of 16 only")
        return dict(
            num_bits=4,
            type="float",
            strategy="tensor_group",
            group_size=16,
            symmetric=True,
            scale_dtype=torch.float8_e4m3fn,
            zp_dtype=torch.float8_e4m3fn,
        ), "nvfp4-pack-quantized"

    def ct_weight_tensors(self, enc: Encoded, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        # compressed-tensors divides by its global scale 448 * 6 / amax where the engine multiplies by g
        return {**super().ct_weight_tensors(enc), "weight_global_scale": 1 / enc.global_scale}

    def ct_input_activations(self) -> dict:
        raise NotExportable(
            "compressed-tensors' NVFP4 activations divide by a stored, calibrated input_global_scale (only the "
            "block scales are dynamic), where the engine recomputes the per-tensor scale amax / (6 * 448) from "
            "every tensor it quantizes"
        )
