"""What the AppTests of every page share: open a page as a user would (optionally after typing a model directory in
the sidebar), read the figures it drew, and decode plotly's packed arrays. Widgets are found by key or label."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from app import state

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
# One script run may load and convert a model or evaluate on a busy 2-core machine: far beyond AppTest's 3 s.
TIMEOUT = 600


def open_page(page: str = "home", model_dir=None) -> AppTest:
    """The app on `page` (views/<page>.py; 'home' is the default page), with `model_dir` chosen in the sidebar's
    Model box if given (else the default model)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if model_dir is not None:
        at.session_state[state.MODEL_NAME] = str(model_dir)
    at.run()
    assert not at.exception, at.exception
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, at.exception
    return at


def decode(arr) -> list:
    """Plotly 6+ ships numeric arrays as {'dtype', 'bdata'}: turn them back into a list."""
    if isinstance(arr, dict) and "bdata" in arr:
        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"])).tolist()
    return list(arr)


def figures(at: AppTest) -> list[dict]:
    """Every plotly figure on the page, in order, as plotly JSON."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def title(fig: dict) -> str:
    t = fig["layout"]["title"]
    return t["text"] if isinstance(t, dict) else t


def titles(at: AppTest) -> list[str]:
    return [title(f) for f in figures(at)]


def figure(at: AppTest, starts: str) -> dict:
    """The first figure whose title starts with `starts`."""
    found = [f for f in figures(at) if title(f).startswith(starts)]
    assert found, f"no figure titled {starts!r}...; the page shows {titles(at)}"
    return found[0]


def table(at: AppTest, index: int = -1):
    """The data of an st.table (a Styler's data for a styled one): the last one by default."""
    value = at.table[index].value
    return value.data if hasattr(value, "data") else value


def run_evaluate(at: AppTest, recipes: list[str], bits: list[str]) -> AppTest:
    """Evaluate's form: pick the recipes and bit settings, press Run."""
    at.multiselect(key="eval_recipes").set_value(recipes)
    at.multiselect(key="eval_bits").set_value(bits)
    at.button(key="eval_run").click().run()
    assert not at.exception, at.exception
    return at
