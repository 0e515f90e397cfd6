"""Rotate in a real browser: pick the four rotations, a small capture budget, press Rotate and compare, and check
what the user ends up looking at: the equivalence badge and the before/after kurtosis charts.

Frames of a live run are merged on this 2-core machine, so the assertions are on the final state of the page.
"""

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000  # model load (cached conversion) + rotation + equivalence check + two 256-token captures
N_LAYERS = 30  # the default model, SmolLM2-135M-Instruct

# Only R1 on: a random orthogonal residual rotation, fused into the weights (no online rotation to pay for).
ACTIONS = (
    "select:R1=random orthogonal",
    "select:R2=identity",
    "select:R3=identity",
    "select:R4=identity",
    "fill:Token budget=256",
    "fill:Window length=128",
    "click:Rotate and compare",
    "wait:svg=resid_attn, after rotation",
)


def _chart(page, title: str):
    """The plotly chart whose SVG title is exactly title."""
    return page.locator('[data-testid="stPlotlyChart"]').filter(has=page.locator("text.gtitle", has_text=title))


def test_rotate_r1_orthogonal_keeps_function_and_draws_both_charts(app_url, page):
    shots.open_page(page, app_url, "rotate", TIMEOUT_MS)
    assert page.get_by_role("heading", name="Rotate: R1-R4 before and after").is_visible()

    for action in ACTIONS:
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)

    # The choices made in the browser reached the engine: the badge names the rotation actually applied.
    badge = page.locator('[data-testid="stAlertContentSuccess"]')
    assert badge.count() == 1, "the equivalence badge must say the rotated model computes the same function"
    text = badge.inner_text()
    assert text.startswith("Same function"), text
    assert "R1=orthogonal" in text, text
    assert not any(f"{r}=" in text for r in ("R2", "R3", "R4")), f"R2-R4 were set to identity: {text}"
    assert "float32" in text, text

    titles = page.locator("svg text.gtitle").all_text_contents()
    for tag in ("before", "after"):
        title = f"resid_attn, {tag} rotation"
        assert title in titles, titles
        points = _chart(page, title).locator("g.scatterlayer g.trace").first.locator("path.point")
        assert points.count() == N_LAYERS, f"{title}: one marker per decoder layer"
    assert "Residual stream kurtosis (capture in progress)" not in titles, "the live chart must be cleared at the end"

    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stAlertContentWarning"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.get_by_role("button", name="Stop").count() == 0, "Stop shows only while the job runs"

    shots.full_page_screenshot(page, ARTIFACTS / "rotate_compare.png", TIMEOUT_MS)


def test_rotate_a_model_dispatched_over_cpu_and_disk(app_url, page):
    """The sidebar's budgets spread the model over CPU memory and disk; Home shows the plan, and Rotate still
    proves the rotated (in place, then reloaded) model computes the same function."""
    shots.open_page(page, app_url, "home", TIMEOUT_MS)
    for action in (
        "click:Beyond one device",
        "fill:Memory budgets=cpu=200MiB",
        "click:Allow disk offload",
        "wait:Memory plan",
        "wait:svg=Weights per device",
    ):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)
    assert page.get_by_text("dispatched:", exact=False).count() >= 1, "Home must say the model was dispatched"
    shots.full_page_screenshot(page, ARTIFACTS / "home_dispatched.png", TIMEOUT_MS)

    page.get_by_role("link", name="Rotate").click()
    page.get_by_role("heading", name="Rotate: R1-R4 before and after").wait_for(timeout=TIMEOUT_MS)
    budgets = page.get_by_label("Memory budgets", exact=True).and_(page.get_by_role("textbox"))
    assert budgets.input_value() == "cpu=200MiB", "the budgets follow to other pages"
    for action in ACTIONS:
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)
    text = page.locator('[data-testid="stAlertContentSuccess"]').inner_text()
    assert text.startswith("Same function") and "R1=orthogonal" in text, text
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0
    shots.full_page_screenshot(page, ARTIFACTS / "rotate_dispatched.png", TIMEOUT_MS)
