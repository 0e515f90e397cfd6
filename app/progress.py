"""The one place where engine events meet widgets: a Stop button, a progress bar, a status line, live callbacks,
and what the page says after a Stop."""

from __future__ import annotations

import streamlit as st

from engine.events import Done, Metric, Progress


def run(
    events,
    label: str,
    on_partial=None,
    on_metric=None,
    stop_help: str | None = None,
    running_key: str | None = None,
    running=True,
):
    """Drain a job generator, drawing its progress; return the Done event.

    With `stop_help`, a Stop button shows while the job runs. Pressing it (or any button) reruns the script: the
    runner raises at the next widget call, i.e. at the next event (runner.fastReruns is off, so the stopped run
    ends before the next one starts), the generator is closed, and its cleanup saves what was finished. An error
    removes the bar and the button (no frozen bar on screen) and propagates for the page to show.

    With `running_key` (a key of app.state), `running` is kept under it while the job runs (e.g. how many runs were
    asked for) and cleared when the job ends or raises an Exception. Streamlit's rerun is not an Exception, so only
    a Stop press leaves it set: was_stopped(running_key) finds it on the next run.
    """
    if running_key is not None:
        st.session_state[running_key] = running
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
        if running_key is not None:
            st.session_state[running_key] = None
        raise
    finally:
        close = getattr(events, "close", None)
        if close is not None:  # a Stop (the script's rerun exception) closes the job before the rerun starts
            close()
    if running_key is not None:
        st.session_state[running_key] = None
    stop.empty()
    bar.progress(1.0, text=f"{label}: done" + (" (from cache)" if done and done.cached else ""))
    return done


def was_stopped(running_key: str):
    """The marker that run() left under `running_key` if a Stop press ended the job (cleared now: the message
    shows once), else None."""
    marker = st.session_state.get(running_key)
    st.session_state[running_key] = None
    return marker


def stopped_after(done: int, total: int, unit: str, kept: str, nothing: str, sequential: bool = False) -> None:
    """The warning after a Stop: how many of the job's `total` units finished, and what became of them.

    `kept` says what happens to the finished units, `nothing` what happens when none had finished. A job of
    independent units reads "Stopped after 2 of 5 runs."; a `sequential` one the step it reached, "Stopped after
    step 2 of 3."."""
    if not done:
        st.warning(f"Stopped before the first {unit} finished: {nothing}")
        return
    count = f"{unit} {done} of {total}" if sequential else f"{done} of {total} {unit}{'s' * (total > 1)}"
    st.warning(f"Stopped after {count}. {kept}")
