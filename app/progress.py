"""The one place where engine events meet widgets: a progress bar, a status line and a live callback."""
from __future__ import annotations

import streamlit as st

from engine.events import Done, Metric, Progress


def run(events, label: str, on_partial=None, on_metric=None):
    """Drain a job generator, drawing its progress; return the Done event.

    Streamlit stops a running script when the user presses any button (e.g. Stop): the generator is then closed,
    which runs its cleanup, and nothing half-finished is cached.
    """
    bar = st.progress(0, text=label)
    done = None
    for ev in events:
        if isinstance(ev, Progress):
            bar.progress(min(ev.job_fraction, 1.0), text=f"{label}: {ev.status()}")
            if on_partial is not None and ev.partial is not None:
                on_partial(ev.partial)
        elif isinstance(ev, Metric) and on_metric is not None:
            on_metric(ev)
        elif isinstance(ev, Done):
            done = ev
    bar.progress(1.0, text=f"{label}: done" + (" (from cache)" if done and done.cached else ""))
    return done
