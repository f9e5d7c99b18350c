"""The live page on a loaded machine (issue 12.7): a run is watched in a real browser while a
CPU burner per core runs beside it at normal priority, and the page must keep updating (its
progress text changes) and never go blank. Workers run at nice 10 (core.runs.worker), so
the Streamlit server, at nice 0, gets its share of the CPU before training does.

Debian chromium driven by Playwright, the app served by `streamlit run` on localhost with a
temporary run store (tests/browser_support.py).

Run alone:  .venv/bin/python -m pytest -q -m browser -k loaded tests/test_e2e_loaded.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from core import config as cfgmod
from core.runs import jobs
from core.runs.store import RunStore
from tests.browser_support import (
    ARTIFACTS,
    browser_page,
    require_browser,
    serve_app,
    stop_active_runs,
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


def test_live_page_keeps_updating_on_a_loaded_machine(served, page):
    url, store, folder = served
    cfg = cfgmod.preset_config("Two-stage", epochs=6, lr=0.01, data_source="folder",
                               data_path=str(folder), weights="random", batch_size=8,
                               device="cpu")
    cfg = replace(cfg, val_fraction=0.2)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]
    try:
        run = jobs.submit(store, cfg, name="loaded run")
        page.goto(url + "/runs")
        page.get_by_role("heading", name="Runs").wait_for()
        page.evaluate(BLANK_WATCH_JS)
        wait_for(lambda: store.get_run(run.id).progress.phase == "training", 300,
                 "the run to train")
        texts = [page.evaluate(PROGRESS_JS)]
        end = time.monotonic() + WATCH_S
        while time.monotonic() < end and store.get_run(run.id).status == "running":
            page.wait_for_function(f"prev => ({PROGRESS_JS})() !== prev", arg=texts[-1],
                                   timeout=CHANGE_TIMEOUT_MS)
            texts.append(page.evaluate(PROGRESS_JS))
        blank, samples = page.evaluate("() => [window.__blank, window.__samples]")
        page.screenshot(path=str(ARTIFACTS / "e2e-loaded-live.png"))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert samples > 20
    assert blank == 0, f"the page was blank in {blank} of {samples} samples"
    assert len(set(texts)) >= 4, texts
