"""Jobs you can trust: every phase reports progress, a long forward pass reports inside itself and stops at the
next layer when its job is closed, an identical Rotate rerun is answered from the cache, and Ctrl-C in the CLI
keeps what was finished and says where a rerun resumes."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.evaluate import EvalConfig, eval_job, perplexity
from engine.events import Cancelled, Done, Metric, Progress, done_of, result_of, run_to_end, ticking
from engine.model.loading import load_model, tiny_llama
from engine.observe.capture import CaptureConfig
from engine.observe.compare import compare_job
from engine.quant.recipes import get_recipe
from engine.rotation.fusion import RotationConfig

REPO = Path(__file__).resolve().parents[2]


def test_ticking_reports_while_the_work_runs_and_stops_it_when_closed():
    steps = []

    def work(cancel):
        while True:
            if cancel.is_set():
                raise Cancelled
            steps.append(time.perf_counter())
            time.sleep(0.02)

    job = ticking(work, lambda: Progress("work", len(steps), 0, 0.0, f"{len(steps)} steps"), every=0.05)
    ticks = [next(job) for _ in range(3)]
    assert all(isinstance(t, Progress) for t in ticks) and ticks[-1].done > ticks[0].done  # the work goes on
    job.close()  # Stop: close() returns only once the worker has ended
    n = len(steps)
    time.sleep(0.2)
    assert len(steps) == n, "the work went on after the job was closed"
    assert not any(t.name == "spinscope-job" for t in threading.enumerate())


def test_ticking_hands_back_the_result_and_the_error():
    assert list(ticking(lambda cancel: 42, lambda: None))[-1].result == 42
    with pytest.raises(ValueError, match="bad input"):
        list(ticking(lambda cancel: (_ for _ in ()).throw(ValueError("bad input")), lambda: None))


def test_a_sub_job_composes_with_yield_from_its_events_handed_on_its_done_returned():
    closed = []

    def sub():
        try:
            yield Progress("sub", 1, 2, 0.1, "half")
            yield Metric("loss", 1, 0.5)
            yield Done("sub result", seconds=3.0, cached=True)
        finally:
            closed.append("sub")

    def job():
        x = yield from result_of(sub())
        rename = lambda ev: replace(ev, message="renamed") if isinstance(ev, Progress) else None  # noqa: E731
        done = yield from done_of(sub(), rename)
        yield Done((x, done.result, done.seconds, done.cached))

    events = list(job())
    # the sub-jobs' Done never reaches the consumer: the stream ends with the job's own, the only one
    assert [type(ev) for ev in events] == [Progress, Metric, Progress, Done]
    assert events[0].message == "half" and events[2].message == "renamed"  # `each` maps, or drops the Metric
    assert events[-1].result == ("sub result", "sub result", 3.0, True)
    assert run_to_end(job()) == ("sub result", "sub result", 3.0, True)


def test_closing_a_job_closes_its_sub_job_at_once_and_a_sub_job_without_a_result_is_an_error():
    state = []

    def sub():
        try:
            yield Progress("sub", 0, 1, 0.0)
            yield Progress("sub", 1, 1, 0.0)
            yield Done(1)
        finally:
            state.append("sub cleaned up")

    def job():
        try:
            yield (yield from result_of(sub()))
        finally:
            state.append("job cleaned up")

    running = job()
    next(running)
    running.close()  # Stop
    assert state == ["sub cleaned up", "job cleaned up"]  # the sub-job's finally first, as with a plain yield from

    def no_result():
        yield Progress("sub", 0, 1, 0.0)

    with pytest.raises(RuntimeError, match="without a result"):
        list(result_of(no_result()))


def slow_layers(model, seconds):
    """Each decoder layer sleeps `seconds` (a stand-in for a big window on a CPU); returns the layers and the log
    of layers entered."""
    layers, entered = list(model.model.layers), []

    def slow(module, args):
        entered.append(module)
        time.sleep(seconds)

    for layer in layers:
        layer.register_forward_pre_hook(slow)
    return layers, entered


def test_perplexity_reports_layer_by_layer_inside_a_window_and_a_stop_ends_it_at_the_next_layer():
    model = tiny_llama(layers=4)
    layers, entered = slow_layers(model, 0.3)  # 1.2 s per window: silent for that long without the layer ticks
    wins = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    job = perplexity(model, wins, layers=layers)
    first = next(job)
    assert first.stage == "perplexity" and first.total == 2 * 4 and 0 <= first.done < 4
    assert "window 1/2, layer" in first.message
    job.close()
    n = len(entered)
    time.sleep(0.5)
    assert len(entered) == n < 8, "layers kept running after the stop"

    model = tiny_llama(layers=4)
    layers, _ = slow_layers(model, 0.3)
    events = list(perplexity(model, wins, layers=layers))
    fractions = [e.fraction for e in events if isinstance(e, Progress)]
    assert len(fractions) > 2 and fractions == sorted(fractions) and fractions[-1] == 1.0
    plain = [e for e in perplexity(tiny_llama(layers=4), wins) if isinstance(e, Done)][0].result
    assert events[-1].result == pytest.approx(plain, rel=1e-6)  # the worker thread computes the same number


@pytest.fixture(scope="module")
def tiny_handle(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize(
    "recipe, weights, stages",
    [
        ("quarot", "rtn", ["calibrate", "rotate", "weights", "clips", "clip check", "perplexity"]),
        ("rtn", "gptq", ["calibrate", "gptq", "clips", "clip check", "perplexity"]),
    ],
)
def test_every_phase_of_an_evaluation_reports_progress(tiny_handle, recipe, weights, stages):
    cfg = EvalConfig(tokens=128, window=64, calib_tokens=64, calib_window=32)
    events = list(eval_job(tiny_handle, get_recipe(recipe, weights=weights), "4-4-4", cfg))
    seen = [e.stage for e in events if isinstance(e, Progress)]
    assert [s for s in dict.fromkeys(seen)] == stages  # each phase, in order, none silent
    n_layers = tiny_handle.arch.n_layers
    # the per-layer phases report once per decoder layer (the clip check: once per layer that clips, after two
    # whole-model losses)
    for stage in set(stages) - {"calibrate", "clip check", "perplexity"}:
        assert [e.done for e in events if isinstance(e, Progress) and e.stage == stage][-n_layers:] == list(
            range(1, n_layers + 1)
        )
    assert isinstance(events[-1], Done)


def test_an_identical_rotate_rerun_is_answered_from_the_cache(tiny_handle):
    rot = RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard", seed=3)
    cap = CaptureConfig(tokens=64, window=32)
    first = list(compare_job(tiny_handle, "wiki", rot, cap, check_tokens=32))
    assert any(isinstance(e, Progress) and e.stage == "rotate" for e in first)
    again = list(compare_job(tiny_handle, "wiki", rot, cap, check_tokens=32))
    assert len(again) == 1 and again[0].cached  # nothing rotated, nothing captured
    assert again[0].result.check == first[-1].result.check
    assert again[0].result.after.table.equals(first[-1].result.after.table)
    other = list(compare_job(tiny_handle, "wiki", RotationConfig(r1="hadamard", seed=4), cap, check_tokens=32))
    assert not other[-1].cached  # another rotation is computed


@pytest.mark.slow
def test_ctrl_c_in_optimize_saves_the_finished_steps_and_says_where_the_rerun_resumes(tiny_model_dir, tmp_cache):
    # far more steps than can run before the Ctrl-C
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "optimize",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "100000",
        "--windows",
        "2",
        "--window",
        "16",
        "--batch",
        "1",
        "--eval-every",
        "0",
    ]
    env = {**os.environ, "SPINSCOPE_CACHE": str(tmp_cache), "PYTHONUNBUFFERED": "1"}

    def run_until_step(n):  # the first step line printed, after Ctrl-C once step n is printed
        # SIGINT back to its default in the child, as in a terminal: a test run started in the background of a
        # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        first = None
        for line in proc.stdout:
            if line.startswith("step "):
                first = first or int(line.split()[1].split("/")[0])
                if int(line.split()[1].split("/")[0]) >= n:
                    break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        return first, err

    _, err = run_until_step(3)
    k = int(err.split("stopped; after step ")[1].split()[0])
    assert k >= 3 and f"the checkpoint of step {k} is saved, the same command resumes at step {k + 1}" in err
    first, err = run_until_step(k + 1)  # the same command again
    assert first == k + 1, err
