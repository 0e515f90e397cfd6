"""Screenshots of SpinScope pages as a user sees them: start the app, open a page, click through a flow, save PNGs.

    python tools/screenshot.py --page explore --out /tmp/shots \
        --action 'fill:Token budget=256' --action 'fill:Window length=128' \
        --action 'click:Capture' --action 'wait:svg=Kurtosis per layer'

Actions, applied in order (after each one the tool waits until Streamlit has finished rerunning). LABEL and TEXT
match exactly; when several elements match, 'LABEL#2' picks the second (the first by default):
    fill:LABEL=VALUE    type VALUE into the input labelled LABEL (number or text input) and commit it with Tab
    click:TEXT          press the button whose text is TEXT, or else click the label TEXT (toggle, radio, tab)
    select:LABEL=OPTION pick the first option containing OPTION in the selectbox labelled LABEL
    wait:TEXT           wait until TEXT is visible on the page (e.g. a header or a message)
    wait:svg=TEXT       wait until a plotly chart draws an SVG text containing TEXT (e.g. a chart title)
    shot:NAME           save a full-page screenshot NAME.png now (one is always taken at the end, named after the page)
    sleep:SECONDS       pause, e.g. to let an animation settle

The same helpers serve tests/browser: `running_app()` starts and stops the server, `launch_browser()` opens
Debian's chromium (Playwright's own browser download needs a network we do not have), `apply()` runs an action.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app" / "streamlit_app.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
RERUN_START_MS = 1500  # how long a rerun may take to start after an input
MAX_SHOT_HEIGHT = 16000  # px; a taller page is cut here (chromium refuses very large surfaces)
KINDS = ("fill", "click", "select", "wait", "shot", "sleep")


@dataclass(frozen=True)
class Action:
    kind: str  # one of KINDS
    target: str  # a label, button text, text to wait for, shot name or seconds
    value: str = ""  # what to type or pick (fill, select)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown action {self.kind!r}; use one of {', '.join(KINDS)}")
        if not self.target:
            raise ValueError(f"action {self.kind!r} needs a target, e.g. '{self.kind}:Token budget'")
        if self.kind in ("fill", "select") and not self.value:
            raise ValueError(f"action {self.kind!r} needs LABEL=VALUE, e.g. '{self.kind}:Token budget=256'")
        if self.kind == "sleep":
            try:
                float(self.target)
            except ValueError:
                raise ValueError(f"sleep needs a number of seconds, got {self.target!r}") from None


def parse_action(text: str) -> Action:
    """'fill:Token budget=256' -> Action('fill', 'Token budget', '256'); 'wait:svg=Kurtosis' keeps 'svg=...' whole."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"action {text!r} has no ':'; write KIND:TARGET, e.g. 'click:Capture'")
    kind = kind.strip()
    if kind in ("fill", "select"):
        target, _, value = rest.partition("=")
        return Action(kind, target.strip(), value.strip())
    return Action(kind, rest.strip())


# ---- the server ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_app(
    python: str | None = None,
    port: int | None = None,
    startup_timeout: float = 60.0,
    log=None,
    env: dict[str, str] | None = None,
):
    """Start `streamlit run app/streamlit_app.py` headless on 127.0.0.1 (with the repository's venv python unless
    `python` is given) and yield its base URL; always stop it.

    The server runs in its own process group so that stopping it also stops any worker it spawned. `env` adds to
    this process's environment (e.g. SPINSCOPE_CACHE). Its output goes to `log` (a file object) or is discarded; a
    server that dies or does not answer /_stcore/health in time raises.
    """
    python = python or str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        python,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {proc.returncode} before answering; command: {cmd}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer {url}/_stcore/health within {startup_timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- the browser --------------------------------------------------------------------------------------------


def launch_browser(playwright):
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's chromium (`make browser`)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def page_url(base: str, page: str) -> str:
    """st.navigation serves a page at its file name: views/explore.py -> /explore; the default page at /."""
    page = page.strip().strip("/").lower()
    return f"{base}/" if page in ("", "home") else f"{base}/{page}"


def wait_idle(page, timeout_ms: int = 120_000) -> None:
    """Wait until the app is connected and its script is not running, and no spinner or skeleton is left.

    Streamlit marks its root element with data-test-script-state (initial, running, notRunning, ...)."""
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            return app && app.dataset.testScriptState === 'notRunning'
                && app.dataset.testConnectionState === 'CONNECTED'
                && !document.querySelector('[data-testid="stSpinner"], [data-testid="stSkeleton"]');
        }""",
        timeout=timeout_ms,
        polling=200,
    )


def wait_rerun(page, timeout_ms: int) -> None:
    """After an input that may rerun the script: give the rerun a moment to start, then wait for it to end.
    (Inside a form nothing reruns until the submit button; the short wait then simply expires.)"""
    try:
        page.wait_for_function(
            "() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState !== 'notRunning'",
            timeout=RERUN_START_MS,
            polling=50,
        )
    except PlaywrightTimeout:
        pass
    wait_idle(page, timeout_ms)


def open_page(page, base: str, name: str, timeout_ms: int = 120_000) -> None:
    page.goto(page_url(base, name))
    wait_idle(page, timeout_ms)


def _nth(find, target: str):
    """find(text, exact=True), narrowed to the N-th match for 'TEXT#N' (1-based), else to the first."""
    text, sep, n = target.rpartition("#")
    if sep and n.isdigit() and int(n) >= 1:
        return find(text, exact=True).nth(int(n) - 1)
    return find(target, exact=True).first


def in_form(element) -> bool:
    """Whether an input sits inside an st.form other than as its submit button: changing it reruns nothing (the
    form sends every value with its submit), so there is no rerun to wait for."""
    return element.evaluate(
        "el => !!el.closest('[data-testid=\"stForm\"]') && !el.closest('[data-testid=\"stFormSubmitButton\"]')"
    )


def apply(page, action: Action, out: Path | None = None, timeout_ms: int = 120_000) -> Path | None:
    """Run one action on a Playwright page; return the PNG path for 'shot'."""
    reruns = True
    if action.kind == "fill":
        box = _nth(page.get_by_label, action.target)
        box.fill(action.value)
        box.press("Tab")  # Streamlit commits a number/text input on blur
        if in_form(box):
            return None
    elif action.kind == "click":
        button = _nth(lambda t, exact: page.get_by_role("button", name=t, exact=exact), action.target)
        # No such button: a toggle, checkbox, radio option or tab is clicked through its visible label.
        target = button if button.count() else _nth(page.get_by_text, action.target)
        reruns = not in_form(target)
        target.click()
    elif action.kind == "select":
        # Streamlit's selectbox is a searchable combobox: type to filter its options and click the first one left.
        # (Enter instead could land before the list has filtered, and then pick nothing.)
        box = _nth(page.get_by_label, action.target)
        reruns = not in_form(box)
        box.click()
        box.fill(action.value)
        page.get_by_role("option").filter(has_text=action.value).first.click(timeout=timeout_ms)
    elif action.kind == "wait":
        found = (
            page.locator("svg text", has_text=action.target[4:])
            if action.target.startswith("svg=")
            else page.get_by_text(action.target)
        ).first
        try:
            found.wait_for(timeout=timeout_ms)
        except PlaywrightTimeout as e:
            raise PlaywrightTimeout(f"{e}\n--- what the page showed instead ---\n{describe(page)}") from None
    elif action.kind == "sleep":
        time.sleep(float(action.target))
    elif action.kind == "shot":
        if out is None:
            raise ValueError("a 'shot' action needs an output folder")
        return full_page_screenshot(page, out / f"{action.target}.png", timeout_ms)
    if action.kind in ("fill", "click", "select") and reruns:
        wait_rerun(page, timeout_ms)
    else:
        wait_idle(page, timeout_ms)
    if action.kind == "select" and action.value.lower() not in box.input_value().lower():
        raise ValueError(f"selectbox {action.target!r} shows {box.input_value()!r} after picking {action.value!r}")
    return None


def describe(page) -> str:
    """What a failed wait leaves on the page, in a few lines of text for the test log: the script's state, error
    and warning messages, progress bars, selectbox values and chart titles."""
    return page.evaluate("""() => {
        const texts = sel => [...document.querySelectorAll(sel)].map(el => el.innerText.trim()).filter(t => t);
        const app = document.querySelector('[data-testid="stApp"]');
        return [
            `script ${app?.dataset.testScriptState}, connection ${app?.dataset.testConnectionState}`,
            ...texts('[data-testid="stException"], [data-testid="stAlert"]').map(t => `message: ${t.slice(0, 500)}`),
            ...texts('[data-testid="stProgress"]').map(t => `progress: ${t}`),
            ...[...document.querySelectorAll('[data-testid="stSelectbox"] input')]
                .map(el => `selectbox ${el.getAttribute('aria-label')}: ${el.value}`),
            ...[...document.querySelectorAll('.js-plotly-plot')].map(el => `chart: ${el.layout?.title?.text}`),
        ].join('\\n');
    }""")


def full_page_screenshot(page, path: Path, timeout_ms: int = 120_000) -> Path:
    """Streamlit scrolls inside its main section, not the document, so Playwright's full_page=True would stop at the
    viewport: grow the viewport to the content's height instead, shoot, and restore it."""
    wait_idle(page, timeout_ms)
    height = page.evaluate(
        """() => {
            const main = document.querySelector('[data-testid="stMain"]') || document.scrollingElement;
            return Math.max(main.scrollHeight, document.documentElement.scrollHeight);
        }"""
    )
    size = page.viewport_size or VIEWPORT
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), MAX_SHOT_HEIGHT)})
    time.sleep(1.0)  # plotly charts re-layout on resize
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


def take(base: str, page_name: str, actions: list[Action], out: Path, timeout_ms: int = 120_000) -> list[Path]:
    """Open page_name on a running app, apply the actions, and return the PNGs written (the last one is the end)."""
    shots = []
    with sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            open_page(page, base, page_name, timeout_ms)
            for action in actions:
                shot = apply(page, action, out, timeout_ms)
                if shot is not None:
                    shots.append(shot)
            shots.append(full_page_screenshot(page, out / f"{page_name.strip('/') or 'home'}.png", timeout_ms))
        finally:
            browser.close()
    return shots


def _action_arg(text: str) -> Action:
    try:
        return parse_action(text)
    except ValueError as e:  # argparse would hide the message of a plain ValueError
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--page", default="home", help="page path as in the URL: home, explore, ...")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--action", action="append", default=[], type=_action_arg, help="KIND:TARGET[=VALUE], repeatable")
    p.add_argument("--url", help="use an app already running at this base URL instead of starting one")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for any one step")
    args = p.parse_args(argv)
    timeout_ms = int(args.timeout * 1000)
    if args.url:
        shots = take(args.url.rstrip("/"), args.page, args.action, args.out, timeout_ms)
    else:
        with running_app() as base:
            shots = take(base, args.page, args.action, args.out, timeout_ms)
    for s in shots:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
