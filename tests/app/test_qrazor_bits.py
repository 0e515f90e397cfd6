"""The QRazor page's bit-by-bit view of one SDR group (app/qrazor_bits.py): every column of the table agrees with
engine.quant.qrazor's sdr_encode / sdr_decode on the same row, zero and all-ones groups are labelled, and the page
starts at the group holding the largest value outside the sink row."""

import pytest
import torch

from app.qrazor_bits import bit_table, largest_group
from engine.observe.qrazor_compare import QRazorTensor
from engine.quant.qrazor import flag_bits, quantize_absmax, sdr_decode, sdr_encode


def _activation(rows=8, d=64, seed=0, outlier_channel=5, outlier=40.0) -> QRazorTensor:
    """Gaussian activations with one outlier channel, an all-zero group (row 2, group 1) and a group whose
    razored code is all ones (row 3, group 2: the row's largest value is the tensor's absmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    x[:, outlier_channel] *= outlier
    x[2, 16:32] = 0.0
    x[3, 32] = float(x.abs().max()) * 1.0
    return QRazorTensor("test activation", x, "activation", False, "token", d)


def _weight(out=16, d=64, seed=1) -> QRazorTensor:
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed)) * 0.05
    return QRazorTensor("test weight", w, "weight", True, "output channel", d)


@pytest.mark.parametrize("make,g", [(_activation, 16), (_activation, 8), (_weight, 16), (_weight, 32)])
def test_bit_table_rows_match_sdr_encode(make, g):
    t = make()
    base = t.base_bits
    q, scale = quantize_absmax(t.values, base, per_channel=t.per_channel)
    razored = sdr_encode(q, base, 4, g)
    decoded = sdr_decode(razored.codes, razored.flags, g)
    for row in range(t.values.shape[0]):
        for group in range(t.values.shape[1] // g):
            gb = bit_table(t, row, group, g)
            lo, hi = group * g, (group + 1) * g
            assert gb.rows["code"].tolist() == razored.codes[row, lo:hi].tolist()
            assert set(gb.rows["flag"]) == {int(razored.flags[row, group])} == {gb.flag}
            assert gb.rows["decoded q"].tolist() == decoded[row, lo:hi].tolist()
            assert gb.rows["q (base int)"].tolist() == q[row, lo:hi].tolist()
            s = float(scale[row] if t.per_channel else scale)
            assert gb.rows["decoded x"].tolist() == pytest.approx((decoded[row, lo:hi].double() * s).tolist())
            group_or = 0
            for v in q[row, lo:hi].tolist():
                group_or |= abs(v)
            assert gb.group_or == group_or and int(gb.or_bits, 2) == group_or
            assert gb.razoring_point == group_or.bit_length() - 1
            assert gb.flag_bits == flag_bits(base) and gb.stored_bits == g * 4 + flag_bits(base)
            for r in gb.rows.to_dict("records"):
                mag = abs(r["q (base int)"])  # "magnitude bits" reads: zeros [kept] dropped
                assert int(r["magnitude bits"].replace("[", "").replace("]", ""), 2) == mag
                dropped = "" if r["dropped"] == "none" else r["dropped"]
                assert len(r["kept"]) == 3 and len(dropped) == gb.flag
                assert int(r["kept"], 2) == mag >> gb.flag
                assert r["sign bit"] == ("1 (−)" if r["q (base int)"] < 0 else "0 (+)")
                bump = 1 if r["rounding"].startswith("round up") else 0
                assert abs(r["code"]) == int(r["kept"], 2) + bump


def test_bit_table_labels_zero_and_all_ones_groups():
    t = _activation()
    zero = bit_table(t, 2, 1, 16)
    assert zero.group_or == 0 and zero.razoring_point == -1 and zero.flag == 0
    assert set(zero.rows["code"]) == {0} and set(zero.rows["rounding"]) == {"exact (nothing dropped)"}
    ones = bit_table(t, 3, 2, 16)  # holds the tensor's absmax: q = 32767, all 15 magnitude bits set
    top = ones.rows[ones.rows["channel"] == 32].iloc[0]
    assert top["q (base int)"] == 32767 and top["kept"] == "111"
    assert top["rounding"] == "floor (kept bits all ones)" and top["code"] == 7


def test_bit_table_rejects_out_of_range():
    t = _activation()
    with pytest.raises(ValueError, match="row must be in"):
        bit_table(t, 99, 0, 16)
    with pytest.raises(ValueError, match="group must be in"):
        bit_table(t, 0, 4, 16)


def test_largest_group_skips_the_sink_row():
    t = _activation()
    t.values[0, 60] = 1e4  # a sink-like token 0
    row, group = largest_group(t, 16)
    flat = int(t.values[1:].abs().argmax())
    assert (row, group) == (flat // 64 + 1, (flat % 64) // 16)
