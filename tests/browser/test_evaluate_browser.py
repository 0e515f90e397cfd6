"""Evaluate in a real browser: fp against rtn at 4-4-4 on a small perplexity budget, then check the results table
and the perplexity chart the user ends up looking at.

Frames of a live run are merged on this 2-core machine, so the assertions are on the final state of the page.
"""

import re

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # RTN weight quantization: ~1 min on a loaded CPU

TIMEOUT_MS = 300_000  # model load (cached conversion) + RTN weight quantization + two 512-token perplexities
TOKENS = 512


def test_evaluate_fp_and_rtn_fill_table_and_chart(app_url, page):
    shots.open_page(page, app_url, "evaluate", TIMEOUT_MS)
    assert page.get_by_role("heading", name="Evaluate quantized models").is_visible()

    # The recipe multiselect starts at fp, rtn, quarot: drop quarot through its tag's remove button.
    page.get_by_role("button", name=re.compile(r"^Remove quarot")).click()
    recipes = page.locator('[data-testid="stMultiSelect"]').first.get_by_role("group", name="Selected values")
    assert [t.split(":")[0] for t in recipes.locator("[data-tag]").all_inner_texts()] == ["fp", "rtn"]

    # The label holds an '=', which the 'fill:LABEL=VALUE' text form cannot carry: build the Action directly.
    for action in (
        shots.Action("fill", "Perplexity tokens (0 = the mode's)", str(TOKENS)),
        shots.parse_action("click:Run"),
        shots.parse_action("wait:svg=Perplexity on"),
    ):
        shots.apply(page, action, timeout_ms=TIMEOUT_MS)

    # The results table (st.table, real HTML) has one row per run: fp at 16-16-16, rtn at the bits asked for.
    results = page.locator('[data-testid="stTable"]').last
    header = results.locator("thead th").all_inner_texts()
    assert {"recipe", "bits", "perplexity", "tokens"} <= {h.strip() for h in header}, header
    body = [[c.strip() for c in row.locator("td, th").all_inner_texts()] for row in results.locator("tbody tr").all()]
    col = {h.strip(): i for i, h in enumerate(header)}
    by_recipe = {r[col["recipe"]]: r for r in body}
    assert set(by_recipe) == {"fp", "rtn"}, body
    assert by_recipe["fp"][col["bits"]] == "16-16-16"
    assert by_recipe["rtn"][col["bits"]] == "4-4-4"
    assert all(r[col["tokens"]] == str(TOKENS) for r in body), f"the typed token budget must reach the run: {body}"
    ppl = {k: float(r[col["perplexity"]].replace(",", "")) for k, r in by_recipe.items()}
    assert 1 < ppl["fp"] < ppl["rtn"], f"4-bit RTN must cost perplexity: {ppl}"

    # The chart: one bar per run, titled with the token count.
    titles = page.locator("svg text.gtitle").all_text_contents()
    assert f"Perplexity on {TOKENS} evaluation tokens" in titles, titles
    chart = page.locator('[data-testid="stPlotlyChart"]').filter(
        has=page.locator("text.gtitle", has_text="Perplexity on")
    )
    assert chart.locator("g.barlayer g.point").count() == 2, "one bar for fp, one for rtn 4-4-4"

    assert page.locator('[data-testid="stTable"]').count() == 1, "the live table must give way to Results"
    assert page.get_by_role("button", name="Stop").count() == 0, "Stop shows only while runs go on"
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0

    shots.full_page_screenshot(page, ARTIFACTS / "evaluate_run.png", TIMEOUT_MS)
