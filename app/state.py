"""Every session_state key in one place, and the cached loaders the pages share."""
from __future__ import annotations

import streamlit as st

from engine.model.dispatch import Placement
from engine.model.loading import ModelHandle, load_model, plan_model

# session_state keys
MODEL_NAME = "model_name"
MODEL_DTYPE = "model_dtype"
MAX_MEMORY = "max_memory"      # '' = one device; 'cuda:0=20GiB,cpu=64GiB' = dispatched within those budgets
OFFLOAD_DISK = "offload_disk"
CAPTURE = "capture_result"
CAPTURE_STOPPED = "capture_stopped"
COMPARE = "rotate_comparison"

DEFAULTS = {MODEL_NAME: "default", MODEL_DTYPE: "float32", MAX_MEMORY: "", OFFLOAD_DISK: False, CAPTURE: None,
            CAPTURE_STOPPED: False, COMPARE: None}


def init() -> None:
    for k, v in DEFAULTS.items():
        st.session_state.setdefault(k, v)


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(name: str, dtype: str, max_memory: str, offload_disk: bool) -> ModelHandle:
    return load_model(name, dtype=dtype, max_memory=max_memory or None, offload_disk=offload_disk)


@st.cache_data(show_spinner=False, max_entries=16)
def _plan(name: str, dtype: str, max_memory: str, offload_disk: bool) -> Placement:
    return plan_model(name, dtype, max_memory or None, offload_disk)


def _choice() -> tuple[str, str, str, bool]:
    s = st.session_state
    return s[MODEL_NAME], s[MODEL_DTYPE], s[MAX_MEMORY].strip(), bool(s[OFFLOAD_DISK])


def plan() -> tuple[Placement | None, str | None]:
    """(the placement the sidebar's choice would get, None) or (None, why it cannot be placed); no weight is read.
    Without budgets it is accelerate's plan over this machine's free memory: an estimate of the weight bytes."""
    try:
        return _plan(*_choice()), None
    except ValueError as e:
        return None, str(e)


def model() -> ModelHandle | None:
    """The model chosen in the sidebar, loaded once per choice; None (with a message shown) if it fails."""
    name, dtype, budgets, _ = _choice()
    where = f" within {budgets}" if budgets else ""
    try:
        with st.spinner(f"Loading {name} ({dtype}){where}; the first load of the default model converts it "
                        "(~30 s)..."):
            return _load(*_choice())
    except ValueError as e:
        st.error(f"Cannot load model: {e}")
        return None
