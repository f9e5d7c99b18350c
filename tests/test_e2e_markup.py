"""In a real browser, text users typed is shown as text: runs, tags, notes, seed groups,
errors and experiments holding markdown images and HTML tags that point at a beacon server
this test runs on loopback make the pages request nothing from it, on every page that shows
them (the sidebar's job list included), and the text itself is on the page as typed.

Run alone:  .venv/bin/python -m pytest -q -m browser tests/test_e2e_markup.py
"""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from core.runs.store import RunStore
from tests.browser_support import browser_page, require_browser, serve_app, shot, wait_idle
from tests.conftest import make_image_folder, tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]


class Beacon:
    """An HTTP server on 127.0.0.1 that records every path it is asked for."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server name)
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def image(self, what: str) -> str:
        return f"![]({self.url(what)})"

    def tag(self, what: str) -> str:
        return f'<img src="{self.url(what)}">'

    def url(self, what: str) -> str:
        return f"http://127.0.0.1:{self.port}/{what}"


@pytest.fixture(scope="module")
def beacon():
    b = Beacon()
    yield b
    b.server.shutdown()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, beacon):
    """(url, store, runs): the app over a store whose runs carry markup in every text field."""
    require_browser()
    base = tmp_path_factory.mktemp("markup")
    folder = make_image_folder(base / "datasets" / "colors", per_class=4)
    store = RunStore(base / "runs")
    cfg = tiny_config(folder)
    runs = {}
    for i, kind in enumerate(("failed", "running")):
        run = store.create_run(cfg, name=f"{beacon.image(f'name-{kind}')} x{i} \u202eevil",
                               group=f"{beacon.tag(f'group-{kind}')} g{i}")
        store.set_note(run.id, f"{beacon.image(f'note-{kind}')}\n<img src={beacon.url('note2')}>")
        store.set_tags(run.id, [beacon.image(f"tag-{kind}"), beacon.tag(f"tag2-{kind}")])
        # Claimed by this test process, which lives: the running one stays running.
        assert store.claim_run_now(run.id, os.getpid())
        runs[kind] = store.get_run(run.id)
    store.finish_run(runs["failed"].id, "failed", f"boom {beacon.image('error')}")
    env = {**os.environ, "FINETUNE_LAB_DATA": str(store.root),
           "FINETUNE_LAB_DATA_ROOTS": str(base / "datasets"),
           "TORCH_HOME": str(base / "torch-home"), "FINETUNE_LAB_MAX_JOBS": "1"}
    with serve_app(env, "streamlit-markup.log") as url:
        yield url, store, runs


def test_markup_in_user_text_is_shown_as_text_and_requests_nothing(hostile, beacon):
    url, store, runs = hostile
    for kind, run in runs.items():  # a fresh tab each: the Runs page remembers its pick
        with browser_page() as page:
            page.goto(url + f"/runs?run={run.id}")
            wait_idle(page)
            # The markup is on the page as the user typed it (waited for: the page renders
            # in pieces); the bidi override is visible.
            for text in (beacon.tag(f"group-{kind}"), beacon.image(f"tag-{kind}")):
                page.get_by_text(text, exact=False).first.wait_for()
            shot(page, f"markup-runs-{kind}")
            body = page.locator("body").inner_text()
            box = page.locator('[data-testid="stSelectbox"]').first
            picker = box.evaluate("b => b.textContent + ' ' + [...b.querySelectorAll('input')]"
                                  ".map(i => i.value).join(' ')")
            assert "\\u202eevil" in picker, picker  # the override is shown, not obeyed
            assert "\u202e" not in body
    with browser_page() as page:
        # The sidebar's job list shows the running run's name on every page.
        for path in ("", "/compare", "/experiments", "/classify", "/insights"):
            page.goto(url + path)
            wait_idle(page)
            page.get_by_text("Jobs", exact=True).first.wait_for()
        page.get_by_text(beacon.image("name-running"), exact=False).first.wait_for()
        shot(page, "markup-sidebar")
    assert store.get_run(runs["running"].id).status == "running"
    # No page asked the beacon for anything (images load as the page renders; the polls
    # above waited for every page to settle).
    assert beacon.hits == [], beacon.hits
