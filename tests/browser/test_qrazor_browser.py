"""QRazor in a real browser: open the page at its defaults and check the bit view of one group (the OR, the
razoring point, the flag and the binary table) against itself, and that the error and group-size charts are drawn.
"""

import re

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000  # model load (cached conversion) + 256 tokens through layers 0-5 + the method comparison
GROUP_SIZE = 16  # the page's default g
BASE_BITS = 16  # activations are razored from 16-bit integers (the default tensor is an activation)
KEPT_BITS = 3  # magnitude bits kept beside the sign (a 4-bit code)
CHART_TITLES = (
    "|quantization error| of every value",
    "Effective bits per value vs SDR group size",
    "Quantization SQNR vs SDR group size",
)


def _metric(page, label_start: str) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label_start)
    )
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def test_qrazor_shows_one_group_bit_by_bit_and_the_charts(app_url, page):
    shots.open_page(page, app_url, "qrazor", TIMEOUT_MS)
    assert page.get_by_role("heading", name="QRazor: significant data razoring, bit by bit").is_visible()
    page.get_by_role("heading", name="One group in binary").wait_for(timeout=TIMEOUT_MS)
    for title in CHART_TITLES:
        page.locator("svg text.gtitle", has_text=title).first.wait_for(timeout=TIMEOUT_MS)
    shots.wait_idle(page, TIMEOUT_MS)

    # The OR of the group's magnitudes, in base-precision binary (sign excluded).
    or_line = page.get_by_text("OR of the group's magnitudes:").first.inner_text()
    or_bits = re.search(r"[01]+\s*$", or_line).group(0).strip()
    assert len(or_bits) == BASE_BITS - 1, or_line
    leading_one = BASE_BITS - 2 - or_bits.index("1")  # bit position, 0 = least significant
    assert _metric(page, "Razoring point") == f"bit {leading_one}"
    shift = max(leading_one - (KEPT_BITS - 1), 0)  # the flag: how far the kept window sits above bit 0
    assert _metric(page, "Flag").startswith(f"{shift} (")

    # The binary table: one row per value of the group, each spelled `zeros [kept] dropped` around that razoring
    # point, with the group's one flag on every row.
    bit_table = page.locator('[data-testid="stTable"]').first
    header = [h.strip() for h in bit_table.locator("thead th").all_inner_texts()]
    col = {h: i for i, h in enumerate(header)}
    rows = [[c.strip() for c in r.locator("td, th").all_inner_texts()] for r in bit_table.locator("tbody tr").all()]
    assert len(rows) == GROUP_SIZE, rows
    leading_zeros = BASE_BITS - 1 - shift - KEPT_BITS
    for r in rows:
        bits = r[col["magnitude bits"]]
        assert re.fullmatch(r"0*\[[01]{3}\][01]*", bits), bits
        assert bits.index("[") == leading_zeros, f"{bits}: the kept window must start at the razoring point"
        assert len(bits.replace("[", "").replace("]", "")) == BASE_BITS - 1, bits
        assert r[col["flag"]] == str(shift)
    group_or = 0
    for r in rows:
        group_or |= int(r[col["magnitude bits"]].replace("[", "").replace("]", ""), 2)
    assert format(group_or, f"0{BASE_BITS - 1}b") == or_bits, "the OR shown must be that of the rows shown"

    # The error chart compares the three methods at matched bits; the comparison table lists the same three.
    titles = page.locator("svg text.gtitle").all_text_contents()
    for title in CHART_TITLES:
        assert any(t.startswith(title) for t in titles), titles
    error_chart = page.locator('[data-testid="stPlotlyChart"]').filter(
        has=page.locator("text.gtitle", has_text=CHART_TITLES[0])
    )
    legend = error_chart.locator("text.legendtext").all_text_contents()
    assert [t.split(" (")[0] for t in legend] == ["SDR", "RTN-4", "Hadamard + RTN-4"], legend

    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0

    shots.full_page_screenshot(page, ARTIFACTS / "qrazor_page.png", TIMEOUT_MS)
