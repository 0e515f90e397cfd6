"""AppTest runs of each page, as a user would click them (the real default model; its conversion is cached)."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
TIMEOUT = 300


def _app(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, at.exception
    return at


def decode(arr):
    """Plotly 6+ ships numeric arrays as {'dtype', 'bdata'}: turn them back into a list."""
    if isinstance(arr, dict) and "bdata" in arr:
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"])).tolist()
    return list(arr)


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def test_home_shows_model_and_pages():
    at = _app("home")
    text = " ".join(m.value for m in at.markdown)
    assert "Explore" in text and "Kurtosis" in text
    assert any("4-bit" in i.value for i in at.info), "the UI must say the default weights come from a 4-bit file"
    assert [m.value for m in at.metric][:3] == ["Llama", "30", "576"]


def test_home_unknown_model_shows_clear_error():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_name"] = "nobody/no-such-model"
    at.run()
    assert not at.exception
    assert any("not found" in e.value for e in at.error)


@pytest.mark.slow  # captures on the real default model
def test_explore_capture_shows_all_charts():
    at = _app("explore")
    at.number_input[0].set_value(256)
    at.number_input[1].set_value(128)
    at.button[0].click().run()  # the form's Capture button
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    figs = _figures(at)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert any(t.startswith("Kurtosis per layer") for t in titles)
    assert any(t.startswith("Per-channel max") for t in titles)
    assert any(t.startswith("|x| over tokens") for t in titles)
    assert any(t.startswith("Distribution of values") for t in titles)
    kurt = figs[titles.index(next(t for t in titles if t.startswith("Kurtosis per layer")))]
    assert decode(kurt["data"][0]["x"]) == list(range(30))  # one point per layer
    assert at.table, "massive-token table"
    table = at.table[0].value
    tokens = list((table.data if hasattr(table, "data") else table)["token"])
    assert tokens and all(t == t.strip() and t for t in tokens), tokens  # spaces shown as \u2423, not trimmed
    assert at.get("download_button")


def test_explore_missing_corpus_file_message():
    at = _app("explore")
    at.radio[0].set_value("My text file or WikiText-2 directory")
    at.text_input[1].set_value("/no/such/file.txt")
    at.button[0].click().run()
    assert not at.exception
    assert any("not found" in e.value for e in at.error)


def test_explore_token_budget_beyond_the_corpus_is_refused_with_a_clear_message():
    at = _app("explore")
    at.number_input[0].set_value(1_000_000)  # the widget's maximum; the sample's calibration split is smaller
    at.button[0].click().run()
    assert not at.exception, at.exception
    (error,) = [e.value for e in at.error]
    assert error.startswith("token budget 1000000 exceeds the calib split of Wikipedia sample") and \
        "choose at most" in error, error
    assert not at.success and not at.get("plotly_chart")  # nothing was captured
    assert any("press **Capture**" in i.value for i in at.info)


def test_home_shows_the_memory_plan_before_loading_and_refuses_what_cannot_fit():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["max_memory"] = "cpu=100MiB"
    at.run()
    assert not at.exception, at.exception
    assert any("does not fit" in e.value and "disk offload" in e.value for e in at.error)
    assert not at.metric  # refused before any weight was read: no model is shown

    at.session_state["max_memory"] = "cpu=200MiB"
    at.session_state["offload_disk"] = True
    at.run()
    assert not at.exception, at.exception
    assert any("Memory plan" in h.value for h in at.subheader)
    table = at.dataframe[0].value
    assert set(table.device) == {"cpu", "disk"} and "model.layers.29" in set(table.module)
    assert any("offloaded to disk" in w.value for w in at.warning)
    assert [m.value for m in at.metric][:3] == ["Llama", "30", "576"]  # then it loaded, dispatched
    assert any("dispatched" in i.value for i in at.info)
