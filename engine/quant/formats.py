"""Number formats as types: integer grids, OCP MX (block floating point and MXINT8), NVIDIA NVFP4, per-row FP8.

A format is one class (a subclass of Format) that carries everything the rest of SpinScope asks of it:
- `encode(x) -> Encoded` (codes, scales, and NVFP4's global scale) and `decode(encoded) -> values`; fake
  quantization is decode(encode(x)) with the identity gradient (straight_through);
- `column_rounder(weight)`: the per-column rounding GPTQ needs, on the format's own grid;
- `ct_weights` / `ct_input_activations` / `ct_kv_cache`: its compressed-tensors description for export, or a
  NotExportable carrying the reason;
- `kernel`: the name of the Triton kernel format that writes its codes (kernels/block_quant.py), if one exists.
REGISTRY lists the named formats; everything else (parse_format, bit settings, help texts, export) reads it, so a
new format is its class, its tests and one line in REGISTRY.

Every format quantizes along the last dim of x [..., d] (a ragged last block is padded with zeros, which never
changes a block's scale, and cut back), computes in float32 and returns x's dtype. Codes are the integers of an
integer grid (int8/int16) or the sign/exponent/mantissa bit patterns of a minifloat element (uint8, equal to
torch's float8 bit patterns for e4m3/e5m2). A negative value that rounds to zero keeps its sign bit (code 0x8 in
E2M1), as a hardware cast does.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from engine.quant.quantizers import (
    QuantGrid,
    check_clip_ratio,
    find_grid,
    integer_range,
    merge_groups,
    search_clip_grid,
    split_groups,
    straight_through,
)

E8M0_MIN, E8M0_MAX, E8M0_BIAS = -127, 127, 127


@dataclass(frozen=True)
class Element:
    """A minifloat element format with IEEE-like subnormals, no inf/NaN used (we saturate at max_normal)."""

    name: str
    exp_bits: int
    man_bits: int
    max_normal: float
    emax: int  # exponent of the largest normal: the MX scale puts a block's amax in [2^emax, 2^(emax+1))

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    def round(self, x: Tensor) -> Tensor:
        return round_minifloat(x, self.exp_bits, self.man_bits, self.max_normal)


ELEMENTS = {
    e.name: e
    for e in (
        Element("e2m1", 2, 1, 6.0, 2),
        Element("e2m3", 2, 3, 7.5, 2),
        Element("e3m2", 3, 2, 28.0, 4),
        Element("e4m3", 4, 3, 448.0, 8),  # OCP FP8 "fn": 0x7F is NaN, so 480 is not a value
        Element("e5m2", 5, 2, 57344.0, 15),
    )
}
E2M1, E4M3 = ELEMENTS["e2m1"], ELEMENTS["e4m3"]


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2 a) as int32 for a > 0, exact (frexp; log2 may round up just below a power of two)."""
    return torch.frexp(a).exponent - 1


def round_minifloat(x: Tensor, exp_bits: int, man_bits: int, max_normal: float) -> Tensor:
    """Nearest value of the minifloat format (ties to even, subnormals), saturating to +-max_normal; float32."""
    x = x.float()
    a = x.abs()
    emin = 2 - 2 ** (exp_bits - 1)  # 1 - bias; subnormals share the spacing of the smallest normal binade
    step = torch.exp2((floor_log2(a).clamp(min=emin) - man_bits).float())  # a power of two: a / step is exact
    q = (torch.round(a / step) * step).clamp(max=max_normal)  # inf overflows to inf and saturates too
    return torch.copysign(q, x)


def minifloat_codes(v: Tensor, element: Element) -> Tensor:
    """uint8 bit patterns (sign | exponent | mantissa) of v rounded to `element` (RNE, saturating)."""
    r = element.round(v)
    a = r.abs()
    emin = 1 - element.bias
    e = floor_log2(a).clamp(min=emin)
    normal = a >= 2.0**emin
    mant = (a / torch.exp2((e - element.man_bits).float())).to(torch.int32)  # exact integer
    mant = torch.where(normal, mant - 2**element.man_bits, mant)
    exp_field = torch.where(normal, e + element.bias, 0)
    sign = torch.signbit(r).to(torch.int32) << (element.exp_bits + element.man_bits)
    return (sign | (exp_field << element.man_bits) | mant).to(torch.uint8)


def minifloat_values(codes: Tensor, element: Element) -> Tensor:
    """float32 values of uint8 codes of `element` (codes never holding NaN, as minifloat_codes writes them)."""
    c = codes.to(torch.int32)
    m = element.man_bits
    exp_field = (c >> m) & (2**element.exp_bits - 1)
    mant = (c & (2**m - 1)).float()
    normal = exp_field > 0
    power = torch.where(normal, exp_field - element.bias, 1 - element.bias) - m
    mag = torch.where(normal, mant + 2**m, mant) * torch.exp2(power.float())
    negative = ((c >> (element.exp_bits + m)) & 1) == 1
    return torch.where(negative, -mag, mag)


def e2m1_codes(v: Tensor) -> Tensor:
    """E2M1 codes 0..15: bit 3 sign, bits 2-1 exponent, bit 0 mantissa; codes 0-7 are 0,.5,1,1.5,2,3,4,6."""
    return minifloat_codes(v, E2M1)


def e2m1_values(codes: Tensor) -> Tensor:
    return minifloat_values(codes, E2M1)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes [..., 2k] in 0..15 -> bytes [..., k], element 2i in the low nibble (compressed-tensors/vLLM)."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2 or bool((codes > 15).any()):
        raise ValueError("pack_nibbles needs uint8 codes in 0..15 with an even last dim")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_nibbles: bytes [..., k] -> uint8 codes [..., 2k]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


class NotExportable(ValueError):
    """What compressed-tensors cannot express of a format, with the format's own one-sentence reason."""


@dataclass(eq=False)
class Encoded:
    """x [..., d] in one format: what encode and the weight quantizers return, and what export writes.

    codes: [..., d padded to whole groups], int8/int16 integers or uint8 element bit patterns (see the top);
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
    def _quantize(self, x: Tensor, clip_ratio: Tensor | float, search: bool,
                  global_scale: Tensor | float | None) -> tuple[Tensor, Scales, Tensor | None]:
        """(elements [..., G, g], their Scales, the tensor's context) of x [..., d]."""
        xf = x.detach().float()
        context = self.context(xf, global_scale)
        groups = split_groups(xf, self.group)
        clip = clip_ratio.unsqueeze(-1) if torch.is_tensor(clip_ratio) else check_clip_ratio(clip_ratio)
        scales = self.fit(groups, clip, context, search)
        return self.elements(groups, scales, context), scales, context

    def encode(self, x: Tensor, clip_ratio: Tensor | float = 1.0, *, search: bool = False,
               global_scale: Tensor | float | None = None) -> Encoded:
        """Codes and scales of x [..., d]. clip_ratio: a float in (0, 1], or a tensor [..., 1] of one ratio per row
        of x; search: QuaRot's |err|^2.4 range search per group (integer grids only; ignored by formats whose
        scale follows a fixed rule)."""
        elements, scales, context = self._quantize(x, clip_ratio, search, global_scale)
        zero = None if scales.zero is None else scales.zero.squeeze(-1)
        return Encoded(self, self.to_codes(elements).flatten(-2), scales.stored.squeeze(-1), x.shape[-1], zero,
                       context)

    def decode(self, enc: Encoded) -> Tensor:
        """float32 values [..., d] of encoded codes and scales."""
        elements = split_groups(self.from_codes(enc.codes), self.group)
        zero = None if enc.zero is None else enc.zero.unsqueeze(-1)
        scales = Scales(self.load_scales(enc.scales).unsqueeze(-1), enc.scales.unsqueeze(-1), zero)
        return merge_groups(self.dequantize(elements, scales, enc.global_scale), enc.d)

    def fake_quantize(self, x: Tensor, clip_ratio: Tensor | float = 1.0,
                      global_scale: Tensor | float | None = None) -> Tensor:
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


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


def _e8m0_scales(groups: Tensor, clip: Tensor | float, emax: int) -> Scales:
    """OCP MX v1.0 section 6.3: shared_exp = floor(log2 amax) - emax of the element (-127 for an all-zero block),
    clamped to E8M0's [-127, 127]; stored as the E8M0 byte shared_exp + 127."""
    amax = groups.abs().amax(-1, keepdim=True) * clip
    shared = torch.where(amax > 0, floor_log2(amax) - emax, E8M0_MIN).clamp(E8M0_MIN, E8M0_MAX)
    return Scales(torch.exp2(shared.float()), (shared + E8M0_BIAS).to(torch.uint8))


def _e8m0_values(stored: Tensor) -> Tensor:
    return torch.exp2(stored.to(torch.int32).float() - E8M0_BIAS)


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
            _check_block(self.group)
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
            raise NotExportable("asymmetric integer weights have a zero point per group, and SpinScope exports "
                                "symmetric integer weights only (per row or per group)")
        if self.bits > 8:
            raise NotExportable(f"{self.bits}-bit weights cannot be exported: pack-quantized holds 1- to 8-bit "
                                "integers")
        return dict(num_bits=self.bits, type="int", symmetric=True, group_size=self.group,
                    strategy="group" if self.group else "channel"), "pack-quantized"

    def ct_weight_tensors(self, enc: Encoded, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        # the scale in the checkpoint's dtype first, then q * scale: what compressed-tensors will dequantize
        scale = enc.scales.to(scale_dtype)
        codes = split_groups(self.from_codes(enc.codes).to(scale_dtype), self.group)
        return {"weight": merge_groups(codes * scale.unsqueeze(-1), enc.d), "weight_scale": scale}

    def ct_input_activations(self) -> dict:
        # compressed-tensors' asymmetric quantizer does our float32 operations in our order (quantizers.py's top)
        if self.symmetric or self.group is not None:
            raise NotExportable("only per-token (per-head) asymmetric integer grids map to compressed-tensors' "
                                "dynamic integer quantizers with SpinScope's float32 operations")
        return dict(num_bits=self.bits, type="int", symmetric=False, strategy="token", dynamic=True)

    def ct_kv_cache(self, head_dim: int) -> dict:
        if self.symmetric or self.group not in (None, head_dim):
            raise NotExportable("only per-head asymmetric integer grids map to compressed-tensors' dynamic KV-cache "
                                "quantizers with SpinScope's float32 operations")
        return dict(num_bits=self.bits, type="int", symmetric=False, strategy="group", group_size=head_dim,
                    dynamic=True)


MX_REFUSED_DYNAMIC = (
    "compressed-tensors' dynamic MX scale rounds each block's max to the nearest power of two before taking its "
    "exponent (round_to_power_2: up once the mantissa reaches 1.75, or 1.9375 for E2M3), where the engine takes "
    "floor(log2 max) as OCP MX v1.0 does, so such blocks get twice the engine's scale")


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
    CT_NAMES: ClassVar[dict] = {"e2m1": (4, "mxfp4-pack-quantized"), "e2m3": (6, "mxfp6-pack-quantized"),
                                "e4m3": (8, "mxfp8-quantized")}

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise ValueError(f"MX element must be one of {', '.join(ELEMENTS)}, got {self.element!r}")
        _check_block(self.block)

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
        return _e8m0_scales(groups, clip, ELEMENTS[self.element].emax)

    def elements(self, groups, scales, context) -> Tensor:
        return ELEMENTS[self.element].round(groups / scales.value)

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements * scales.value

    def to_codes(self, elements: Tensor) -> Tensor:
        return minifloat_codes(elements, ELEMENTS[self.element])

    def from_codes(self, codes: Tensor) -> Tensor:
        return minifloat_values(codes, ELEMENTS[self.element])

    def load_scales(self, stored: Tensor) -> Tensor:
        return _e8m0_values(stored)

    def ct_weights(self) -> tuple[dict, str]:
        if self.block != 32 or self.element not in self.CT_NAMES:
            raise NotExportable("compressed-tensors holds MX weights as mxfp4/mxfp6/mxfp8 in blocks of 32 only")
        bits, name = self.CT_NAMES[self.element]
        return dict(num_bits=bits, type="float", strategy="group", group_size=32, symmetric=True,
                    scale_dtype=torch.uint8, zp_dtype=torch.uint8), name

    def ct_input_activations(self) -> dict:
        raise NotExportable(MX_REFUSED_DYNAMIC)


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
        _check_block(self.block)

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
        return dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                    scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn), "nvfp4-pack-quantized"

    def ct_weight_tensors(self, enc: Encoded, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        # compressed-tensors divides by its global scale 448 * 6 / amax where the engine multiplies by g
        return {**super().ct_weight_tensors(enc), "weight_global_scale": 1 / enc.global_scale}

    def ct_input_activations(self) -> dict:
        raise NotExportable(
            "compressed-tensors' NVFP4 activations divide by a stored, calibrated input_global_scale (only the "
            "block scales are dynamic), where the engine recomputes the per-tensor scale amax / (6 * 448) from "
            "every tensor it quantizes")


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
        amax = groups.abs().amax(-1, keepdim=True) if self.axis_per_row else groups.abs().amax().expand(
            groups.shape[:-1] + (1,))
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
            raise NotExportable("compressed-tensors' FP8 schemes scale per row (channel, token); fp8_tensor's one "
                                "scale per tensor is not exported")

    def ct_weights(self) -> tuple[dict, str]:
        self._per_row()
        return dict(num_bits=8, type="float", strategy="channel", symmetric=True), "float-quantized"

    def ct_input_activations(self) -> dict:  # FP8_DYNAMIC's per-token E4M3, scale amax / 448
        self._per_row()
        return dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)

    def ct_kv_cache(self, head_dim: int) -> dict:  # the same per token and head
        self._per_row()
        return dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=head_dim, dynamic=True)


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
        _check_block(self.block)

    @property
    def group(self) -> int:
        return self.block

    @property
    def name(self) -> str:
        return "mxint8" if self.block == 32 else f"mxint8b{self.block}"

    def bits_per_value(self, d: int) -> float:
        return 8 + 8 / self.block

    def fit(self, groups, clip, context, search) -> Scales:
        return _e8m0_scales(groups, clip, self.emax)

    def elements(self, groups, scales, context) -> Tensor:
        return torch.round(groups / scales.value * self.implicit).clamp(-127, 127)  # powers of two: exact products

    def dequantize(self, elements, scales, context) -> Tensor:
        return elements / self.implicit * scales.value

    def to_codes(self, elements: Tensor) -> Tensor:
        return elements.to(torch.int8)

    def from_codes(self, codes: Tensor) -> Tensor:
        return codes.float()

    def load_scales(self, stored: Tensor) -> Tensor:
        return _e8m0_values(stored)

    def ct_weights(self) -> tuple[dict, str]:
        raise NotExportable("compressed-tensors 0.20.1 has no MXINT8 scheme (its MX formats are mxfp4, mxfp6 and "
                            "mxfp8, with float elements)")

    def ct_input_activations(self) -> dict:
        raise NotExportable("compressed-tensors 0.20.1 has no MXINT8 scheme for dynamic activations or KV cache")


# The named formats: parse_format, bit settings, help texts, the matrix page and export all read this list.
REGISTRY: tuple[Format, ...] = (
    MXFormat("e2m1"),
    MXFormat("e2m3"),
    MXFormat("e4m3"),
    NVFP4Format(),
    FP8Format(),
    MXINT8Format(),
)
FORMATS: dict[str, Format] = {f.name: f for f in REGISTRY}
_INT_NAME = re.compile(r"int(\d+)(?:g(\d+))?(a?)")


def parse_format(text: str) -> Format | None:
    """'2'..'15' -> row-wise IntFormat, '16' -> None (no quantization), 'int4', 'int4g128', 'int4g128a' (asymmetric)
    -> IntFormat, or a name in FORMATS; case-insensitive. Anything else is a ValueError."""
    key = str(text).strip().lower()
    if key in FORMATS:
        return FORMATS[key]
    if key.isascii() and key.isdigit() and 2 <= int(key) <= 16:
        return None if int(key) == 16 else IntFormat(int(key))
    match = _INT_NAME.fullmatch(key)
    if match and 2 <= int(match[1]) <= 15 and (match[2] is None or int(match[2]) > 0):
        group = None if match[2] is None else int(match[2])
        return IntFormat(int(match[1]), group=group, symmetric=not match[3])
    raise ValueError(
        f"unknown number format {text!r}: expected a bit width 2..16 (16 = no quantization), intB or intBgG with an "
        f"optional 'a' for asymmetric (e.g. int4, int4g128), or one of {', '.join(FORMATS)}"
    )


def describe_formats() -> str:
    """The named formats for help texts: 'mxfp4 (32 values share ...), ..., int4g128 (...)'."""
    by_summary: dict[str, list[str]] = {}
    for f in REGISTRY:
        by_summary.setdefault(f.summary, []).append(f.name)
    return ", ".join(f"{', '.join(names)} ({summary})" for summary, names in by_summary.items()) + (
        f", {IntFormat.summary}")
