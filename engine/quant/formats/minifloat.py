"""Minifloat elements (E2M1, E2M3, E3M2, E4M3, E5M2) and their codes: round to nearest even with subnormals,
saturating; codes are sign | exponent | mantissa bit patterns (torch's float8 ones for e4m3/e5m2), and a negative
value that rounds to zero keeps its sign bit (code 0x8 in E2M1), as a hardware cast does. E8M0 is the MX scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
