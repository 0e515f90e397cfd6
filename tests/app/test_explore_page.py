"""AppTest of Explore on the real default model, as a user would click it: a capture draws every chart and the
massive-token table; a missing corpus file and a token budget beyond the corpus are refused with a clear message."""

import pytest

from tests.app.apptest import decode, figure, open_page, table, titles


def capture(tokens: int, window: int | None = None, path: str | None = None):
    at = open_page("explore")
    if path is not None:
        at.radio(key="explore_corpus").set_value("My text file or WikiText-2 directory")
        at.text_input(key="explore_path").set_value(path)
    at.number_input(key="explore_tokens").set_value(tokens)
    if window is not None:
        at.number_input(key="explore_window").set_value(window)
    at.button(key="explore_capture").click().run()
    assert not at.exception, at.exception
    return at


@pytest.mark.slow  # captures on the real default model
def test_explore_capture_shows_all_charts():
    at = capture(256, 128)
    assert not at.error, [e.value for e in at.error]
    shown = titles(at)
    for start in ("Kurtosis per layer", "Per-channel max", "|x| over tokens", "Distribution of values"):
        assert any(t.startswith(start) for t in shown), (start, shown)
    assert decode(figure(at, "Kurtosis per layer")["data"][0]["x"]) == list(range(30))  # one point per layer
    tokens = list(table(at, 0)["token"])  # the massive-token table
    assert tokens and all(t == t.strip() and t for t in tokens), tokens  # spaces shown as \u2423, not trimmed
    assert at.get("download_button")


def test_explore_missing_corpus_file_message():
    at = capture(2048, path="/no/such/file.txt")
    assert any("not found" in e.value for e in at.error)


def test_explore_token_budget_beyond_the_corpus_is_refused_with_a_clear_message():
    at = capture(1_000_000)  # the widget's maximum; the sample's calibration split is smaller
    (error,) = [e.value for e in at.error]
    assert (
        error.startswith("token budget 1000000 exceeds the calib split of Wikipedia sample")
        and "choose at most" in error
    ), error
    assert not at.success and not at.get("plotly_chart")  # nothing was captured
    assert any("press **Capture**" in i.value for i in at.info)
