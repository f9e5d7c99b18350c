"""End to end in a real browser: on the Search page a search is started from the form
(a generated image folder, random weights), its driver and trials run as real background
processes, and the page shows the recommendation in words and the parallel-coordinates
chart as trials finish. Screenshot: test-artifacts/e2e-search.png (and, with
FINETUNE_LAB_SCREENSHOTS set, search.png there for the README).

Run alone:  .venv/bin/python -m pytest -q -m browser tests/test_search_browser.py
"""

from __future__ import annotations

import os

import pytest

from core.analysis import search as searchmod
from core.runs.store import RunStore
from tests.browser_support import (
    browser_page,
    require_browser,
    serve_app,
    shot,
    stop_active_runs,
    wait_idle,
)
from tests.conftest import make_image_folder, wait_for

SEARCH_TIMEOUT_MS = 900_000  # three tiny trials on a loaded 2-core machine, worker starts included
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_browser()
    base = tmp_path_factory.mktemp("e2e-search")
    make_image_folder(base / "datasets" / "colors", per_class=12)
    store = RunStore(base / "runs")
    env = {**os.environ, "FINETUNE_LAB_DATA": str(store.root),
           "FINETUNE_LAB_DATA_ROOTS": str(base / "datasets"),
           "TORCH_HOME": str(base / "torch-home"),  # no ImageNet weights: never downloads
           "FINETUNE_LAB_MAX_JOBS": "1"}
    try:
        with serve_app(env, "streamlit-server-search.log") as url:
            yield url, store
    finally:
        for sid in searchmod.list_searches(store):
            searchmod.request_stop(store, sid)
        stop_active_runs(store)


def choose(pg, label: str, option: str) -> None:
    pg.get_by_role("combobox", name=label).click()
    pg.get_by_role("option", name=option, exact=True).click()
    wait_idle(pg)


def test_a_search_started_in_the_browser_recommends_a_recipe_with_parcoords(served):
    url, store = served
    with browser_page(viewport={"width": 1400, "height": 1400}) as pg:
        pg.goto(url + "/search")
        pg.get_by_text("No searches yet").wait_for()
        choose(pg, "Starting weights", "Random (from scratch)")
        choose(pg, "Device", "CPU")
        trials = pg.get_by_role("spinbutton", name="Trials")
        trials.fill("3")
        trials.press("Enter")
        wait_idle(pg)
        pg.get_by_role("textbox", name="Search name (optional)").fill("browser search")
        pg.keyboard.press("Tab")
        wait_idle(pg)
        pg.get_by_role("button", name="Start the search").click()

        wait_for(lambda: searchmod.list_searches(store), 60, "the search to be recorded")
        [sid] = searchmod.list_searches(store)
        # The page refreshes itself while the search runs: no reload.
        pg.get_by_role("heading", name="Recommended recipe").wait_for(timeout=SEARCH_TIMEOUT_MS)
        shot(pg, "search-first-trial", height=2200)
        parcoords = pg.locator("g.parcoords").first
        parcoords.wait_for(state="attached", timeout=60_000)
        wait_for(lambda: searchmod.summary(store, sid).state == "finished", 900,
                 "the search to finish")
        pg.get_by_text("finished: 3 of 3 trials done").wait_for(timeout=60_000)
        best = searchmod.summary(store, sid).best
        assert best is not None
        recommendation = pg.get_by_test_id("stAlertContentSuccess")
        recommendation.get_by_text(searchmod.describe_recipe(best.config)).wait_for(timeout=60_000)
        pg.locator("g.parcoords").first.wait_for(state="attached", timeout=60_000)
        wait_idle(pg)
        shot(pg, "search", "search.png", height=2200)
