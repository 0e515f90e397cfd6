"""Jobs you can trust, in a real browser on a tiny local model: Stop ends a job at once and keeps what finished
(Optimize resumes from its checkpoint with the whole loss history, Evaluate keeps its finished rows), an error
leaves no Stop button or frozen bar behind, an input error keeps the results on screen, and a typed bit setting
is evaluated.

The server's CPU time is read with psutil: after a Stop the job must really be over, not computing on unseen.
"""

import re
import time

import psutil
import pytest

from tools import screenshot as shots

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

TIMEOUT_MS = 90_000
ALERT = '[data-testid="stAlertContent{}"]'  # Warning, Error, Info, Success
PPL_TOKENS = "Perplexity tokens (0 = the mode's)"  # its '=' rules out the 'fill:LABEL=VALUE' text form


def _server(app_url: str) -> psutil.Process:
    """The `streamlit run` process serving app_url: a child of this test process (tools/screenshot.running_app)."""
    port = app_url.rsplit(":", 1)[1]
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "streamlit" in cmd and "--server.port" in cmd and port in cmd:
            return p
    raise AssertionError(f"no streamlit process serves {app_url}")


def _cpu_seconds_over(proc: psutil.Process, seconds: float) -> float:
    """CPU time (user + system, all threads) that proc uses over the next `seconds` of wall time."""
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def _use_tiny_model(page, app_url: str, page_name: str, model_dir) -> None:
    shots.open_page(page, app_url, page_name, TIMEOUT_MS)
    shots.apply(page, shots.Action("fill", "Model", str(model_dir)), timeout_ms=TIMEOUT_MS)


def _multiselect(page, label: str):
    return page.locator('[data-testid="stMultiSelect"]').filter(has=page.get_by_text(label, exact=True))


def _choose(page, label: str, keep: list[str], add: list[str] = ()) -> None:
    """Set the multiselect `label` (inside a form: nothing reruns) to `keep` (of its current chips) plus `add`,
    typed and committed with Enter as a user would (also a new option, where the multiselect accepts them)."""
    box = _multiselect(page, label)
    for chip in box.locator("[data-tag]").all_inner_texts():
        name = chip.split(":")[0].strip()
        if name not in keep:
            box.get_by_role("button", name=re.compile(rf"^Remove {re.escape(name)}")).click()
    for option in add:
        field = box.locator("input")
        field.click()
        field.fill(option)
        field.press("Enter")
        page.keyboard.press("Escape")  # close the dropdown
    chips = [t.split(":")[0].strip() for t in box.locator("[data-tag]").all_inner_texts()]
    assert chips == [*keep, *add], f"{label}: {chips}"


def _table(page, index: int = -1) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of an st.table, the last one on the page by default."""
    table = page.locator('[data-testid="stTable"]').nth(index)
    header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    body = [[c.strip() for c in row.locator("td, th").all_inner_texts()] for row in table.locator("tbody tr").all()]
    return header, body


def _no_job_left(page, finished: bool = False) -> None:
    """No Stop button outlives the job, nor a progress bar (an error or a Stop must not leave one frozen), except
    the full bar of a job that `finished`, which reads 'done'."""
    assert page.get_by_role("button", name="Stop").count() == 0, "a Stop button outlived the job"
    bars = page.locator('[data-testid="stProgress"]').all_inner_texts()
    assert all(finished and t.strip().endswith("done") for t in bars), f"a progress bar outlived the job: {bars}"
    assert page.locator('[data-testid="stException"]').count() == 0


# ---- Optimize: stop, then resume from the checkpoint --------------------------------------------------------

OPT_STEPS = 20
LOSS_CHART_JS = """() => {
    const charts = [...document.querySelectorAll('.js-plotly-plot')]
        .filter(el => (el.layout?.title?.text || '').includes('Training loss'));  // the theme wraps it in <b>
    return charts.map(el => ({x: Array.from(el.data[0].x), y: Array.from(el.data[0].y)}));
}"""


def test_optimize_stop_is_prompt_and_start_resumes_with_the_whole_history(app_url, page, tiny_model_dir):
    _use_tiny_model(page, app_url, "optimize", tiny_model_dir)
    # 256-token windows: a few tenths of a second per step on the tiny model, so a run can be caught mid-way
    for label, value in (
        ("Steps", str(OPT_STEPS)),
        ("Calibration windows", "4"),
        ("Window length", "256"),
        ("Probe every N steps", "0"),
    ):
        shots.apply(page, shots.Action("fill", label, value), timeout_ms=TIMEOUT_MS)
    page.get_by_role("button", name="Start (or resume)").click()  # no wait: the run must still be going
    stop = page.get_by_role("button", name="Stop")
    stop.wait_for(timeout=TIMEOUT_MS)
    bar = page.locator('[data-testid="stProgress"]')
    bar.get_by_text(re.compile(rf"step ([2-9]|1\d)/{OPT_STEPS}")).first.wait_for(timeout=TIMEOUT_MS)
    shown = int(re.search(rf"step (\d+)/{OPT_STEPS}", bar.inner_text()).group(1))  # what the user saw
    t_click = time.monotonic()
    stop.click()
    warning = page.locator(ALERT.format("Warning")).filter(has_text="Stopped after step").first
    warning.wait_for(timeout=TIMEOUT_MS)
    stop_s = time.monotonic() - t_click
    shots.wait_idle(page, TIMEOUT_MS)
    text = warning.inner_text()
    k = int(re.search(rf"Stopped after step (\d+) of {OPT_STEPS}\.", text).group(1))
    assert shown <= k < OPT_STEPS, f"the bar showed step {shown} at the Stop: {text}"
    assert f"The checkpoint of step {k} is saved" in text and f"resumes at step {k + 1}" in text, text
    assert stop_s < 15, f"the Stop took {stop_s:.1f} s to show"
    # the job is over, not training on unseen: the server idles (well under one core) once the warning shows
    cpu = _cpu_seconds_over(_server(app_url), 3.0)
    assert cpu < 1.0, f"the server used {cpu:.2f} s of CPU in the 3 s after the Stop"
    _no_job_left(page)
    (stopped_chart,) = page.evaluate(LOSS_CHART_JS)
    assert stopped_chart["x"] == list(range(1, k + 1)), "the stopped run's chart shows its finished steps"

    # Start again with the same settings: the checkpoint's history first, then steps k+1..N
    page.get_by_role("button", name="Start (or resume)").click()
    live = page.locator(ALERT.format("Info")).filter(
        has_text=f"Resumed from the checkpoint at step {k}: training steps {k + 1}-{OPT_STEPS}"
    )
    live.first.wait_for(timeout=TIMEOUT_MS)
    # while it trains (the live note still up), the live chart continues the history: from step 1, not k+1
    page.wait_for_function(
        f"""() => [...document.querySelectorAll('{ALERT.format("Info")}')]
                    .some(a => a.innerText.includes('training steps {k + 1}-{OPT_STEPS}'))
                  && ({LOSS_CHART_JS})().some(c => c.x[0] === 1 && c.x.length >= {k})""",
        timeout=TIMEOUT_MS,
        polling=100,
    )
    page.locator(ALERT.format("Success")).filter(has_text=f"{OPT_STEPS} of {OPT_STEPS} steps").first.wait_for(
        timeout=TIMEOUT_MS
    )
    shots.wait_idle(page, TIMEOUT_MS)
    infos = page.locator(ALERT.format("Info")).all_inner_texts()
    assert f"Resumed from the checkpoint at step {k}: trained steps {k + 1}-{OPT_STEPS}." in infos, infos
    assert page.locator(ALERT.format("Warning")).count() == 0, "the stop warning belongs to the stopped run"
    (final,) = page.evaluate(LOSS_CHART_JS)
    assert final["x"] == list(range(1, OPT_STEPS + 1)), f"the loss chart must hold steps 1-{OPT_STEPS}: {final['x']}"
    assert final["y"][:k] == stopped_chart["y"], "steps 1-k are the stopped run's losses, from the checkpoint"
    loss = page.locator('[data-testid="stPlotlyChart"]').filter(
        has=page.locator("text.gtitle", has_text="Training loss")
    )
    assert loss.locator("g.scatterlayer g.trace").first.locator("path.point").count() == OPT_STEPS
    _no_job_left(page, finished=True)
    shots.full_page_screenshot(page, ARTIFACTS / "jobs_optimize_resumed.png", TIMEOUT_MS)


# ---- Evaluate: stop keeps the finished rows -----------------------------------------------------------------


def test_evaluate_stop_keeps_the_finished_rows(app_url, page, tiny_model_dir):
    _use_tiny_model(page, app_url, "evaluate", tiny_model_dir)
    _choose(page, "Bits (W-A-KV)", ["4-4-4"], add=["4-4-16"])  # fp, then rtn and quarot at two settings: 5 runs
    # 16384 tokens: 64 windows of 256, seconds per run on the tiny model
    shots.apply(page, shots.Action("fill", PPL_TOKENS, "16384"), timeout_ms=TIMEOUT_MS)
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("button", name="Stop").wait_for(timeout=TIMEOUT_MS)
    page.locator('[data-testid="stTable"] tbody tr').first.wait_for(timeout=TIMEOUT_MS)  # the first finished row
    page.get_by_role("button", name="Stop").click()
    warning = page.locator(ALERT.format("Warning")).filter(has_text="Stopped after").first
    warning.wait_for(timeout=TIMEOUT_MS)
    shots.wait_idle(page, TIMEOUT_MS)
    text = warning.inner_text()
    i = int(re.search(r"Stopped after (\d+) of 5 runs\.", text).group(1))
    assert 1 <= i < 5, text
    assert f"The {i} finished row{'s are' if i > 1 else ' is'} kept below and cached" in text, text
    cpu = _cpu_seconds_over(_server(app_url), 3.0)
    assert cpu < 1.0, f"the server used {cpu:.2f} s of CPU in the 3 s after the Stop"

    assert page.get_by_role("heading", name="Results").count() == 1
    assert page.locator('[data-testid="stTable"]').count() == 1, "the live table gave way to Results"
    header, body = _table(page)
    col = {h: n for n, h in enumerate(header)}
    expected = [("fp", "16-16-16"), ("rtn", "4-4-4"), ("rtn", "4-4-16"), ("quarot", "4-4-4"), ("quarot", "4-4-16")]
    assert [(r[col["recipe"]], r[col["bits"]]) for r in body] == expected[:i], body
    assert all(float(r[col["perplexity"]].replace(",", "")) > 1 for r in body), body
    _no_job_left(page)
    shots.full_page_screenshot(page, ARTIFACTS / "jobs_evaluate_stopped.png", TIMEOUT_MS)


# ---- errors: no stale Stop button or frozen bar; an input error keeps the results ---------------------------


def test_a_bad_rotation_file_leaves_no_stop_button_or_bar(app_url, page, tiny_model_dir, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8)

    _use_tiny_model(page, app_url, "evaluate", tiny_model_dir)
    _choose(page, "Recipes", [], add=["rotated"])
    shots.apply(page, shots.Action("fill", PPL_TOKENS, "512"), timeout_ms=TIMEOUT_MS)
    for path, says in ((garbage, "is not a rotation file"), (tmp_path / "missing.bin", "missing.bin")):
        shots.apply(page, shots.Action("fill", "Rotation file (recipe 'rotated')", str(path)), timeout_ms=TIMEOUT_MS)
        shots.apply(page, shots.Action("click", "Run"), timeout_ms=TIMEOUT_MS)
        errors = page.locator(ALERT.format("Error")).all_inner_texts()
        assert len(errors) == 1 and says in errors[0], errors
        _no_job_left(page)

    _use_tiny_model(page, app_url, "rotate", tiny_model_dir)
    for action in (
        "select:R1=from a file",
        "select:R2=identity",
        "select:R3=identity",
        "select:R4=identity",
        f"fill:Rotation file (SpinQuant layout)={garbage}",
        "fill:Token budget=256",
        "fill:Window length=128",
        "click:Rotate and compare",
    ):
        shots.apply(page, shots.parse_action(action), timeout_ms=TIMEOUT_MS)
    errors = page.locator(ALERT.format("Error")).all_inner_texts()
    assert len(errors) == 1 and "is not a rotation file" in errors[0], errors
    _no_job_left(page)
    shots.full_page_screenshot(page, ARTIFACTS / "jobs_rotate_error.png", TIMEOUT_MS)


def test_evaluate_a_typed_bit_setting_and_an_input_error_keeps_the_results(app_url, page, tiny_model_dir):
    _use_tiny_model(page, app_url, "evaluate", tiny_model_dir)
    _choose(page, "Recipes", ["rtn"])
    _choose(page, "Bits (W-A-KV)", [], add=["8-8-8"])  # not a preset: typed, then Enter
    shots.apply(page, shots.Action("fill", PPL_TOKENS, "512"), timeout_ms=TIMEOUT_MS)
    shots.apply(page, shots.Action("click", "Run"), timeout_ms=TIMEOUT_MS)
    header, body = _table(page)
    col = {h: n for n, h in enumerate(header)}
    assert [(r[col["recipe"]], r[col["bits"]]) for r in body] == [("rtn", "8-8-8")], body
    ppl = float(body[0][col["perplexity"]].replace(",", ""))
    assert ppl > 1, body

    # no recipe: the error says so, and the results of the run before stay on screen
    _choose(page, "Recipes", [])
    shots.apply(page, shots.Action("click", "Run"), timeout_ms=TIMEOUT_MS)
    errors = page.locator(ALERT.format("Error")).all_inner_texts()
    assert errors == ["choose at least one recipe to run"], errors
    assert page.get_by_role("heading", name="Results").count() == 1
    assert _table(page) == (header, body), "an input error must not replace the results on screen"
    _no_job_left(page)
    shots.full_page_screenshot(page, ARTIFACTS / "jobs_evaluate_input_error.png", TIMEOUT_MS)
