"""The one place where engine events meet widgets: a Stop button, a progress bar, a status line, live callbacks."""
from __future__ import annotations

import streamlit as st

from engine.events import Done, Metric, Progress


def run(events, label: str, on_partial=None, on_metric=None, stop_help: str | None = None):
    """Drain a job generator, drawing its progress; return the Done event.

    With `stop_help`, a Stop button shows while the job runs. Pressing it (or any button) reruns the script: the
    runner raises at the next widget call, i.e. at the next event (runner.fastReruns is off, so the stopped run
    ends before the next one starts), the generator is closed, and its cleanup saves what was finished. An error
    removes the bar and the button (no frozen bar on screen) and propagates for the page to show.
    """
    stop = st.empty()
    if stop_help:
        stop.button("Stop", key=f"stop_{label}", help=stop_help)
    bar = st.progress(0, text=f"{label}: starting")
    done = None
    try:
        for ev in events:
            if isinstance(ev, Progress):
                bar.progress(min(ev.job_fraction, 1.0), text=f"{label}: {ev.status()}")
                if on_partial is not None and ev.partial is not None:
                    on_partial(ev.partial)
            elif isinstance(ev, Metric) and on_metric is not None:
                on_metric(ev)
            elif isinstance(ev, Done):
                done = ev
    except Exception:
        bar.empty()
        stop.empty()
        raise
    finally:
        close = getattr(events, "close", None)
        if close is not None:  # a Stop (the script's rerun exception) closes the job before the rerun starts
            close()
    stop.empty()
    bar.progress(1.0, text=f"{label}: done" + (" (from cache)" if done and done.cached else ""))
    return done
