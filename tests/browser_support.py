"""Shared helpers for the browser end-to-end tests: the app served by `streamlit run` on a free
localhost port with a given environment, Debian chromium launched through Playwright with the
flags it needs here, waiting for the app to be idle, and screenshots to test-artifacts/.

A test module builds its own fixtures from these (its environment differs: a store, an
executor, data roots), e.g.

    @pytest.fixture(scope="module")
    def served(tmp_path_factory):
        require_browser()
        ...
        with serve_app(env, "streamlit-server.log") as url:
            yield url, store, folder

    @pytest.fixture(scope="module")
    def page(served):
        with browser_page() as pg:
            yield pg
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.runs import jobs
from core.runs.store import RunStore
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
DOCS_DIR = os.environ.get("FINETUNE_LAB_SCREENSHOTS", "")  # where README screenshots go, if set
UI_TIMEOUT_MS = 60_000  # a page element to appear (the first New-run render imports torch)
SERVER_START_S = 120  # the streamlit server to answer its health check, on a shared machine
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update")
VIEWPORT = {"width": 1400, "height": 1000}


def require_browser() -> None:
    """Skip unless Debian chromium and Playwright are installed."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


@contextlib.contextmanager
def serve_app(env: dict[str, str], log_name: str, port: int | None = None,
              extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """`streamlit run streamlit_app.py` on localhost (`port`, else a free one) with environment
    `env` (the whole environment: start from os.environ) and Streamlit's `extra_args`; yields
    its base URL and stops the server after. Its output goes to test-artifacts/`log_name`."""
    port = port if port is not None else free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / log_name
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
             "--server.headless", "true", "--server.address", "localhost",
             "--server.port", str(port), *extra_args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://localhost:{port}"
        try:
            wait_for(lambda: server.poll() is not None or healthy(url), timeout_s=SERVER_START_S,
                     what="the streamlit server to answer")
            assert server.poll() is None, log_path.read_text()[-3000:]
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def stop_active_runs(store: RunStore) -> None:
    """Cancel and stop every queued or running run (a test that failed mid-run)."""
    for run in store.list_runs(statuses=("queued", "running")):
        jobs.cancel(store, run.id)
        jobs.kill(store, run.id)


@contextlib.contextmanager
def browser_page(viewport: dict[str, int] = VIEWPORT, timeout_ms: int = UI_TIMEOUT_MS):
    """A Playwright page in headless Debian chromium, closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=list(CHROMIUM_ARGS))
        context = browser.new_context(viewport=dict(viewport))
        pg = context.new_page()
        pg.set_default_timeout(timeout_ms)
        try:
            yield pg
        finally:
            context.close()
            browser.close()


def wait_idle(pg) -> None:
    """Until Streamlit has finished the current script run (its status widget is gone)."""
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=UI_TIMEOUT_MS)


def shot(pg, name: str, docs_name: str | None = None, height: int = 1000, element=None) -> Path:
    """Save test-artifacts/e2e-`name`.png of the page, or of one `element` of it (and, with
    FINETUNE_LAB_SCREENSHOTS set, a copy named `docs_name` there); returns its path. The app scrolls inside its own container, so a
    taller viewport (not full_page) is what captures more of a long page."""
    path = ARTIFACTS / f"e2e-{name}.png"
    ARTIFACTS.mkdir(exist_ok=True)
    size = pg.viewport_size
    if height != size["height"]:
        pg.set_viewport_size({"width": size["width"], "height": height})
        wait_idle(pg)
    (element or pg).screenshot(path=str(path))
    if height != size["height"]:
        pg.set_viewport_size(size)
    if DOCS_DIR and docs_name:
        target = Path(DOCS_DIR)
        if not target.is_absolute():
            target = ROOT / target
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / docs_name)
    return path


def use_image_folder(pg, folder: Path) -> None:
    """On New run: open Advanced, pick "Image folder" and type `folder` as the data folder."""
    pg.get_by_text("Advanced: optimizer, data, weights, device").click()
    pg.get_by_text("Image folder", exact=True).click()
    wait_idle(pg)
    data_input = pg.get_by_role("textbox", name="Data folder")  # not its help button
    data_input.fill(str(folder))
    data_input.press("Enter")
