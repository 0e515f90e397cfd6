"""What every number format is (Format), what it encodes to (Encoded) and GPTQ's view of it (ColumnRounder)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.formats.minifloat import E8M0_BIAS, E8M0_MAX, E8M0_MIN, floor_log2, pack_nibbles
from engine.quant.quantizers import check_clip_ratio, merge_groups, split_groups, straight_through


class NotExportable(ValueError):
    """What compressed-tensors cannot express of a format, with the format's own one-sentence reason."""


@dataclass(eq=False)
class Encoded:
    """x [..., d] in one format: what encode and the weight quantizers return, and what export writes.

    codes: [..., d padded to whole groups], int8/int16 integers or uint8 element bit patterns (engine.quant.formats);
    scales: [..., groups] in the format's stored form (float32, or uint8 E8M0 / E4M3 bit patterns);
    zero: [..., groups] float32 zero points of an asymmetric integer grid, else None;
    global_scale: NVFP4's per-tensor FP32 scale g (0-dim), else None."""

    fmt: Format
    codes: Tensor
    scales: Tensor
    d: int
    zero: Tensor | None = None
    global_scale: Tensor | None = None

    def dequantize(self) -> Tensor:
        return self.fmt.decode(self)


@dataclass
class Scales:
    """One fitted grid of a group of values (shapes [..., G, 1]): the scale the elements are rounded against (its
    float32 value), its stored form, and an asymmetric grid's zero point."""

    value: Tensor
    stored: Tensor
    zero: Tensor | None = None


class Format(ABC):
    """A number format along the last dim. Subclasses give the four primitives below (fit scales to groups,
    round groups to elements, elements <-> codes, dequantize) and their compressed-tensors description."""

    rule: ClassVar[str]  # the convention followed, with its source
    summary: ClassVar[str]  # one phrase for help texts
    kernel: ClassVar[str | None] = None  # kernels/block_quant.py's name for a kernel writing these codes, if any

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def group(self) -> int | None:
        """Values sharing one scale along the last dim (None: the whole row)."""

    @abstractmethod
    def bits_per_value(self, d: int) -> float: ...

    # ---- the primitives, on groups [..., G, g] of float32 values
    @abstractmethod
    def fit(self, groups: Tensor, clip: Tensor | float, context: Tensor | None, search: bool) -> Scales:
        """The scales of each group; `clip` shrinks the range they come from ([..., 1, 1] or a float)."""

    @abstractmethod
    def elements(self, groups: Tensor, scales: Scales, context: Tensor | None) -> Tensor:
        """The elements (integers, or minifloat values) nearest to groups on the fitted grid, float32."""

    @abstractmethod
    def dequantize(self, elements: Tensor, scales: Scales, context: Tensor | None) -> Tensor: ...

    @abstractmethod
    def to_codes(self, elements: Tensor) -> Tensor: ...

    @abstractmethod
    def from_codes(self, codes: Tensor) -> Tensor: ...

    def load_scales(self, stored: Tensor) -> Tensor:
        """The float32 scale of a stored one (the identity where the stored form is the float32 value)."""
        return stored

    def context(self, x: Tensor, global_scale: Tensor | float | None = None) -> Tensor | None:
        """What is fixed for a whole tensor before its groups are quantized (NVFP4: g); None for most formats."""
        if global_scale is not None:
            raise ValueError(f"{self.name} has no global scale; pass global_scale=None")
        return None

    # ---- built on the primitives
    def _quantize(
        self, x: Tensor, clip_ratio: Tensor | float, search: bool, global_scale: Tensor | float | None
    ) -> tuple[Tensor, Scales, Tensor | None]:
        """(elements [..., G, g], their Scales, the tensor's context) of x [..., d]."""
        xf = x.detach().float()
        context = self.context(xf, global_scale)
        groups = split_groups(xf, self.group)
        clip = clip_ratio.unsqueeze(-1) if torch.is_tensor(clip_ratio) else check_clip_ratio(clip_ratio)
        scales = self.fit(groups, clip, context, search)
        return self.elements(groups, scales, context), scales, context

    def encode(
        self,
        x: Tensor,
        clip_ratio: Tensor | float = 1.0,
        *,
        search: bool = False,
        global_scale: Tensor | float | None = None,
    ) -> Encoded:
        """Codes and scales of x [..., d]. clip_ratio: a float in (0, 1], or a tensor [..., 1] of one ratio per row
        of x; search: QuaRot's |err|^2.4 range search per group (integer grids only; ignored by formats whose
        scale follows a fixed rule)."""
        elements, scales, context = self._quantize(x, clip_ratio, search, global_scale)
        zero = None if scales.zero is None else scales.zero.squeeze(-1)
        return Encoded(self, self.to_codes(elements).flatten(-2), scales.stored.squeeze(-1), x.shape[-1], zero, context)

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values [..., d] of encoded codes and scales."""
        elements = split_groups(self.from_codes(enc.codes), self.group)
        zero = None if enc.zero is None else enc.zero.unsqueeze(-1)
        scales = Scales(self.load_scales(enc.scales).unsqueeze(-1), enc.scales.unsqueeze(-1), zero)
        return merge_groups(self.dequantize(elements, scales, enc.global_scale), enc.d)

    def fake_quantize(
        self, x: Tensor, clip_ratio: Tensor | float = 1.0, global_scale: Tensor | float | None = None
    ) -> Tensor:
        """decode(encode(x)) in x's dtype, with the identity gradient. It skips the codes themselves (elements ->
        codes -> elements is the identity, tests/engine/quant/test_formats.py checks it for every format): packing
        bit patterns on every forward pass made activation quantization about 4x slower."""
        elements, scales, context = self._quantize(x, clip_ratio, False, global_scale)
        return straight_through(x, merge_groups(self.dequantize(elements, scales, context), x.shape[-1]))

    def column_rounder(self, weight: Tensor, search: bool = False) -> ColumnRounder:
        return ColumnRounder(self, weight, search)

    @property
    def element_bits(self) -> int:
        """Bits of one code (4-bit codes are packed two per byte)."""
        return 8

    def kernel_encode(self, y: Tensor, global_scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(codes, scales) in the layout the Triton kernel `self.kernel` writes: 4-bit codes packed two per byte."""
        enc = self.encode(y, global_scale=global_scale)
        return (pack_nibbles(enc.codes) if self.element_bits == 4 else enc.codes), enc.scales

    # ---- compressed-tensors (0.20.1) descriptions for export
    def ct_weights(self) -> tuple[dict, str]:
        """(QuantizationArgs keywords of `weights`, compression format) that hold exactly these weights."""
        raise NotExportable(f"compressed-tensors has no scheme holding {self.name} weights")

    def ct_weight_tensors(self, enc: Encoded, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """What compressed-tensors is given for weight codes [out, in]: the dequantized weight (which it rounds
        back to exactly these codes), weight_scale [out, groups] float32 and, for NVFP4, weight_global_scale."""
        return {"weight": self.decode(enc), "weight_scale": self.load_scales(enc.scales)}

    def ct_input_activations(self) -> dict:
        """QuantizationArgs keywords of a dynamic per-token input quantizer computing what this format does."""
        raise NotExportable(f"compressed-tensors has no dynamic quantizer computing {self.name} as SpinScope does")

    def ct_kv_cache(self, head_dim: int) -> dict:
        """QuantizationArgs keywords of a dynamic KV-cache quantizer (per token and head) computing this format."""
        return self.ct_input_activations()


class ColumnRounder:
    """GPTQ's view of a format: `fit(columns [out, k])` fixes each row's scales for one group of columns (a block,
    a group, or the whole row when the format's group is None), `round(w)` rounds a column of w onto that grid,
    and `encoded(elements)` assembles the weight's codes with the scales fitted, so the error feedback works on
    the format's own grid. A whole-tensor context (NVFP4's g) is taken from the weight before any column moves.
    For static groups (act_order), fit every group first, then `select` the group of each column."""

    def __init__(self, fmt: Format, weight: Tensor, search: bool = False) -> None:
        self.fmt, self.search, self.group = fmt, search, fmt.group
        self.context = fmt.context(weight.detach().float())
        self.fitted: list[Scales] = []
        self.current: Scales | None = None

    def fit(self, columns: Tensor) -> None:
        self.current = self.fmt.fit(columns.detach().float().unsqueeze(-2), 1.0, self.context, self.search)
        self.fitted.append(self.current)

    def select(self, index: int) -> None:
        self.current = self.fitted[index]

    def round(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(elements, values) of one column w [out] (float32) on the current group's grid."""
        if self.current is None:
            raise ValueError("ColumnRounder.fit(columns) must be called before round(w)")
        col = w.float()[:, None, None]
        elements = self.fmt.elements(col, self.current, self.context)
        return elements[:, 0, 0], self.fmt.dequantize(elements, self.current, self.context)[:, 0, 0]

    def encoded(self, elements: Tensor) -> Encoded:
        """The Encoded weight of elements [out, in] (column order) with the scales of every group fitted."""
        codes = self.fmt.to_codes(split_groups(elements, self.group)).flatten(-2)
        stored = torch.cat([s.stored for s in self.fitted], dim=-2).squeeze(-1)
        zeros = [s.zero for s in self.fitted]
        zero = None if zeros[0] is None else torch.cat(zeros, dim=-2).squeeze(-1)
        return Encoded(self.fmt, codes, stored, elements.shape[-1], zero, self.context)


def check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


def e8m0_scales(groups: Tensor, clip: Tensor | float, emax: int) -> Scales:
    """OCP MX v1.0 section 6.3: shared_exp = floor(log2 amax) - emax of the element (-127 for an all-zero block),
    clamped to E8M0's [-127, 127]; stored as the E8M0 byte shared_exp + 127."""
    amax = groups.abs().amax(-1, keepdim=True) * clip
    shared = torch.where(amax > 0, floor_log2(amax) - emax, E8M0_MIN).clamp(E8M0_MIN, E8M0_MAX)
    return Scales(torch.exp2(shared.float()), (shared + E8M0_BIAS).to(torch.uint8))


def e8m0_values(stored: Tensor) -> Tensor:
    return torch.exp2(stored.to(torch.int32).float() - E8M0_BIAS)
