"""AppTest of the Optimize page on a tiny random Llama directory (tests/conftest.py: tiny_model_dir), chosen in the
sidebar as a user would choose any local model: train, see the curves, evaluate, run the random spread, and the
page a Stop press leads to."""

import pytest
from streamlit.testing.v1 import AppTest

from app import state
from tests.app import apptest
from tests.app.apptest import decode, open_page


def figures(at: AppTest) -> dict:
    return {apptest.title(f): f for f in apptest.figures(at)}


def set_small_run(at: AppTest, method: str, steps: int = 3) -> None:
    at.radio(key="opt_method").set_value(method)
    at.number_input(key="opt_steps").set_value(steps)
    at.number_input(key="opt_windows").set_value(3)
    at.number_input(key="opt_window").set_value(32)
    at.number_input(key="opt_every").set_value(1)


@pytest.mark.slow  # trains
def test_train_then_evaluate_then_random_spread(tiny_model_dir):
    at = open_page("optimize", tiny_model_dir)
    assert any("press **Start**" in i.value for i in at.info)
    set_small_run(at, "flrot")
    at.button(key="opt_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    done = " ".join(s.value for s in at.success)
    assert "3 of 3 steps" in done and ".bin" in done and "R3 and R4" in done
    figs = figures(at)
    loss = figs["Training loss and quick perplexity"]
    assert decode(loss["data"][0]["x"]) == [1, 2, 3]  # one loss point per step
    assert decode(loss["data"][1]["x"]) == [0, 1, 2, 3]  # perplexity at the start and every step
    heat = [f for t, f in figs.items() if t.startswith("Per-token kurtosis")]
    assert len(heat) == 2  # q/k/v input and down_proj input
    assert heat[0]["data"][0]["x"] == ["step 0", "step 1", "step 2", "step 3"]
    assert len(heat[0]["data"][0]["z"]) == 2  # one row per decoder layer
    assert at.get("download_button")

    at.number_input(key="opt_eval_tokens").set_value(256)  # also the random spread's budget
    at.button(key="opt_eval_go").click().run()
    assert not at.exception, at.exception
    table = at.table[0].value
    assert list(table["recipe"]) == ["fp", "rtn", "quarot", "flrot (learned)"]
    assert list(table["bits"]) == ["16-16-16", "4-4-4", "4-4-4", "4-4-4"]
    assert (table["perplexity"].astype(float) > 1).all()

    at.number_input(key="opt_spread_seeds").set_value(2)
    at.button(key="opt_spread_go").click().run()
    assert not at.exception, at.exception
    spread = next(f for t, f in figures(at).items() if t.startswith("Perplexity of random rotations"))
    boxes = [t for t in spread["data"] if t["type"] == "box"]
    assert [b["name"] for b in boxes] == ["random hadamard", "random orthogonal"]
    assert all(len(decode(b["y"])) == 2 for b in boxes)
    marks = [a["text"] for a in spread["layout"]["annotations"]]
    assert any(m.startswith("flrot (learned)") for m in marks)  # the learned result is marked
    assert any("beats" in c for c in at.table[-1].value.columns)


@pytest.mark.slow  # trains
def test_a_stopped_run_is_shown_and_can_be_resumed(tiny_model_dir):
    from engine.events import Metric
    from engine.learn.spinquant import TrainConfig, train_job
    from engine.model.loading import load_model

    # Stop as the page does: the job generator closed between steps (Streamlit interrupts the script).
    cfg = TrainConfig(method="spinquant", steps=3, windows=3, window=32, block=32, eval_every=1, checkpoint_every=5)
    job = train_job(load_model(str(tiny_model_dir)), cfg)
    for ev in job:
        if isinstance(ev, Metric) and ev.name == "loss" and ev.step == 2:
            break
    job.close()

    at = open_page("optimize", tiny_model_dir)
    at.session_state[state.OPT_CONFIG] = cfg
    at.session_state[state.OPT_RUNNING] = True  # the marker a Stop press leaves for the rerun it causes
    at.run()
    assert not at.exception, at.exception
    assert any("Stopped after step 2 of 3" in w.value and "resumes at step 3" in w.value for w in at.warning)
    assert decode(figures(at)["Training loss and quick perplexity"]["data"][0]["x"]) == [1, 2]

    set_small_run(at, "spinquant")
    at.button(key="opt_start").click().run()  # the same settings resume: only step 3 is left
    assert not at.exception, at.exception
    assert any("3 of 3 steps" in s.value for s in at.success)
    # the first step trained after Start is the one after the checkpoint's (a broken resume trains 1-3 again)
    assert [i.value for i in at.info] == ["Resumed from the checkpoint at step 2: trained steps 3-3."]
    assert decode(figures(at)["Training loss and quick perplexity"]["data"][0]["x"]) == [1, 2, 3]

    at.button(key="opt_start").click().run()  # again: the checkpoint now holds every step
    assert not at.exception, at.exception
    assert any("3 of 3 steps" in s.value for s in at.success)
    assert [i.value for i in at.info] == [
        "Resumed from the checkpoint at step 3: nothing left to train (**Start over** trains again)."
    ]


def test_bad_settings_show_a_clear_error(tiny_model_dir):
    at = open_page("optimize", tiny_model_dir)
    set_small_run(at, "flrot")
    at.number_input(key="opt_block").set_value(5)
    at.button(key="opt_start").click().run()
    assert not at.exception, at.exception
    assert any("not divisible by block 5" in e.value for e in at.error)
