"""AppTest of the QRazor page on the real default model: the bit view, the comparison and the group-size charts."""

from streamlit.testing.v1 import AppTest

from tests.app.apptest import figures, open_page

BIT_COLUMNS = [
    "channel",
    "x",
    "q (base int)",
    "sign bit",
    "magnitude bits",
    "kept",
    "dropped",
    "rounding",
    "code",
    "flag",
    "decoded q",
    "decoded x",
]


def _open() -> AppTest:
    at = open_page("qrazor")
    assert not at.error, [e.value for e in at.error]
    return at


def _or_bits(at: AppTest) -> str:
    line = next(m.value for m in at.markdown if m.value.startswith("OR of the group's magnitudes"))
    return line.split("`")[1]


def test_qrazor_page_shows_bit_view_comparison_and_curves():
    at = _open()
    bits = at.table[0].value
    assert list(bits.columns) == BIT_COLUMNS and len(bits) == 16  # one row per value of a g = 16 group
    assert set(bits["flag"]) == {bits["flag"].iloc[0]}  # one flag per group
    or_bits = _or_bits(at)
    assert set(or_bits) <= {"0", "1"} and len(or_bits) == 15  # A16 base: 15 magnitude bits
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Razoring point (leading one of the OR)"] == f"bit {len(or_bits.lstrip('0')) - 1}"
    assert metrics["Flag (right shift)"].startswith(f"{bits['flag'].iloc[0]} (4 bits)")
    methods = at.table[1].value["method"].tolist()
    assert methods[0].startswith("SDR") and methods[1].startswith("RTN-4") and methods[2].startswith("Hadamard")
    figs = figures(at)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert titles[0].startswith("|quantization error|")
    assert "Effective bits per value vs SDR group size" in titles and "Quantization SQNR vs SDR group size" in titles
    for f in figs:  # every plot explains itself
        assert f["layout"]["xaxis"]["title"]["text"] and f["layout"]["yaxis"]["title"]["text"]
    assert [t["name"].split(" (")[0] for t in figs[0]["data"]] == ["SDR", "RTN-4", "Hadamard + RTN-4"]
    for f in figs[1:]:
        assert [t["name"] for t in f["data"]] == ["SDR", "RTN-4", "Hadamard + RTN-4"]
    assert len(at.caption) >= 5

    at.select_slider(key="qr_group").set_value(8).run()
    assert not at.exception, at.exception
    assert len(at.table[0].value) == 8

    at.selectbox(key="qr_site").set_value("down_in").run()
    at.selectbox(key="qr_source").set_value("down").run()
    assert not at.exception, at.exception
    assert "down_proj weight" in at.info[0].value and "8-bit" in at.info[0].value
    assert len(_or_bits(at)) == 7  # W8 base: 7 magnitude bits
