"""Evaluate's clipping choice, as a user makes it on a tiny model directory: a calibrated row shows its clip
ratios in a heat map (one column per quantized site, one row per layer) and in the table; a fixed row does not."""

from tests.app.apptest import figure, open_page, run_evaluate, table


def test_a_calibrated_row_shows_the_ratios_it_chose_and_a_fixed_row_shows_none(tiny_model_dir):
    at = open_page("evaluate", tiny_model_dir)
    at.number_input(key="eval_tokens").set_value(64)  # perplexity tokens
    assert at.radio(key="eval_clip").value == "calibrated"  # the default
    run_evaluate(at, ["rtn"], ["4-4-4"])
    assert not at.error, [e.value for e in at.error]
    assert list(table(at)["clip"]) == ["calibrated"]
    assert [h.value for h in at.header if h.value == "Clip ratios chosen"]
    heat = figure(at, "Calibrated clip ratios")["data"][0]
    assert {"K", "V", "W down"} <= set(heat["x"]) and len(heat["z"]) == 2  # one row per layer of the tiny model
    assert [c.value for c in at.caption if c.value.startswith("End-to-end check on ")]  # kept and reverted layers

    at.radio(key="eval_clip").set_value("fixed")
    run_evaluate(at, ["rtn"], ["4-4-4"])
    assert list(table(at)["clip"]) == ["fixed"]
    assert not [h.value for h in at.header if h.value == "Clip ratios chosen"]
