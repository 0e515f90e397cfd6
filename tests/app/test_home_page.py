"""AppTest of Home on the real default model (its conversion is cached): the model's shape and the page list, a clear
error for a model that does not exist, and the memory plan shown before loading, refusing what cannot fit."""

from streamlit.testing.v1 import AppTest

from app import state
from tests.app.apptest import APP, TIMEOUT, figures, open_page


def test_home_shows_model_and_pages():
    at = open_page("home")
    text = " ".join(m.value for m in at.markdown)
    assert "Explore" in text and "Kurtosis" in text
    assert any("4-bit" in i.value for i in at.info), "the UI must say the default weights come from a 4-bit file"
    assert [m.value for m in at.metric][:3] == ["Llama", "30", "576"]


def test_home_unknown_model_shows_clear_error():
    at = open_page("home", model_dir="nobody/no-such-model")
    assert any("not found" in e.value for e in at.error)


def test_home_shows_the_memory_plan_before_loading_and_refuses_what_cannot_fit():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state[state.MAX_MEMORY] = "cpu=100MiB"
    at.run()
    assert not at.exception, at.exception
    assert any("does not fit" in e.value and "disk offload" in e.value for e in at.error)
    assert not at.metric  # refused before any weight was read: no model is shown

    at.session_state[state.MAX_MEMORY] = "cpu=200MiB"
    at.session_state[state.OFFLOAD_DISK] = True
    at.run()
    assert not at.exception, at.exception
    assert any("Memory plan" in h.value for h in at.subheader)
    table = at.dataframe[0].value
    assert set(table.device) == {"cpu", "disk"} and "model.layers.29" in set(table.module)
    assert [f["layout"]["title"]["text"] for f in figures(at)] == ["Weights per device"]
    assert any("offloaded to disk" in w.value for w in at.warning)
    assert [m.value for m in at.metric][:3] == ["Llama", "30", "576"]  # then it loaded, dispatched
    assert any("dispatched" in i.value for i in at.info)
