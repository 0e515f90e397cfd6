"""Number formats as types: integer grids, OCP MX (block floating point), NVIDIA NVFP4 and per-row FP8.

Every format fake-quantizes along the last dim of x [..., d] (a ragged last block is padded with zeros, which
never changes a block's scale, and cut back), computes in float32, returns x's dtype and has the identity
gradient (straight_through). The encoders produce the bytes a packing kernel must write: codes are the
sign/exponent/mantissa bit patterns of the element format, equal to torch's float8 bit patterns for e4m3/e5m2.
A negative value that rounds to zero keeps its sign bit (code 0x8 in E2M1), as a hardware cast does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from engine.quant.quantizers import QuantSpec, check_clip_ratio, merge_groups, split_groups, straight_through
from engine.quant.quantizers import fake_quantize as int_fake_quantize

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


class Format(Protocol):
    rule: ClassVar[str]

    @property
    def name(self) -> str: ...

    def fake_quantize(self, x: Tensor, clip_ratio: float = 1.0) -> Tensor: ...

    def bits_per_value(self, d: int) -> float: ...


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer grid per row (group None) or per group of the last dim; name 'int4', 'int4g128', and an
    'a' suffix when asymmetric ('int4a', 'int4g128a'). Bits 2..15: 16 is "no quantization", i.e. no format."""

    bits: int
    group: int | None = None
    symmetric: bool = True
    rule: ClassVar[str] = "Round-to-nearest integer grid of the GPTQ/QuaRot/SpinQuant code (see quantizers.py)."

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 15:
            raise ValueError(f"IntFormat bits must be 2..15 (16 = no quantization, no format), got {self.bits!r}")
        self.spec()  # checks group and symmetric

    def spec(self, clip_ratio: float = 1.0) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, group_size=self.group, clip_ratio=clip_ratio)

    @property
    def name(self) -> str:
        group = "" if self.group is None else f"g{self.group}"
        return f"int{self.bits}{group}{'' if self.symmetric else 'a'}"

    def fake_quantize(self, x: Tensor, clip_ratio: float = 1.0) -> Tensor:
        return int_fake_quantize(x, self.spec(clip_ratio))

    def bits_per_value(self, d: int) -> float:
        per = d if self.group is None else self.group  # one fp16 scale (and a b-bit zero if asymmetric) per `per`
        return self.bits + (16 + (0 if self.symmetric else self.bits)) / per


@dataclass(frozen=True)
class MXFormat:
    """OCP MX: one E8M0 power-of-two scale per block of 32. Names mxfp4 (e2m1), mxfp6 (e2m3), mxfp8 (e4m3); the
    other elements are named mxfp6_e3m2 / mxfp8_e5m2, and a block other than 32 adds 'b<block>'."""

    element: str = "e2m1"
    block: int = 32
    rule: ClassVar[str] = (
        "OCP Microscaling Formats (MX) v1.0, section 6.3: shared_exp = floor(log2 amax) - emax_elem, "
        "elements rounded to nearest even and saturated to the max normal."
    )

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise ValueError(f"MX element must be one of {', '.join(ELEMENTS)}, got {self.element!r}")
        _check_block(self.block)

    @property
    def name(self) -> str:
        el = ELEMENTS[self.element]
        base = {"e2m1": "mxfp4", "e2m3": "mxfp6", "e4m3": "mxfp8"}.get(self.element, f"mxfp{el.bits}_{el.name}")
        return base if self.block == 32 else f"{base}b{self.block}"

    def bits_per_value(self, d: int) -> float:
        return ELEMENTS[self.element].bits + 8 / self.block  # nominal: the padding of a ragged block is ignored

    def _quantize(self, x: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """(element values [..., G, block], shared exponents int32 [..., G, 1], scales float32 [..., G, 1])."""
        el = ELEMENTS[self.element]
        groups = split_groups(x.detach().float(), self.block)
        amax = groups.abs().amax(-1, keepdim=True) * check_clip_ratio(clip_ratio)
        shared = torch.where(amax > 0, floor_log2(amax) - el.emax, E8M0_MIN).clamp(E8M0_MIN, E8M0_MAX)
        scale = torch.exp2(shared.float())
        return el.round(groups / scale), shared, scale

    def fake_quantize(self, x: Tensor, clip_ratio: float = 1.0) -> Tensor:
        v, _, scale = self._quantize(x, clip_ratio)
        return straight_through(x, merge_groups(v * scale, x.shape[-1]))

    def encode(self, x: Tensor, clip_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
        """(uint8 element codes [..., d padded to the block], uint8 E8M0 scales [..., blocks] = shared_exp + 127)."""
        v, shared, _ = self._quantize(x, clip_ratio)
        codes = minifloat_codes(v, ELEMENTS[self.element]).flatten(-2)
        return codes, (shared + E8M0_BIAS).squeeze(-1).to(torch.uint8)

    def decode(self, codes: Tensor, scale_bits: Tensor, d: int) -> Tensor:
        v = split_groups(minifloat_values(codes, ELEMENTS[self.element]), self.block)
        scale = torch.exp2(scale_bits.to(torch.int32).float() - E8M0_BIAS).unsqueeze(-1)
        return merge_groups(v * scale, d)


@dataclass(frozen=True)
class NVFP4Format:
    """NVIDIA NVFP4: E2M1 values, one E4M3 scale per block of 16 and one FP32 scale g per tensor.

    g = amax(|x|) / (6 * 448) over the whole tensor (1 if x is all zero) unless given; block scale
    s = e4m3(amax_block * clip / (6 * g)); value v = e2m1(x / (s * g)); dequantized (v * s) * g, all float32 in
    this order (as TensorRT Model Optimizer does). A block whose s * g is 0 dequantizes to 0.
    """

    block: int = 16
    rule: ClassVar[str] = (
        "NVIDIA NVFP4 recipe: E2M1 elements, an E4M3 scale per 16 values and an FP32 per-tensor scale amax / (6 * 448)."
    )

    def __post_init__(self) -> None:
        _check_block(self.block)

    @property
    def name(self) -> str:
        return "nvfp4" if self.block == 16 else f"nvfp4b{self.block}"

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

    def _quantize(self, x: Tensor, clip_ratio: float, global_scale) -> tuple[Tensor, Tensor, Tensor]:
        """(E2M1 values [..., G, block], E4M3 block scales [..., G, 1], g 0-dim), all float32."""
        g = self.global_scale(x, global_scale)
        groups = split_groups(x.detach().float(), self.block)
        amax = groups.abs().amax(-1, keepdim=True) * check_clip_ratio(clip_ratio)
        s = E4M3.round(amax / (E2M1.max_normal * g))
        scale = s * g
        ok = scale > 0
        v = torch.where(ok, E2M1.round(groups / torch.where(ok, scale, 1.0)), 0.0)
        return v, s, g

    def fake_quantize(self, x: Tensor, clip_ratio: float = 1.0, global_scale: Tensor | float | None = None) -> Tensor:
        v, s, g = self._quantize(x, clip_ratio, global_scale)
        return straight_through(x, merge_groups(v * s * g, x.shape[-1]))

    def encode(
        self, x: Tensor, global_scale: Tensor | float | None = None, clip_ratio: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(uint8 E2M1 codes [..., d padded], uint8 float8_e4m3fn bits of the block scales [..., blocks], g)."""
        v, s, g = self._quantize(x, clip_ratio, global_scale)
        return e2m1_codes(v).flatten(-2), minifloat_codes(s, E4M3).squeeze(-1), g

    def decode(self, codes: Tensor, block_scales: Tensor, global_scale: Tensor | float, d: int) -> Tensor:
        v = split_groups(e2m1_values(codes), self.block)
        s = minifloat_values(block_scales, E4M3).unsqueeze(-1)
        return merge_groups(v * s * torch.as_tensor(global_scale, dtype=torch.float32), d)


@dataclass(frozen=True)
class FP8Format:
    """FP8 E4M3 with one FP32 scale per row (token / output channel): scale = amax_row * clip / 448 (1 for a zero
    row), x_hat = e4m3(x / scale) * scale. axis_per_row=False uses one scale for the whole tensor ('fp8_tensor')."""

    axis_per_row: bool = True
    rule: ClassVar[str] = "FP8 E4M3 (OCP 8-bit floating point, 'fn' variant) with a per-row FP32 amax / 448 scale."

    @property
    def name(self) -> str:
        return "fp8" if self.axis_per_row else "fp8_tensor"

    def bits_per_value(self, d: int) -> float:
        return E4M3.bits + (32 / d if self.axis_per_row else 0.0)

    def fake_quantize(self, x: Tensor, clip_ratio: float = 1.0) -> Tensor:
        xf = x.detach().float()
        amax = xf.abs().amax(-1, keepdim=True) if self.axis_per_row else xf.abs().amax()
        scale = amax * check_clip_ratio(clip_ratio) / E4M3.max_normal
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return straight_through(x, E4M3.round(xf / scale) * scale)


FORMATS: dict[str, Format] = {
    f.name: f for f in (MXFormat("e2m1"), MXFormat("e2m3"), MXFormat("e4m3"), NVFP4Format(), FP8Format())
}
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


class ColumnRounder:
    """GPTQ's view of a floating-point format: `fit(columns [out, k])` fixes each row's scale for one group of
    columns (MX and NVFP4: a block; FP8: the whole row), then `quantize(w)` rounds columns of w onto that grid, so
    the error feedback works on the format's own grid with group scales fixed per group. NVFP4's tensor scale g is
    taken from the whole weight before any column moves."""

    def __init__(self, fmt: Format, weight: Tensor) -> None:
        if isinstance(fmt, MXFormat):
            self.element, self.group = ELEMENTS[fmt.element], fmt.block
        elif isinstance(fmt, NVFP4Format):
            self.element, self.group = E2M1, fmt.block
            self.g = NVFP4Format.global_scale(weight)
        elif isinstance(fmt, FP8Format) and fmt.axis_per_row:
            self.element, self.group = E4M3, None
        else:
            raise ValueError(f"no column rounder for {fmt.name}: integer formats use GPTQ's integer grids")
        self.fmt, self.scale = fmt, None

    def fit(self, columns: Tensor) -> None:
        amax = columns.detach().float().abs().amax(-1, keepdim=True)  # [out, 1]
        if isinstance(self.fmt, MXFormat):  # the same rules as the format's own quantizer (see its classes)
            shared = torch.where(amax > 0, floor_log2(amax) - self.element.emax, E8M0_MIN).clamp(E8M0_MIN, E8M0_MAX)
            self.scale = torch.exp2(shared.float())
        elif isinstance(self.fmt, NVFP4Format):
            self.scale = E4M3.round(amax / (E2M1.max_normal * self.g)) * self.g
        else:
            self.scale = torch.where(amax > 0, amax / E4M3.max_normal, torch.ones_like(amax))

    def quantize(self, w: Tensor) -> Tensor:
        if self.scale is None:
            raise ValueError("ColumnRounder.fit(columns) must be called before quantize(w)")
        col = w.float().unsqueeze(-1) if w.dim() == 1 else w.float()
        ok = self.scale > 0
        q = torch.where(ok, self.element.round(col / torch.where(ok, self.scale, 1.0)) * self.scale, 0.0)
        return q.squeeze(-1) if w.dim() == 1 else q


def packed_encode(y: Tensor, fmt: str, global_scale=None) -> tuple[Tensor, Tensor]:
    """(codes, scale bytes) of y in the layout a packing kernel writes: 'mxfp4' and 'nvfp4' E2M1 codes packed two
    per byte, 'mxfp8' E4M3 bit patterns; the reference kernels/block_quant.py is checked against."""
    if fmt == "mxfp4":
        codes, scales = MXFormat("e2m1").encode(y)
        return pack_nibbles(codes), scales
    if fmt == "mxfp8":
        return MXFormat("e4m3").encode(y)
    codes, scales, _ = NVFP4Format().encode(y, global_scale=global_scale)
    return pack_nibbles(codes), scales
