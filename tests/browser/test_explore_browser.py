"""Explore in a real browser: set a small capture, press Capture, and check what the user ends up looking at.

Frames of a live run are merged on this 2-core machine, so the assertions are on the final state of the page.
"""

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000  # model load (seconds, its conversion is cached) + a 256-token capture (a few seconds)
N_LAYERS, HIDDEN = 30, 576  # the default model, SmolLM2-135M-Instruct (as the Home page shows)


def _chart(page, title_start: str):
    """The plotly chart whose SVG title starts with title_start."""
    return page.locator('[data-testid="stPlotlyChart"]').filter(has=page.locator("text.gtitle", has_text=title_start))


def test_explore_capture_draws_charts_in_browser(app_url, page):
    shots.open_page(page, app_url, "explore", TIMEOUT_MS)
    assert page.get_by_role("heading", name="Explore activation outliers").is_visible()

    for action in ("fill:Token budget=256", "fill:Window length=128", "click:Capture", "wait:svg=Kurtosis per layer"):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)

    # The numbers typed in the browser reached the capture: 256 tokens in 2 windows of 128.
    success = page.locator('[data-testid="stAlertContentSuccess"]')
    assert "256 tokens in 2 windows of 128" in success.inner_text()

    titles = page.locator("svg text.gtitle").all_text_contents()
    assert "Kurtosis per layer: resid_attn" in titles, titles
    assert any(t.startswith("Per-channel max |x|, layer 5, resid_attn (sink excluded)") for t in titles), titles
    assert any(t.startswith("Distribution of values") for t in titles), titles
    assert "Residual stream kurtosis so far" not in titles, "the live chart must be cleared when the capture ends"

    kurtosis = _chart(page, "Kurtosis per layer")
    assert kurtosis.locator("text.legendtext", has_text="whole tensor, sink excluded").count() == 1
    first_trace_points = kurtosis.locator("g.scatterlayer g.trace").first.locator("path.point")
    assert first_trace_points.count() == N_LAYERS, "one marker per decoder layer"
    channel_bars = _chart(page, "Per-channel max").locator("g.barlayer path")
    assert channel_bars.count() == HIDDEN, "one bar per residual channel"
    assert page.locator('[data-testid="stTable"]').locator("tbody tr").count() > 0, "massive-token table"

    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.get_by_role("button", name="Stop").count() == 0, "Stop shows only while a capture runs"

    # A widget after the capture reruns the page on the kept result: the sink toggle retitles the channel chart.
    page.get_by_text("Include the sink token").click()
    page.locator("text.gtitle", has_text="(sink included)").wait_for(timeout=TIMEOUT_MS)
    shots.wait_idle(page, TIMEOUT_MS)
    assert "256 tokens in 2 windows of 128" in success.inner_text()

    shots.full_page_screenshot(page, ARTIFACTS / "explore_capture.png", TIMEOUT_MS)
