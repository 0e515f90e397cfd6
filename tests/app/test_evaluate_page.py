"""AppTest of Evaluate on the real default model: a quick fp / rtn comparison at 4-4-4 (RTN without rotation is far
worse than floating point) with its perplexity chart and downloads; the 'rotated' recipe without a rotation file is
refused with a clear message."""

import pytest

from tests.app.apptest import open_page, run_evaluate, table, titles


@pytest.mark.slow
def test_evaluate_page_quick_comparison():
    at = open_page("evaluate")
    at.number_input(key="eval_tokens").set_value(512)
    run_evaluate(at, ["fp", "rtn"], ["4-4-4"])
    assert not at.error, [e.value for e in at.error]
    results = table(at)
    assert list(results.recipe) == ["fp", "rtn"]
    fp, rtn = results.perplexity.tolist()
    assert rtn > 2 * fp  # 4-4-4 RTN without rotation is far worse than floating point
    assert any(t.startswith("Perplexity on 512") for t in titles(at))
    assert len(at.get("download_button")) == 2


def test_evaluate_page_rotated_without_file():
    at = run_evaluate(open_page("evaluate"), ["rotated"], ["4-4-4"])
    assert any("rotation file" in e.value for e in at.error)
