"""The presenter view and viewer mode in a real browser (headless Debian chromium): a viewer
gets the presenter view with a verdict in big words, three bars and the heat map one tap
away, on a 1920x1080 screen and on a phone; the URL of a page the viewer is not given does
not open it; in the lab, ?present=1 hides the sidebar. Screenshots go to test-artifacts/ (and,
with FINETUNE_LAB_SCREENSHOTS set, the README's copies)."""

from __future__ import annotations

import os

import pytest

from core import access
from core.engine.paths import DATA_ROOTS_ENV
from core.runs.store import RunStore
from tests.browser_support import browser_page, require_browser, serve_app, shot, wait_idle
from tests.conftest import make_image_folder, tiny_config
from tests.test_classify_page import FIVE, add_model_run

WIDE = {"width": 1920, "height": 1080}
PHONE = {"width": 390, "height": 844}


def env_for(store_root, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (access.MODE_ENV, access.VIEWER_PAGES_ENV, access.ALLOW_ENV,
                        access.PRESENT_RUN_ENV)}
    # The example pictures' folder (beside the store) may be read.
    return {**env, "FINETUNE_LAB_DATA": str(store_root), DATA_ROOTS_ENV: str(store_root.parent),
            **extra}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    require_browser()
    root = tmp_path_factory.mktemp("present")
    data = make_image_folder(root / "colors5", per_class=4, classes=FIVE, size=64)
    store = RunStore(root / "runs")
    add_model_run(store, tiny_config(data, classes=FIVE), "demo", 0.8)
    return store.root


@pytest.fixture(scope="module")
def viewer_url(store_root):
    with serve_app(env_for(store_root, **{access.MODE_ENV: "viewer"}),
                   "streamlit-viewer.log") as url:
        yield url


def pictures_loaded(pg) -> None:
    """Until every picture on the page has arrived and been decoded (a screenshot or a size
    check before that sees an empty box)."""
    pg.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")


def verdict(pg):
    return pg.locator(".present-verdict:not(.present-prompt)")


def test_a_viewer_sees_the_presenter_view_on_a_wide_screen(viewer_url):
    with browser_page(WIDE) as pg:
        pg.goto(viewer_url)
        verdict(pg).wait_for()
        wait_idle(pg)
        pictures_loaded(pg)
        assert pg.locator(".present-bar").count() == 3
        size = verdict(pg).evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
        assert size >= 48, size  # px: readable from the back of a room at 1920 wide
        assert pg.locator("[data-testid=stSidebar]").count() == 0
        body = pg.locator("body").inner_text()
        assert "runs/" not in body and "best.pt" not in body
        shot(pg, "present-wide", "present.png", height=WIDE["height"])
        pg.get_by_text("What did it look at?").click()
        wait_idle(pg)
        pg.locator(".present-heat").wait_for()
        pictures_loaded(pg)
        shot(pg, "present-wide-heatmap", "present-heatmap.png", height=WIDE["height"])


def test_a_viewer_sees_the_presenter_view_on_a_phone(viewer_url):
    with browser_page(PHONE) as pg:
        pg.goto(viewer_url)
        verdict(pg).wait_for()
        wait_idle(pg)
        pictures_loaded(pg)
        box = verdict(pg).bounding_box()
        assert box and box["width"] <= PHONE["width"]  # nothing wider than the phone
        overflow = pg.evaluate("() => document.documentElement.scrollWidth")
        assert overflow <= PHONE["width"] + 1, overflow
        shot(pg, "present-phone", "present-phone.png", height=PHONE["height"])


def test_a_viewer_cannot_open_new_run_by_its_url(viewer_url):
    with browser_page() as pg:
        pg.goto(viewer_url + "/new_run")
        verdict(pg).wait_for()  # Streamlit serves the default page: the presenter view
        wait_idle(pg)
        assert pg.get_by_role("button", name="Start").count() == 0
        assert pg.get_by_text("Stages", exact=True).count() == 0
        for page in ("runs", "classify", "datasets", "experiments"):
            pg.goto(f"{viewer_url}/{page}")
            verdict(pg).wait_for()
            wait_idle(pg)
            assert pg.get_by_role("heading", name="Runs").count() == 0


def test_in_the_lab_present_1_hides_the_sidebar(store_root):
    with serve_app(env_for(store_root), "streamlit-present-lab.log") as url, \
            browser_page(WIDE) as pg:
        pg.goto(url + "/present")
        verdict(pg).wait_for()
        wait_idle(pg)
        pg.get_by_role("button", name="Hide these controls for the room").click()
        wait_idle(pg)
        pg.get_by_role("button", name="Show the controls").wait_for()
        assert "present=1" in pg.url
        assert pg.locator("[data-testid=stSidebar]").count() == 0
        assert pg.get_by_text("Presenter settings").count() == 0
