"""Kernels in a real browser on this CPU machine: the no-GPU warning, the recorded H100 run drawn as a chart and a
table, and the run form's answer when Run benchmark is pressed without a GPU."""

import pandas as pd
import pytest
import torch

from tests.helpers import latest_recorded_csv
from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the page shows without a CUDA GPU"),
]

TIMEOUT_MS = 60_000  # no model to load: the page reads two CSV files
TITLE = "Recorded latency vs tokens, d = 11008, fp16, block 128"


def test_kernels_page_without_gpu_shows_recorded_run_and_why_it_cannot_time(app_url, page):
    shots.open_page(page, app_url, "kernels", TIMEOUT_MS)
    assert page.get_by_role("heading", name="Online-rotation kernels").is_visible()  # the page's title

    warning = page.locator('[data-testid="stAlertContentWarning"]')
    assert warning.count() == 1
    assert warning.inner_text().startswith("No CUDA GPU on this machine, so nothing can be timed here")

    # the recorded run is drawn: one line per recorded kernel, a point per token count, both axes titled
    recorded = pd.read_csv(latest_recorded_csv())
    at_d = recorded[recorded.d == 11008]
    chart = page.locator('[data-testid="stPlotlyChart"]').filter(has=page.locator("text.gtitle", has_text=TITLE))
    assert chart.count() == 1, page.locator("svg text.gtitle").all_text_contents()
    traces = chart.locator("g.scatterlayer g.trace")
    assert traces.count() == at_d.kernel.nunique() + 1  # plus the package's padded FHT, recorded separately
    assert traces.first.locator("path.point").count() == at_d.L.nunique()
    assert chart.locator("text.xtitle").text_content() == "tokens L (log scale)"
    assert chart.locator("text.ytitle").text_content().startswith("median time, microseconds")
    assert chart.locator("text.legendtext", has_text="memcpy (clone): the floor").count() == 1

    table = page.locator('[data-testid="stTable"]')
    assert table.locator("tbody tr").count() == at_d.kernel.nunique() + 1
    assert table.locator("tbody tr").first.inner_text().startswith("memcpy (clone)")

    # the form is there and, pressed, says why nothing is timed; the recorded run stays
    shots.apply(page, shots.parse_action("click:Run benchmark"), timeout_ms=TIMEOUT_MS)
    error = page.locator('[data-testid="stAlertContentError"]')
    assert error.count() == 1
    assert error.inner_text().startswith("no CUDA GPU is visible to torch: the kernel benchmark needs one.")
    assert chart.count() == 1 and warning.count() == 1
    assert page.locator('[data-testid="stException"]').count() == 0

    shots.full_page_screenshot(page, ARTIFACTS / "kernels.png", TIMEOUT_MS)
