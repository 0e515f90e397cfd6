"""Explore and Rotate in a real browser on a tiny Qwen3 and a tiny mixture of experts (Mixtral); Explore on a tiny
GPT-NeoX, a model outside the architecture table.

Each model is saved to a local directory with the default model's tokenizer (as tests/app/test_explore_families.py
builds them), and its path is typed into the sidebar's Model box as a user would. Explore captures a small budget
and draws the kurtosis chart (and, for the mixture, the tokens-per-expert heat map and the per-expert sites);
Rotate applies R1-R4 random Hadamard and the badge must say the rotated model computes the same function.
Screenshots go to test-artifacts/<page>_<model>.png.
"""

import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000  # a tiny model loads in a second; a 128-token capture (twice on Rotate) takes a few seconds
TOKENS, WINDOW = 128, 64
N_LAYERS, N_EXPERTS = 2, 4
MODELS = ("qwen3", "mixtral")


def _choose_model(page, app_url, page_name: str, model_dir) -> None:
    """Open page_name and type the model's directory into the sidebar's Model box (then Tab, as a user would)."""
    shots.open_page(page, app_url, page_name, TIMEOUT_MS)
    box = page.get_by_label("Model", exact=True).and_(page.get_by_role("textbox"))
    assert box.input_value() == "default"
    shots.apply(page, shots.Action("fill", "Model", str(model_dir)), timeout_ms=TIMEOUT_MS)
    assert box.input_value() == str(model_dir)


def _chart(page, title_start: str):
    """The plotly chart whose SVG title starts with title_start."""
    return page.locator('[data-testid="stPlotlyChart"]').filter(has=page.locator("text.gtitle", has_text=title_start))


def _no_errors(page) -> None:
    for kind in ("stAlertContentError", "stAlertContentWarning", "stException"):
        shown = page.locator(f'[data-testid="{kind}"]')
        assert shown.count() == 0, f"{kind}: {shown.all_inner_texts()}"


@pytest.mark.parametrize("name", MODELS)
def test_explore_on_a_tiny_model_family(app_url, page, family_model_dirs, name):
    _choose_model(page, app_url, "explore", family_model_dirs[name])
    page.get_by_role("heading", name="Explore activation outliers").wait_for(timeout=TIMEOUT_MS)

    for action in (
        f"fill:Token budget={TOKENS}",
        f"fill:Window length={WINDOW}",
        "click:Capture",
        "wait:svg=Kurtosis per layer",
    ):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)

    success = page.locator('[data-testid="stAlertContentSuccess"]').inner_text()
    assert f"{TOKENS} tokens in {TOKENS // WINDOW} windows of {WINDOW}" in success, success

    titles = page.locator("svg text.gtitle").all_text_contents()
    assert "Kurtosis per layer: resid_attn" in titles, titles
    points = _chart(page, "Kurtosis per layer").locator("g.scatterlayer g.trace").first.locator("path.point")
    assert points.count() == N_LAYERS, "one marker per decoder layer"
    assert any(t.startswith("Distribution of values") for t in titles), titles

    heat = _chart(page, "Tokens routed to each expert")
    if name == "mixtral":
        assert heat.count() == 1, titles
        assert page.get_by_role("heading", name="Experts").is_visible()
        ticks = heat.locator("g.xtick text").all_text_contents()
        assert ticks == [f"expert {e}" for e in range(N_EXPERTS)], ticks
        # Pick an expert's down_proj input for the close-up: every chart of the layer redraws for that site.
        shots.apply(page, shots.parse_action("select:Site for this layer=down_in[expert1]"), timeout_ms=TIMEOUT_MS)
        page.locator("text.gtitle", has_text="down_in[expert1]").first.wait_for(timeout=TIMEOUT_MS)
        picked = page.get_by_label("Site for this layer", exact=True).input_value()
        assert "down_in[expert1]" in picked and "expert1 only" in picked, picked
        titles = page.locator("svg text.gtitle").all_text_contents()
        assert any(t.startswith("Per-channel max |x|, layer 1, down_in[expert1]") for t in titles), titles
        # An expert's surface rows are the tokens routed to it, not window positions: the title says so.
        assert any(
            t.startswith("|x| over tokens and channels, layer 1, down_in[expert1] (the first")
            and t.endswith("tokens of window 0 routed to it)")
            for t in titles
        ), titles
    else:
        assert heat.count() == 0, "a dense model has no expert view"
        assert page.get_by_role("heading", name="Experts").count() == 0

    _no_errors(page)
    shots.full_page_screenshot(page, ARTIFACTS / f"explore_{name}.png", TIMEOUT_MS)


def test_explore_on_a_model_outside_the_architecture_table(app_url, page, family_model_dirs):
    """GPT-NeoX (engine.model.generic: capture only): Explore captures it, draws the kurtosis chart, offers each
    linear's input by its module path, and the close-up follows the chosen one."""
    _choose_model(page, app_url, "explore", family_model_dirs["gpt_neox"])
    page.get_by_role("heading", name="Explore activation outliers").wait_for(timeout=TIMEOUT_MS)
    for action in (
        f"fill:Token budget={TOKENS}",
        f"fill:Window length={WINDOW}",
        "click:Capture",
        "wait:svg=Kurtosis per layer",
    ):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)
    points = _chart(page, "Kurtosis per layer").locator("g.scatterlayer g.trace").first.locator("path.point")
    assert points.count() == N_LAYERS, "one marker per decoder layer"
    for site in ("linear_in[attention.query_key_value]", "linear_in[mlp.dense_4h_to_h]"):  # offered by module path
        shots.apply(page, shots.parse_action(f"select:Site for this layer={site}"), timeout_ms=TIMEOUT_MS)
        page.locator("text.gtitle", has_text=f"Per-channel max |x|, layer 1, {site}").first.wait_for(timeout=TIMEOUT_MS)
    _no_errors(page)
    shots.full_page_screenshot(page, ARTIFACTS / "explore_gpt_neox.png", TIMEOUT_MS)


@pytest.mark.parametrize("name", MODELS)
def test_rotate_on_a_tiny_model_family(app_url, page, family_model_dirs, name):
    _choose_model(page, app_url, "rotate", family_model_dirs[name])
    page.get_by_role("heading", name="Rotate: R1-R4 before and after").wait_for(timeout=TIMEOUT_MS)

    for action in (
        "select:R1=random Hadamard",
        "select:R2=random Hadamard",
        "select:R3=random Hadamard",
        "select:R4=random Hadamard",
        f"fill:Token budget={TOKENS}",
        f"fill:Window length={WINDOW}",
        "click:Rotate and compare",
        "wait:svg=resid_attn, after rotation",
    ):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)

    badge = page.locator('[data-testid="stAlertContentSuccess"]')
    assert badge.count() == 1, "the equivalence badge must say the rotated model computes the same function"
    text = badge.inner_text()
    assert text.startswith("Same function"), text
    for r in ("R1", "R2", "R3", "R4"):
        assert f"{r}=hadamard" in text, text
    diff = float(text.split("max |logit difference| = ")[1].split()[0])
    assert diff <= 1e-3, text

    titles = page.locator("svg text.gtitle").all_text_contents()
    for tag in ("before", "after"):
        title = f"resid_attn, {tag} rotation"
        assert title in titles, titles
        points = _chart(page, title).locator("g.scatterlayer g.trace").first.locator("path.point")
        assert points.count() == N_LAYERS, f"{title}: one marker per decoder layer"
    if name == "mixtral":
        # The sites offered are those captured: each expert's down_proj input (where R4 acts), no plain down_in.
        box = page.get_by_label("Site", exact=True)
        box.click()
        options = [o.split(":")[0] for o in page.get_by_role("option").all_inner_texts()]
        box.press("Escape")
        assert "down_in" not in options, options
        assert [o for o in options if o.startswith("down_in")] == [f"down_in[expert{e}]" for e in range(N_EXPERTS)]
        shots.apply(page, shots.parse_action("select:Site=down_in[expert1]"), timeout_ms=TIMEOUT_MS)
        titles = page.locator("svg text.gtitle").all_text_contents()
        for title in (
            "down_in[expert1], before rotation",
            "down_in[expert1], after rotation",
            "Activation quantization SQNR per layer: down_in[expert1]",
            "Per-channel max |x|, after",
        ):
            assert title in titles, titles
    _no_errors(page)
    shots.full_page_screenshot(page, ARTIFACTS / f"rotate_{name}.png", TIMEOUT_MS)
