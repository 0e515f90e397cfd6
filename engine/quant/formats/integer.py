"""Uniform integer grids (the GPTQ/QuaRot/SpinQuant ones of engine.quant.quantizers) as a format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.base import Encoded, Format, NotExportable, Scales, check_block
from engine.quant.quantizers import QuantGrid, find_grid, integer_range, merge_groups, search_clip_grid, split_groups


@dataclass(frozen=True)
class IntFormat(Format):
    """Uniform integer grid per row (group None) or per group of the last dim; name 'int4', 'int4g128', and an
    'a' suffix when asymmetric ('int4a', 'int4g128a'). Bits 2..15: 16 is "no quantization", i.e. no format.
    The grids and their float32 operations are engine.quant.quantizers' (find_grid, QuantGrid)."""

    bits: int
    group: int | None = None  # type: ignore[assignment]  # a field here; the other formats derive it
    symmetric: bool = True
    rule: ClassVar[str] = "Round-to-nearest integer grid of the GPTQ/QuaRot/SpinQuant code (see quantizers.py)."
    summary: ClassVar[str] = "intB or intBgG: B-bit integers per row or per group of G, 'a' for asymmetric"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 15:
            raise ValueError(f"IntFormat bits must be 2..15 (16 = no quantization, no format), got {self.bits!r}")
        if self.group is not None:
            check_block(self.group)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")

    @property
    def name(self) -> str:
        group = "" if self.group is None else f"g{self.group}"
        return f"int{self.bits}{group}{'' if self.symmetric else 'a'}"

    @property
    def element_bits(self) -> int:
        return self.bits

    def bits_per_value(self, d: int) -> float:
        per = d if self.group is None else self.group  # one fp16 scale (and a b-bit zero if asymmetric) per `per`
        return self.bits + (16 + (0 if self.symmetric else self.bits)) / per

    def fit(self, groups, clip, context, search) -> Scales:
        if search:
            grid = search_clip_grid(groups, self.bits, self.symmetric)
        else:
            grid = find_grid(groups, self.bits, self.symmetric, clip)
        return Scales(grid.scale, grid.scale, None if self.symmetric else grid.zero)

    def _grid(self, scales: Scales) -> QuantGrid:
        qmin, qmax = integer_range(self.bits, self.symmetric)
        zero = torch.zeros_like(scales.value) if scales.zero is None else scales.zero
        return QuantGrid(scale=scales.value, zero=zero, qmin=qmin, qmax=qmax)

    def elements(self, groups, scales, context) -> Tensor:
        return self._grid(scales).to_int(groups)

    def dequantize(self, elements, scales, context) -> Tensor:
        return self._grid(scales).dequantize(elements)

    def to_codes(self, elements: Tensor) -> Tensor:
        return elements.to(torch.int8 if self.bits <= 8 else torch.int16)

    def from_codes(self, codes: Tensor) -> Tensor:
        return codes.float()

    def ct_weights(self) -> tuple[dict, str]:
        if not self.symmetric:
            raise NotExportable(
                "asymmetric integer weights have a zero point per group, and SpinScope exports "
                "symmetric integer weights only (per row or per group)"
            )
        if self.bits > 8:
            raise NotExportable(
                f"{self.bits}-bit weights cannot be exported: pack-quantized holds 1- to 8-bit integers"
            )
        return dict(
            num_bits=self.bits,
            type="int",
            symmetric=True,
            group_size=self.group,
            strategy="group" if self.group else "channel",
        ), "pack-quantized"

    def ct_weight_tensors(self, enc: Encoded, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        # the scale in the checkpoint's dtype first, then q * scale: what compressed-tensors will dequantize
        scale = enc.scales.to(scale_dtype)
        codes = split_groups(self.from_codes(enc.codes).to(scale_dtype), self.group)
        return {"weight": merge_groups(codes * scale.unsqueeze(-1), enc.d), "weight_scale": scale}

    def ct_input_activations(self) -> dict:
        # compressed-tensors' asymmetric quantizer does our float32 operations in our order (quantizers.py's top)
        if self.symmetric or self.group is not None:
            raise NotExportable(
                "only per-token (per-head) asymmetric integer grids map to compressed-tensors' "
                "dynamic integer quantizers with SpinScope's float32 operations"
            )
        return dict(num_bits=self.bits, type="int", symmetric=False, strategy="token", dynamic=True)

    def ct_kv_cache(self, head_dim: int) -> dict:
        if self.symmetric or self.group not in (None, head_dim):
            raise NotExportable(
                "only per-head asymmetric integer grids map to compressed-tensors' dynamic KV-cache "
                "quantizers with SpinScope's float32 operations"
            )
        return dict(
            num_bits=self.bits, type="int", symmetric=False, strategy="group", group_size=head_dim, dynamic=True
        )
