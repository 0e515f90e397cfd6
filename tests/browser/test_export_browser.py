"""Export in a real browser: evaluate RTN at 4-16-16 on the default model, then export that row from the Evaluate
page's Export section and check what the user is told and what was written."""

import json
import re

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # calibration, RTN weights, perplexity, packing: ~2 min

TIMEOUT_MS = 300_000
TOKENS = 512


def test_evaluate_then_export_a_row(app_url, page, tmp_path):
    shots.open_page(page, app_url, "evaluate", TIMEOUT_MS)
    for recipe in ("fp", "quarot"):  # keep rtn only
        page.get_by_role("button", name=re.compile(rf"^Remove {recipe}")).click()
    page.get_by_role("button", name=re.compile(r"^Remove 4-4-4")).click()
    bits = page.locator('[data-testid="stMultiSelect"]').nth(1).locator("input")
    bits.fill("4-16-16")
    bits.press("Enter")
    for action in (
        shots.Action("fill", "Perplexity tokens (0 = the mode's)", str(TOKENS)),
        shots.parse_action("click:Run"),
        shots.parse_action("wait:svg=Perplexity on"),
    ):
        shots.apply(page, action, timeout_ms=TIMEOUT_MS)
    assert page.get_by_role("heading", name="Export for serving").is_visible()

    out = tmp_path / "smollm2-rtn-w4a16"
    for action in (
        shots.Action("fill", "Output directory", str(out)),
        shots.parse_action("click:Export"),
        shots.parse_action("wait:Wrote "),
    ):
        shots.apply(page, action, timeout_ms=TIMEOUT_MS)
    success = page.locator('[data-testid="stAlertContentSuccess"]').inner_text()
    assert f"Wrote {out}" in success and "MiB" in success, success
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
    shots.full_page_screenshot(page, ARTIFACTS / "evaluate_export.png", TIMEOUT_MS)
