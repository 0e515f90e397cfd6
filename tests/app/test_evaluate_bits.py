"""Evaluate's open bit settings, as a user types them on a tiny model directory: a typed 8-8-8 (not a preset)
evaluates; a malformed setting is refused with the parser's message and the earlier results stay on screen; Run
with no recipe says so."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")


def evaluate_page(model_dir) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = str(model_dir)
    at.run()
    at.switch_page("views/evaluate.py").run()
    assert not at.exception, at.exception
    at.number_input[0].set_value(64)  # perplexity tokens
    return at


def run_with(at: AppTest, recipes: list[str], bits: list[str]) -> AppTest:
    at.multiselect[0].set_value(recipes)
    at.multiselect(key="eval_bits").set_value(bits)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def results(at: AppTest):
    table = at.table[-1].value  # the Results table (a styled st.table)
    return table.data if hasattr(table, "data") else table


def test_a_typed_8_8_8_evaluates_and_a_malformed_setting_keeps_the_results(tiny_model_dir):
    at = run_with(evaluate_page(tiny_model_dir), ["rtn"], ["8-8-8"])
    assert not at.error, [e.value for e in at.error]
    assert list(results(at)["bits"]) == ["8-8-8"] and list(results(at)["recipe"]) == ["rtn"]

    run_with(at, ["rtn"], ["4-4"])
    assert any("bits must look like W-A-KV" in e.value and "'4-4'" in e.value for e in at.error)
    assert list(results(at)["bits"]) == ["8-8-8"]  # the earlier results stay


def test_run_with_no_recipe_says_so(tiny_model_dir):
    at = run_with(evaluate_page(tiny_model_dir), [], ["4-4-4"])
    assert [e.value for e in at.error] == ["choose at least one recipe to run"]
