"""Every session_state key the app reads or writes, with its default, and the cached loaders the pages share.

A widget's own key (e.g. "eval_bits") stays beside the widget: it names the widget, and the page reads the value the
widget returns. The keys here hold what outlives one run of a page: the sidebar's choice, results, and the marker
of a job in progress (see progress.run: a marker still set on the next run means the job was stopped)."""

from __future__ import annotations

import copy

import streamlit as st

from engine.model.dispatch import Placement
from engine.model.loading import ModelHandle, load_model, plan_model

# the sidebar (widget keys that every page reads)
MODEL_NAME = "model_name"
MODEL_DTYPE = "model_dtype"
MAX_MEMORY = "max_memory"  # '' = one device; 'cuda:0=20GiB,cpu=64GiB' = dispatched within those budgets
OFFLOAD_DISK = "offload_disk"
# Explore
CAPTURE = "capture_result"
CAPTURE_RUNNING = "capture_running"  # marker of a capture in progress
# Rotate
COMPARE = "rotate_comparison"
ROTATE_RUNNING = "rot_running"  # marker of a comparison in progress
# Optimize
OPT_CONFIG = "opt_config"  # the TrainConfig of the last Start
OPT_RESULT = "opt_result"  # its spinquant.TrainResult (or the checkpoint a Stop left)
OPT_RUNNING = "opt_running"  # marker of a training in progress
OPT_RESUMED = "opt_resumed"  # what the last Start resumed from, said beside the result
OPT_EVAL_ROWS = "opt_eval_rows"  # the learned rotations evaluated beside fp, rtn and quarot
OPT_SPREAD = "opt_spread"  # the random-rotation spread
# Evaluate
EVAL_ROWS = "eval_rows"  # the finished rows, in the request's order
EVAL_REQUEST = "eval_request"  # (runs, cfg) behind the rows: what the Export section rebuilds
EVAL_RUNNING = "eval_running"  # marker of a request in progress: its number of runs
# Formats x rotations
MATRIX_CELLS = "matrix_cells"  # the finished cells
MATRIX_REQUEST = "matrix_request"  # the MatrixConfig behind them
MATRIX_RUNNING = "matrix_running"  # marker of a fill in progress: its number of cells
MATRIX_SQNR = "mx_sqnr"  # (format, rotation, {site: [dB per layer]}) of the cell last measured

DEFAULTS = {
    MODEL_NAME: "default",
    MODEL_DTYPE: "float32",
    MAX_MEMORY: "",
    OFFLOAD_DISK: False,
    CAPTURE: None,
    CAPTURE_RUNNING: None,
    COMPARE: None,
    ROTATE_RUNNING: None,
    OPT_CONFIG: None,
    OPT_RESULT: None,
    OPT_RUNNING: None,
    OPT_RESUMED: None,
    OPT_EVAL_ROWS: None,
    OPT_SPREAD: None,
    EVAL_ROWS: [],
    EVAL_REQUEST: None,
    EVAL_RUNNING: None,
    MATRIX_CELLS: [],
    MATRIX_REQUEST: None,
    MATRIX_RUNNING: None,
    MATRIX_SQNR: None,
}


def init() -> None:
    """Set every key not yet in this session to its default (a copy: sessions never share a list)."""
    for k, v in DEFAULTS.items():
        st.session_state.setdefault(k, copy.copy(v))


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
        with st.spinner(f"Loading {name} ({dtype}){where}; the first load of the default model converts it (~30 s)..."):
            return _load(*_choice())
    except ValueError as e:
        st.error(f"Cannot load model: {e}")
        return None
