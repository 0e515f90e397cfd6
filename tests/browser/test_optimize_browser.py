"""Optimize in a real browser: start a SpinQuant run on a tiny local model, stop it mid-way, and see the page say
where it stopped and offer the checkpoint (the model is chosen in the sidebar, as a user would)."""

import re

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser
TIMEOUT_MS = 90_000


def test_optimize_start_then_stop_keeps_a_checkpoint(app_url, page, tiny_model_dir):
    shots.open_page(page, app_url, "optimize", TIMEOUT_MS)
    shots.apply(page, shots.Action("fill", "Model", str(tiny_model_dir)), timeout_ms=TIMEOUT_MS)
    for label, value in (
        ("Steps", "400"),
        ("Calibration windows", "4"),
        ("Window length", "32"),
        ("Probe every N steps", "0"),
    ):
        shots.apply(page, shots.Action("fill", label, value), timeout_ms=TIMEOUT_MS)
    page.get_by_role("button", name="Start (or resume)").click()  # no wait: the run must still be going
    stop = page.get_by_role("button", name="Stop")
    stop.wait_for(timeout=TIMEOUT_MS)
    # stop once the first periodic checkpoint (every 5 steps) has been written
    page.get_by_text(re.compile(r"step ([5-9]|\d\d+)/400")).first.wait_for(timeout=TIMEOUT_MS)
    stop.click()
    warning = page.locator('[data-testid="stAlertContentWarning"]').filter(has_text="Stopped after step").first
    warning.wait_for(timeout=TIMEOUT_MS)
    text = warning.inner_text()
    step = int(re.search(r"Stopped after step (\d+) of 400\.", text).group(1))
    assert 5 <= step < 400, text  # stopped mid-way, no earlier than the step on screen when Stop was pressed
    assert f"The checkpoint of step {step} is saved" in text and f"resumes at step {step + 1}" in text, text
    # the checkpoint is offered as it is: its rotation file can be downloaded
    page.get_by_text("Download the rotation file").first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator('[data-testid="stException"]').count() == 0
    shots.full_page_screenshot(page, ARTIFACTS / "optimize_stopped.png", TIMEOUT_MS)
