"""Explore on a tiny Qwen3 and a tiny mixture of experts (Mixtral), each saved to a local model directory with the
default model's tokenizer and chosen in the sidebar as a user would: the capture runs and every chart draws; for
the mixture, the per-expert sites are offered and the tokens-per-expert heat map adds up to top-k per token; for a
GPT-NeoX (outside the architecture table), its linears are offered by module path."""

from streamlit.testing.v1 import AppTest

from tests.app.apptest import decode, figure, open_page, titles

TOKENS = 128


def explore(model_dir) -> AppTest:
    at = open_page("explore", model_dir)
    at.number_input(key="explore_tokens").set_value(TOKENS)
    at.number_input(key="explore_window").set_value(64)
    at.button(key="explore_capture").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def test_explore_on_a_tiny_qwen3(family_model_dirs):
    at = explore(family_model_dirs["qwen3"])
    shown = titles(at)
    assert any(t.startswith("Kurtosis per layer") for t in shown) and any(t.startswith("|x| over") for t in shown)
    assert not any(t.startswith("Tokens routed") for t in shown)  # a dense model has no expert view


def test_explore_on_a_tiny_mixture_of_experts(family_model_dirs):
    at = explore(family_model_dirs["mixtral"])
    options = at.selectbox(key="explore_site").options
    assert "down_in" not in options and any(o.startswith("down_in[expert3]") for o in options)
    heat = figure(at, "Tokens routed")
    z = heat["data"][0]["z"]
    counts = decode(z) if isinstance(z, dict) else [c for row in z for c in row]  # [layer 0 experts, layer 1 ...]
    assert len(counts) == 2 * 4
    assert [sum(counts[:4]), sum(counts[4:])] == [2 * TOKENS, 2 * TOKENS]  # top-2: each token in two experts
    at.selectbox(key="explore_site2").set_value("down_in[expert1]").run()
    assert not at.exception, at.exception


def test_explore_on_a_model_outside_the_architecture_table(family_model_dirs):
    """GPT-NeoX: Kurtosis and the surface draw, and each linear's input is offered by its module path."""
    at = explore(family_model_dirs["gpt_neox"])
    shown = titles(at)
    assert any(t.startswith("Kurtosis per layer") for t in shown) and any(t.startswith("|x| over") for t in shown)
    options = at.selectbox(key="explore_site").options
    assert any(o.startswith("linear_in[attention.query_key_value]") for o in options), options
    assert any(o.startswith("linear_in[mlp.dense_4h_to_h]") for o in options), options
