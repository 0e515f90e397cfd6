"""The QRazor page's bit-by-bit view of one SDR group: each value's base integer, its magnitude bits split at the
razoring point into kept and dropped bits, the rounding, and the code and flag that sdr_encode stores. Display
only: the codes and flags are engine.quant.qrazor's, on the tensors of engine.observe.qrazor_compare."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from engine.observe.qrazor_compare import QRazorTensor, pad_to_groups
from engine.quant.qrazor import flag_bits, quantize_absmax, sdr_encode


@dataclass(frozen=True)
class GroupBits:
    """One SDR group, bit by bit. rows: one per value (see bit_table); the rest describes the group."""

    rows: pd.DataFrame
    group_or: int  # OR of the magnitudes
    or_bits: str  # the OR, base_bits - 1 digits
    razoring_point: int  # bit index (0 = LSB) of the OR's leading one; -1 for an all-zero group
    flag: int  # right shift applied to the group (the stored flag)
    flag_bits: int  # bits that store the flag
    stored_bits: int  # group_size * target_bits + flag_bits


def bit_table(tensor: QRazorTensor, row: int, group: int, group_size: int = 16, target_bits: int = 4) -> GroupBits:
    """Razor the base-precision integers of `tensor` and spell out one group of one row.

    Columns: channel, x, q (base integer), sign bit, magnitude bits as `leading zeros [kept] dropped` (the '[' is
    the razoring point), kept bits, dropped bits, rounding, code (signed stored value), flag, decoded q and
    decoded x (= decoded q * base scale). Codes and flags are those of sdr_encode on the whole row.
    """
    rows, d = tensor.values.shape
    if not 0 <= row < rows:
        raise ValueError(f"row must be in [0, {rows - 1}], got {row}")
    n_groups = math.ceil(d / group_size)
    if not 0 <= group < n_groups:
        raise ValueError(f"group must be in [0, {n_groups - 1}] ({d} values in groups of {group_size}), got {group}")
    base = tensor.base_bits
    q, scale = quantize_absmax(tensor.values, base, per_channel=tensor.per_channel)
    razored = sdr_encode(pad_to_groups(q[row : row + 1], group_size), base, target_bits, group_size)
    lo, hi = group * group_size, min((group + 1) * group_size, d)
    codes = razored.codes[0, lo:hi].tolist()
    shift = int(razored.flags[0, group])
    row_scale = float(scale[row] if tensor.per_channel else scale)
    width, kept = base - 1, target_bits - 1
    group_or = 0
    for v in q[row, lo:hi].tolist():
        group_or |= abs(v)
    table = []
    for ch, x, v, code in zip(
        range(lo, hi), tensor.values[row, lo:hi].tolist(), q[row, lo:hi].tolist(), codes, strict=False
    ):
        bits = format(abs(v), f"0{width}b")
        top = width - shift - kept  # digits above the kept window: zeros for every value of the group
        kept_str, dropped = bits[top : width - shift], bits[width - shift :]
        if not shift:
            rounding = "exact (nothing dropped)"
        elif kept_str == "1" * kept:
            rounding = "floor (kept bits all ones)"
        elif dropped[0] == "1":
            rounding = "round up (|code| + 1)"
        else:
            rounding = "round down"
        decoded_q = (1 if code >= 0 else -1) * (abs(code) << shift)
        table.append(
            {
                "channel": ch,
                "x": x,
                "q (base int)": v,
                "sign bit": "1 (−)" if v < 0 else "0 (+)",
                "magnitude bits": f"{bits[:top]}[{kept_str}]{dropped}",
                "kept": kept_str,
                "dropped": dropped or "none",
                "rounding": rounding,
                "code": code,
                "flag": shift,
                "decoded q": decoded_q,
                "decoded x": decoded_q * row_scale,
            }
        )
    fb = flag_bits(base, target_bits)
    return GroupBits(
        pd.DataFrame(table),
        group_or,
        format(group_or, f"0{width}b"),
        group_or.bit_length() - 1,
        shift,
        fb,
        group_size * target_bits + fb,
    )


def largest_group(tensor: QRazorTensor, group_size: int, skip_first_row: bool = True) -> tuple[int, int]:
    """(row, group) holding the largest |value| (the outlier a 4-bit grid struggles with); row 0 is skipped for
    activations by default (the attention sink)."""
    vals = tensor.values.abs()
    first = 1 if skip_first_row and tensor.row_name == "token" and vals.shape[0] > 1 else 0
    flat = int(vals[first:].argmax())
    row, col = divmod(flat, vals.shape[1])
    return row + first, col // group_size
