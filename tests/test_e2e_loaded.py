"""The live page on a loaded machine (issue 12.7): a user clicks Start on New run while a CPU
burner per core runs beside the app, and the Runs page it opens must keep updating and never
go blank.

The cause of the blank page, found by recording the websocket: the sidebar's job panel is a
fragment that refreshes itself on a timer. Drawn before the page, it registered that timer
early in the run that ends in `st.switch_page` (Start -> Runs). When the timer fired before
the browser had heard of the new page (likely when the server is slow, i.e. under load),
Streamlit ran that refresh *after* the Runs page with New run's page id; the browser went
back to New run's (empty) layout, the live view's next update had no place in it
("Bad delta path index 6 (should be between [0, 0])"), React unmounted the whole app and the
connection was closed: a white page for good, and "Cannot send rerun backMessage when
disconnected from server" from every timer after. The app now draws the sidebar after the
page (streamlit_app.py), so a run that switches pages never registers a timer.

The test checks both: the protocol (between Start and the Runs page's first message, the
server starts no refresh timer: deterministic, fails with the sidebar drawn first) and the
user's view under load (no page error, never blank, the progress keeps changing).

Debian chromium driven by Playwright, the app served by `streamlit run` on localhost with a
temporary run store (tests/browser_support.py).

Run alone:  .venv/bin/python -m pytest -q -m browser tests/test_e2e_loaded.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from core.runs.store import RunStore
from tests.browser_support import (
    ARTIFACTS,
    browser_page,
    require_browser,
    serve_app,
    stop_active_runs,
    use_image_folder,
    wait_idle,
)
from tests.conftest import make_image_folder, wait_for

CHANGE_TIMEOUT_MS = 20_000  # the progress text must change at least this often, loaded
WATCH_S = 45  # how long the live page is watched

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, store, image folder): the app served on a free localhost port."""
    require_browser()
    base = tmp_path_factory.mktemp("e2e-loaded")
    folder = make_image_folder(base / "datasets" / "colors", per_class=60)
    store = RunStore(base / "runs")
    env = {**os.environ, "FINETUNE_LAB_DATA": str(store.root),
           "FINETUNE_LAB_DATA_ROOTS": str(base / "datasets"),
           "TORCH_HOME": str(base / "torch-home"),  # no ImageNet weights: never downloads
           "FINETUNE_LAB_MAX_JOBS": "1"}
    with serve_app(env, "streamlit-server-loaded.log") as url:
        try:
            yield url, store, folder
        finally:
            stop_active_runs(store)


@pytest.fixture(scope="module")
def page(served):
    with browser_page() as pg:
        yield pg


PROGRESS_JS = """() => [...document.querySelectorAll('[data-testid="stProgress"]')]
    .map(e => e.innerText).join(' | ')"""
# Counts samples (every 250 ms) where the page is blank: no sidebar, or almost no text.
BLANK_WATCH_JS = """() => { window.__blank = 0; window.__samples = 0; setInterval(() => {
    window.__samples++;
    const text = document.body ? document.body.innerText.trim() : '';
    if (text.length < 20 || !document.querySelector('[data-testid="stSidebar"]')) window.__blank++;
}, 250); }"""


def forward_messages(frames: list[bytes]) -> list:
    """The server's websocket frames as Streamlit ForwardMsg protobufs."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    msgs = []
    for frame in frames:
        if isinstance(frame, bytes):
            msg = ForwardMsg()
            msg.ParseFromString(frame)
            msgs.append(msg)
    return msgs


def timers_before_page_change(msgs: list) -> list[str]:
    """The auto-rerun timers started by the last full run of the first page (the run in
    which Start switched pages) before the first run of another page."""
    kinds = [m.WhichOneof("type") for m in msgs]
    sessions = [i for i, k in enumerate(kinds) if k == "new_session"]
    assert sessions, kinds
    first_page = msgs[sessions[0]].new_session.page_script_hash
    switch = next((i for i in sessions
                   if msgs[i].new_session.page_script_hash != first_page), None)
    assert switch is not None, "no run of another page after Start"
    # A fragment's own refresh is a run too (its message names the fragment): skip those.
    full_runs = [i for i in sessions if i < switch and not msgs[i].metadata.run.fragment_ids]
    assert full_runs, "no full run of the page before the switch"
    return [str(m.auto_rerun.fragment_id) for m in msgs[full_runs[-1]:switch]
            if m.WhichOneof("type") == "auto_rerun"]


def test_start_then_live_page_on_a_loaded_machine(served, page):
    url, store, folder = served
    page_errors: list[str] = []
    frames: list[bytes] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f)))

    page.goto(url + "/new_run")
    page.get_by_text("Estimated on this machine").wait_for()
    use_image_folder(page, folder)
    page.get_by_text("Random (from scratch)", exact=True).click()
    wait_idle(page)
    # Small batches (128 -> 8): many steps, so the progress moves while it is watched.
    batch = page.locator(".stSlider").filter(has_text="Batch size").get_by_role("slider")
    batch.focus()
    for _ in range(4):
        batch.press("ArrowLeft")
    wait_idle(page)

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]
    try:
        frames.clear()
        page.evaluate(BLANK_WATCH_JS)
        page.get_by_role("button", name="Start", exact=True).click()
        page.wait_for_url(re.compile(r"/runs\?run=[\w-]+$"))
        run_id = page.url.rsplit("=", 1)[1]
        wait_for(lambda: store.get_run(run_id).progress.phase == "training", 300,
                 "the run to train")
        texts = [page.evaluate(PROGRESS_JS)]
        end = time.monotonic() + WATCH_S
        while time.monotonic() < end and store.get_run(run_id).status == "running":
            page.wait_for_function(f"prev => ({PROGRESS_JS})() !== prev", arg=texts[-1],
                                   timeout=CHANGE_TIMEOUT_MS)
            texts.append(page.evaluate(PROGRESS_JS))
        blank, samples = page.evaluate("() => [window.__blank, window.__samples]")
        page.screenshot(path=str(ARTIFACTS / "e2e-loaded-live.png"))
    finally:
        for b in burners:
            b.kill()
            b.wait()

    # The protocol: the run that left New run started no refresh timer that could fire
    # while the switch was under way.
    assert timers_before_page_change(forward_messages(frames)) == []
    # What the user sees.
    assert page_errors == []
    assert samples > 20
    assert blank == 0, f"the page was blank in {blank} of {samples} samples"
    assert len(set(texts)) >= 4, texts
