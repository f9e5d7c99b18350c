"""Sign-in through a real OpenID Connect provider: oidc-provider-mock (PyPI, built on authlib)
serves on loopback; the app is started with an [auth] table pointing at it and an allow-list;
Chromium signs in with Streamlit's own st.login and gets the lab (New run opens), signs out
and gets only the viewer pages (New run's URL opens the presenter view). A signed-in user who
is not on the allow-list stays a viewer."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from core import access
from core.engine.paths import DATA_ROOTS_ENV
from core.runs.store import RunStore
from tests.browser_support import (
    browser_page,
    free_port,
    require_browser,
    serve_app,
    shot,
    wait_idle,
)
from tests.conftest import make_image_folder, tiny_config
from tests.test_classify_page import FIVE, add_model_run

ALLOWED = "ada@example.org"
STRANGER = "eve@elsewhere.net"


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    """oidc-provider-mock on a free loopback port, with the two users' claims."""
    require_browser()
    mock = pytest.importorskip("oidc_provider_mock")
    with mock.run_server_in_thread(port=free_port()) as server:
        url = f"http://localhost:{server.server_port}"
        for email, name in ((ALLOWED, "Ada"), (STRANGER, "Eve")):
            req = urllib.request.Request(f"{url}/users/{quote(email)}", method="PUT",
                                         data=json.dumps({"email": email, "name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 204
        yield url


@contextlib.contextmanager
def app_with_sign_in(provider_url: str, tmp_path) -> Iterator[str]:
    """The app on a free localhost port with [auth] for the provider in its own secrets file
    (--secrets.files: the repo's .streamlit/ stays untouched) and ALLOWED on the allow-list."""
    port = free_port()
    url = f"http://localhost:{port}"
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(
        "[auth]\n"
        f'redirect_uri = "{url}/oauth2callback"\n'
        'cookie_secret = "a-test-cookie-secret-not-used-anywhere-else"\n'
        'client_id = "finetune-lab"\n'
        'client_secret = "test-secret"\n'
        f'server_metadata_url = "{provider_url}/.well-known/openid-configuration"\n'
        "[lab]\n"
        f'allow = ["{ALLOWED}"]\n')
    data = make_image_folder(tmp_path / "colors5", per_class=4, classes=FIVE)
    store = RunStore(tmp_path / "runs")
    add_model_run(store, tiny_config(data, classes=FIVE), "demo", 0.8)
    env = {k: v for k, v in os.environ.items()
           if k not in (access.MODE_ENV, access.ALLOW_ENV, access.VIEWER_PAGES_ENV)}
    env["FINETUNE_LAB_DATA"] = str(store.root)
    env[DATA_ROOTS_ENV] = str(tmp_path)  # the example pictures' folder may be read
    with serve_app(env, "streamlit-signin.log", port, ("--secrets.files", str(secrets))) as served:
        yield served


def sign_in_as(pg, email: str) -> None:
    pg.get_by_role("button", name="Sign in").click()
    pg.locator("input[name=sub]").fill(email)  # the provider's own authorization form
    pg.get_by_role("button", name="Authorize").click()


def shows_presenter_view(pg) -> None:
    pg.locator(".present-verdict:not(.present-prompt)").wait_for()
    wait_idle(pg)


def test_sign_in_and_out_through_a_real_provider(provider, tmp_path):
    with app_with_sign_in(provider, tmp_path) as url, browser_page() as pg:
        # Signed out: the presenter view only; New run's URL does not open New run.
        pg.goto(url + "/new_run")
        shows_presenter_view(pg)  # under Streamlit's "Page not found" notice
        assert pg.get_by_role("heading", name="New run").count() == 0
        pg.goto(url)
        shows_presenter_view(pg)
        assert pg.get_by_role("link", name="New run").count() == 0
        # Signed in (allow-listed): the lab, with New run in the navigation and by URL.
        sign_in_as(pg, ALLOWED)
        pg.get_by_text(f"Signed in as {ALLOWED}.").wait_for()
        wait_idle(pg)
        pg.get_by_role("link", name="New run").first.wait_for()
        pg.goto(url + "/new_run")
        pg.get_by_role("heading", name="New run").wait_for()
        wait_idle(pg)
        shot(pg, "signin-lab", None)
        # Signed out again: only the viewer pages.
        pg.get_by_role("button", name="Sign out").click()  # in the sidebar of the lab
        # st.logout ends the session at the provider too (its end-session page), which
        # sends the browser back to the app.
        pg.get_by_role("button", name="End session").click()
        shows_presenter_view(pg)
        pg.get_by_role("button", name="Sign in").wait_for()
        pg.goto(url + "/new_run")
        shows_presenter_view(pg)
        assert pg.get_by_role("heading", name="New run").count() == 0


def test_a_signed_in_user_off_the_allow_list_stays_a_viewer(provider, tmp_path):
    with app_with_sign_in(provider, tmp_path) as url, browser_page() as pg:
        pg.goto(url)
        shows_presenter_view(pg)
        sign_in_as(pg, STRANGER)
        pg.get_by_text("not on the lab's allow-list", exact=False).wait_for()
        shows_presenter_view(pg)
        pg.goto(url + "/new_run")
        shows_presenter_view(pg)
        assert pg.get_by_role("heading", name="New run").count() == 0
        shot(pg, "signin-stranger", None)
