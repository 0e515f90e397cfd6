"""Browser tests: a real `streamlit run` server and Debian's chromium driven by Playwright.

The server, the browser launch and the wait-for-Streamlit helpers are those of tools/screenshot.py, so a test and a
screenshot see the page the same way. The server gets a private results cache (its models/ folder links to the real
converted models, as in tests/conftest.py): a capture here is computed, never read from or written to the user's
cache. Screenshots go to test-artifacts/ (git-ignored): one at the end of each test that asks for it, and one of
the page as it was when a test failed.
"""

from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed in this venv")

from tests.helpers import private_cache  # noqa: E402
from tools import screenshot as shots  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so the `page` fixture knows at teardown whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """Base URL of a headless SpinScope server on a free port of 127.0.0.1; the server is stopped at session end."""
    if not Path(shots.CHROMIUM).exists():
        pytest.skip(f"{shots.CHROMIUM} not found: the browser tests need Debian's chromium (`make browser`)")
    cache = private_cache(tmp_path_factory.mktemp("browser") / "cache")
    log_path = cache / "streamlit.log"
    with open(log_path, "w") as log:
        try:
            with shots.running_app(log=log, env={"SPINSCOPE_CACHE": str(cache)}) as url:
                yield url
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}\n--- server log ({log_path}) ---\n{log_path.read_text()[-3000:]}") from e


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(shots.CHROMIUM).exists():
        pytest.skip(f"{shots.CHROMIUM} not found: the browser tests need Debian's chromium (`make browser`)")
    with sync_playwright() as pw:
        b = shots.launch_browser(pw)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh browser tab (its own Streamlit session); a failing test leaves test-artifacts/<test>-failed.png."""
    failed_shot = ARTIFACTS / f"{request.node.name}-failed.png"
    failed_shot.unlink(missing_ok=True)  # from an earlier run
    context = browser.new_context(viewport=shots.VIEWPORT)
    tab = context.new_page()
    yield tab
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            tab.screenshot(path=str(failed_shot))
        except Exception:  # the page may be gone; the failure itself is what matters
            pass
    context.close()
