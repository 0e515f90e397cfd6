"""Evaluate's clipping choice, as a user makes it on a tiny model directory: a calibrated row shows its clip
ratios in a heat map (one column per quantized site, one row per layer) and in the table; a fixed row does not."""
from tests.app.test_evaluate_bits import evaluate_page, results, run_with


def test_a_calibrated_row_shows_the_ratios_it_chose_and_a_fixed_row_shows_none(tiny_model_dir):
    at = evaluate_page(tiny_model_dir)
    assert at.radio(key="eval_clip").value == "calibrated"  # the default
    run_with(at, ["rtn"], ["4-4-4"])
    assert not at.error, [e.value for e in at.error]
    assert list(results(at)["clip"]) == ["calibrated"]
    assert [h.value for h in at.header if h.value == "Clip ratios chosen"]
    heat = [c for c in at.get("plotly_chart") if "Calibrated clip ratios" in c.proto.spec][0]
    assert '"K"' in heat.proto.spec and '"V"' in heat.proto.spec and '"W down"' in heat.proto.spec
    assert [c.value for c in at.caption if c.value.startswith("End-to-end check on ")]  # kept and reverted layers

    at.radio(key="eval_clip").set_value("fixed")
    run_with(at, ["rtn"], ["4-4-4"])
    assert list(results(at)["clip"]) == ["fixed"]
    assert not [h.value for h in at.header if h.value == "Clip ratios chosen"]
