"""Evaluate's open bit settings, as a user types them on a tiny model directory: a typed 8-8-8 (not a preset)
evaluates; a malformed setting is refused with the parser's message and the earlier results stay on screen; Run
with no recipe says so."""

from tests.app.apptest import open_page, run_evaluate, table


def evaluate_page(model_dir):
    at = open_page("evaluate", model_dir)
    at.number_input(key="eval_tokens").set_value(64)  # perplexity tokens
    return at


def test_a_typed_8_8_8_evaluates_and_a_malformed_setting_keeps_the_results(tiny_model_dir):
    at = run_evaluate(evaluate_page(tiny_model_dir), ["rtn"], ["8-8-8"])
    assert not at.error, [e.value for e in at.error]
    assert list(table(at)["bits"]) == ["8-8-8"] and list(table(at)["recipe"]) == ["rtn"]

    run_evaluate(at, ["rtn"], ["4-4"])
    assert any("bits must look like W-A-KV" in e.value and "'4-4'" in e.value for e in at.error)
    assert list(table(at)["bits"]) == ["8-8-8"]  # the earlier results stay


def test_run_with_no_recipe_says_so(tiny_model_dir):
    at = run_evaluate(evaluate_page(tiny_model_dir), [], ["4-4-4"])
    assert [e.value for e in at.error] == ["choose at least one recipe to run"]
