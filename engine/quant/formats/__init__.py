"""Number formats as types: integer grids, OCP MX (block floating point and MXINT8), NVIDIA NVFP4, per-row FP8.

A format is one class (a subclass of Format) that carries everything the rest of SpinScope asks of it:
- `encode(x) -> Encoded` (codes, scales, and NVFP4's global scale) and `decode(encoded) -> values`; fake
  quantization is decode(encode(x)) with the identity gradient (straight_through);
- `column_rounder(weight)`: the per-column rounding GPTQ needs, on the format's own grid;
- `ct_weights` / `ct_input_activations` / `ct_kv_cache`: its compressed-tensors description for export, or a
  NotExportable carrying the reason;
- `kernel`: the name of the Triton kernel format that writes its codes (kernels/block_quant.py), if one exists.
REGISTRY (below) lists the named formats; everything else (parse_format, bit settings, help texts, export) reads
it, so a new format is its class (a module here), its tests and one line in REGISTRY.

Every format quantizes along the last dim of x [..., d] (a ragged last block is padded with zeros, which never
changes a block's scale, and cut back), computes in float32 and returns x's dtype. Codes are the integers of an
integer grid (int8/int16) or the sign/exponent/mantissa bit patterns of a minifloat element (uint8, equal to
torch's float8 bit patterns for e4m3/e5m2). A negative value that rounds to zero keeps its sign bit (code 0x8 in
E2M1), as a hardware cast does.
"""

from __future__ import annotations

import re

from engine.quant.formats.base import ColumnRounder, Encoded, Format, NotExportable, Scales
from engine.quant.formats.fp8 import FP8Format
from engine.quant.formats.integer import IntFormat
from engine.quant.formats.minifloat import (
    E2M1,
    E4M3,
    E8M0_BIAS,
    E8M0_MAX,
    E8M0_MIN,
    ELEMENTS,
    Element,
    e2m1_codes,
    e2m1_values,
    floor_log2,
    minifloat_codes,
    minifloat_values,
    pack_nibbles,
    round_minifloat,
    unpack_nibbles,
)
from engine.quant.formats.mx import MXFormat
from engine.quant.formats.mxint8 import MXINT8Format
from engine.quant.formats.nvfp4 import NVFP4Format

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
        f", {IntFormat.summary}"
    )


# re-exported: the package is the one import path for formats, elements and codes
__all__ = [
    "E2M1",
    "E4M3",
    "E8M0_BIAS",
    "E8M0_MAX",
    "E8M0_MIN",
    "ELEMENTS",
    "ColumnRounder",
    "Element",
    "Encoded",
    "NotExportable",
    "Scales",
    "e2m1_codes",
    "e2m1_values",
    "floor_log2",
    "minifloat_codes",
    "minifloat_values",
    "pack_nibbles",
    "round_minifloat",
    "unpack_nibbles",
]
