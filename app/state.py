"""Every session_state key in one place, and the cached loaders the pages share."""
from __future__ import annotations

import streamlit as st

from engine.models import ModelHandle, load_model

# session_state keys
MODEL_NAME = "model_name"
MODEL_DTYPE = "model_dtype"
CAPTURE = "capture_result"
CAPTURE_STOPPED = "capture_stopped"
COMPARE = "rotate_comparison"

DEFAULTS = {MODEL_NAME: "default", MODEL_DTYPE: "float32", CAPTURE: None, CAPTURE_STOPPED: False, COMPARE: None}


def init() -> None:
    for k, v in DEFAULTS.items():
        st.session_state.setdefault(k, v)


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(name: str, dtype: str) -> ModelHandle:
    return load_model(name, dtype=dtype)


def model() -> ModelHandle | None:
    """The model chosen in the sidebar, loaded once per (name, dtype); None (with a message shown) if it fails."""
    name, dtype = st.session_state[MODEL_NAME], st.session_state[MODEL_DTYPE]
    try:
        with st.spinner(f"Loading {name} ({dtype}); the first load of the default model converts it (~30 s)..."):
            return _load(name, dtype)
    except ValueError as e:
        st.error(f"Cannot load model: {e}")
        return None
