"""The browser actions every other browser test is built on (tools/screenshot.py), on the Rotate page's selectboxes:
a pick takes the option the typed text leaves, a pick that no option matches fails instead of keeping the old
value, and a wait that times out says what the page showed instead.
"""

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tools import screenshot as shots

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000  # the default model's load (cached conversion)
SHORT_MS = 3_000  # for what must fail


def test_a_pick_takes_the_matching_option_or_fails_and_a_failed_wait_describes_the_page(app_url, page):
    shots.open_page(page, app_url, "rotate", TIMEOUT_MS)
    r1 = page.get_by_label("R1", exact=True)
    before = r1.input_value()
    shots.apply(page, shots.parse_action("select:R1=random orthogonal"), timeout_ms=TIMEOUT_MS)
    assert r1.input_value() == "random orthogonal" != before, before

    with pytest.raises(PlaywrightTimeout):
        shots.apply(page, shots.parse_action("select:R1=no such rotation"), timeout_ms=SHORT_MS)
    page.keyboard.press("Escape")
    shots.wait_idle(page, TIMEOUT_MS)
    assert r1.input_value() == "random orthogonal", "a failed pick leaves the last choice"

    with pytest.raises(PlaywrightTimeout) as failed:
        shots.apply(page, shots.parse_action("wait:svg=A chart nobody draws"), timeout_ms=SHORT_MS)
    message = str(failed.value)
    assert "--- what the page showed instead ---" in message, message
    assert "script notRunning, connection CONNECTED" in message, message
    assert "selectbox R1: random orthogonal" in message, message
