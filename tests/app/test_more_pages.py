"""AppTest runs of Rotate, Evaluate and Kernels on the real default model, with small budgets."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import decode

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
TIMEOUT = 600


@pytest.fixture
def app(tmp_cache):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def _titles(at):
    return [json.loads(el.proto.spec)["layout"]["title"]["text"] for el in at.get("plotly_chart")]


@pytest.mark.slow
def test_rotate_page_r1_equivalence_and_before_after(app):
    at = app.switch_page("views/rotate.py").run()
    for r in ("r2", "r3", "r4"):
        at.selectbox(key=f"rot_{r}").set_value("none")
    at.selectbox(key="rot_r1").set_value("orthogonal")
    at.number_input(key="rot_tokens").set_value(256)
    at.number_input(key="rot_window").set_value(128)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Same function") for s in at.success), [s.value for s in at.success]
    titles = _titles(at)
    assert "resid_attn, before rotation" in titles and "resid_attn, after rotation" in titles
    figs = {json.loads(e.proto.spec)["layout"]["title"]["text"]: json.loads(e.proto.spec)
            for e in at.get("plotly_chart")}
    before = decode(figs["resid_attn, before rotation"]["data"][0]["y"])
    after = decode(figs["resid_attn, after rotation"]["data"][0]["y"])
    # R1 flattens the residual stream's per-token kurtosis (sink excluded) in every layer but the first
    assert max(after) < 4 and max(before) > 20
    assert any(t.startswith("Activation quantization SQNR") for t in titles)


def test_rotate_page_bad_file_message(app):
    at = app.switch_page("views/rotate.py").run()
    at.selectbox(key="rot_r1").set_value("file")
    at.button[0].click().run()
    assert not at.exception
    assert any("rotation file" in e.value for e in at.error)


@pytest.mark.slow
def test_evaluate_page_quick_comparison(app):
    at = app.switch_page("views/evaluate.py").run()
    at.multiselect[0].set_value(["fp", "rtn"])
    at.multiselect[1].set_value(["4-4-4"])
    at.number_input[0].set_value(512)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    table = at.table[-1].value
    assert list(table.recipe) == ["fp", "rtn"]
    fp, rtn = table.perplexity.tolist()
    assert rtn > 2 * fp  # 4-4-4 RTN without rotation is far worse than floating point
    assert any(t.startswith("Perplexity on 512") for t in _titles(at))
    assert len(at.get("download_button")) == 2


def test_evaluate_page_rotated_without_file(app):
    at = app.switch_page("views/evaluate.py").run()
    at.multiselect[0].set_value(["rotated"])
    at.button[0].click().run()
    assert not at.exception
    assert any("rotation file" in e.value for e in at.error)


def test_kernels_page_without_gpu_shows_recorded_run(app):
    at = app.switch_page("views/kernels.py").run()
    assert not at.exception, at.exception
    assert any("No CUDA GPU" in w.value for w in at.warning)
    titles = _titles(at)
    assert any(t.startswith("Recorded latency vs tokens, d = 11008") for t in titles)
    assert at.table
