"""Viewer mode and who may do what (core.access): the rules as functions, then the whole app
in AppTest as a viewer, page by page, with every control on each page listed and none that
starts, cancels, deletes, resumes, imports, exports, downloads or uploads weights; the same
listing in the lab finds them (so the listing can see such controls)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages._common import SELECTED_RUN
from core import access
from core.access import Access, Mode, Settings, Visitor
from core.engine.paths import DATA_ROOTS_ENV
from core.runs.store import RunStore
from tests.conftest import make_image_folder, tiny_config
from tests.test_classify_page import FIVE, add_model_run

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
TIMEOUT_S = 240  # whole app, torch import and a model load, on a loaded 2-core machine
ARTIFACTS = ROOT / "test-artifacts"

# A control whose label or key says it changes runs, data or weights.
FORBIDDEN = re.compile(r"\b(start|cancel|stop|delete|resume|free|export|import|download|save|"
                       r"upload|train|queue|run it|launch|clean)\b", re.IGNORECASE)
# Kinds of element that are controls (a viewer may only look and choose what to look at).
CONTROL_TYPES = ("button", "download_button", "form_submit_button", "file_uploader", "page_link",
                 "link_button", "camera_input", "text_input", "text_area", "number_input",
                 "checkbox", "toggle", "radio", "selectbox", "multiselect", "slider",
                 "select_slider", "segmented_control", "pills", "button_group", "data_editor",
                 "chat_input", "audio_input", "color_picker", "date_input", "time_input",
                 "menu_button")


# ---------------------------------------------------------------- the rules


def test_settings_come_from_the_environment_before_secrets():
    s = access.read_settings({access.MODE_ENV: "Viewer", access.ALLOW_ENV: "Ada@Example.org, @lab.io"},
                             {"mode": "lab", "viewer_pages": ["runs", "compare"], "present_run": "r1"})
    assert s == Settings(Mode.VIEWER, ("runs", "compare"), ("ada@example.org", "@lab.io"), "r1")
    assert access.read_settings({}, None) == Settings()


@pytest.mark.parametrize("env, words", [
    ({access.MODE_ENV: "kiosk"}, '"lab" or "viewer"'),
    ({access.VIEWER_PAGES_ENV: "runs,new_run"}, "new_run"),
    ({access.ALLOW_ENV: "example.org"}, "@example.org"),
])
def test_a_setting_that_is_not_allowed_is_refused_in_words(env, words):
    with pytest.raises(access.AccessError, match=re.escape(words)):
        access.read_settings(env)


def test_without_a_provider_the_mode_decides_for_everyone():
    assert access.decide(Settings(), sign_in=False).lab
    viewer = access.decide(Settings(Mode.VIEWER, ("runs",)), sign_in=False)
    assert viewer.mode is Mode.VIEWER and not viewer.may_change()
    assert viewer.offers("runs") and not viewer.offers("compare")


def test_with_a_provider_only_allowed_signed_in_users_get_the_lab():
    s = Settings(allow=("ada@example.org", "@lab.io"))
    assert access.decide(s, True, access.ANONYMOUS).mode is Mode.VIEWER
    assert access.decide(s, True, Visitor(True, "Ada@Example.org")).lab
    assert access.decide(s, True, Visitor(True, "bob@lab.io")).lab
    assert access.decide(s, True, Visitor(True, "eve@lab.io.evil.com")).mode is Mode.VIEWER
    stranger = access.decide(s, True, Visitor(True, "eve@gmail.com"))
    assert stranger.mode is Mode.VIEWER and "allow-list" in stranger.reason
    # Sign-in overrides "lab" mode for strangers: a provider anyone can use opens nothing.
    assert access.decide(Settings(Mode.LAB), True, Visitor(True, "eve@gmail.com")).mode is Mode.VIEWER
    assert access.decide(s, True, Visitor(True, "bob@lab.io")).started_by == "bob@lab.io"


def test_sign_in_needs_a_complete_auth_table():
    base = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x"}
    provider = {"client_id": "c", "client_secret": "s",
                "server_metadata_url": "http://localhost:9400/.well-known/openid-configuration"}
    assert access.sign_in_configured({**base, **provider})
    assert access.sign_in_configured({**base, "corp": provider})
    assert not access.sign_in_configured(base)
    assert not access.sign_in_configured({**provider, "redirect_uri": "x"})
    assert not access.sign_in_configured(None)


@pytest.mark.parametrize("address, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("", False), (None, False), ("192.168.1.5", False), ("myhost", False)])
def test_loopback_addresses(address, loopback):
    assert access.is_loopback(address) is loopback


def test_the_lab_is_refused_off_loopback_without_sign_in_or_viewer_mode():
    line = access.serving_refusal("0.0.0.0", Settings(), sign_in=False)
    assert line and "0.0.0.0" in line and "FINETUNE_LAB_MODE=viewer" in line and "\n" not in line
    assert access.serving_refusal("localhost", Settings(), sign_in=False) is None
    assert access.serving_refusal("0.0.0.0", Settings(Mode.VIEWER), sign_in=False) is None
    assert access.serving_refusal("0.0.0.0", Settings(), sign_in=True) is None


# ---------------------------------------------------------------- the app as a viewer


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """A store with a finished two-stage run (a model to present) and a failed one (Runs
    would offer Resume)."""
    root = tmp_path_factory.mktemp("viewer")
    data = make_image_folder(root / "colors5", per_class=4, classes=FIVE)
    store = RunStore(root / "runs")
    add_model_run(store, tiny_config(data, classes=FIVE), "finished-run", 0.8)
    failed = store.create_run(tiny_config(data, classes=FIVE), name="failed-run")
    assert store.claim_run_now(failed.id, os.getpid())
    store.finish_run(failed.id, "failed", "out of memory")
    return store.root


def controls(at: AppTest) -> list[tuple[str, str, str]]:
    """Every control on the page: (kind, label, key)."""
    found = []
    for kind in CONTROL_TYPES:
        for el in at.get(kind):
            label = str(getattr(el, "label", "") or getattr(el.proto, "label", ""))
            found.append((kind, label, str(getattr(el, "key", "") or "")))
    return found


def app_in(monkeypatch, store_root: Path, **env: str) -> AppTest:
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(store_root))
    monkeypatch.setenv(DATA_ROOTS_ENV, str(store_root.parent))  # the examples' folder
    for name in (access.MODE_ENV, access.VIEWER_PAGES_ENV, access.ALLOW_ENV, access.PRESENT_RUN_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AppTest.from_file(APP, default_timeout=TIMEOUT_S)


VIEWER_PAGES = ("app_pages/present.py", "app_pages/overview.py", "app_pages/runs.py",
                "app_pages/compare.py")


def listing_per_page(at: AppTest, pages) -> dict[str, list[tuple[str, str, str]]]:
    out = {}
    for page in pages:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        out[page] = controls(at)
    return out


def test_a_viewer_finds_no_control_that_changes_anything(monkeypatch, store_root):
    at = app_in(monkeypatch, store_root, **{access.MODE_ENV: "viewer",
                                            access.VIEWER_PAGES_ENV: "overview,runs,compare"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    listing = listing_per_page(at, VIEWER_PAGES)
    # Runs on each run: the lab offers to resume and delete the failed one.
    for run in RunStore(store_root).list_runs():
        at.session_state[SELECTED_RUN] = run.id
        at.switch_page("app_pages/runs.py").run()
        assert not at.exception
        listing[f"app_pages/runs.py ({run.name})"] = controls(at)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer-controls.txt").write_text(
        "\n".join(f"{page}: {kind} {label!r} key={key}" for page, items in listing.items()
                  for kind, label, key in items))
    everything = [c for items in listing.values() for c in items]
    assert everything, "the listing found no controls at all"
    bad = [c for c in everything if FORBIDDEN.search(c[1]) or FORBIDDEN.search(c[2].replace(".", " ").replace("_", " "))]
    assert not bad, bad
    kinds = {kind for kind, _, _ in everything}
    assert not kinds & {"download_button", "form_submit_button", "text_input", "text_area",
                        "data_editor"}, kinds
    # The presenter view's picture sources: the only uploader takes a photo, size-limited.
    at.switch_page("app_pages/present.py").run()
    for source in ("Upload", "Camera"):
        at.segmented_control(key="present.source").set_value(source).run()
        assert not at.exception
        found = controls(at)
        assert not [c for c in found if FORBIDDEN.search(c[1]) and c[0] != "file_uploader"], found
    at.segmented_control(key="present.source").set_value("Upload").run()
    (uploader,) = at.get("file_uploader")
    assert uploader.proto.max_upload_size_mb == access.VIEWER_UPLOAD_MB


def test_the_same_listing_in_the_lab_finds_the_controls(monkeypatch, store_root):
    """The control listing is not blind: in the lab the failed run offers Resume and Delete."""
    at = app_in(monkeypatch, store_root)
    at.run()
    at.session_state[SELECTED_RUN] = RunStore(store_root).list_runs(statuses=("failed",))[0].id
    at.switch_page("app_pages/runs.py").run()
    labels = [label for _, label, _ in controls(at)]
    assert any(label.startswith("Resume") for label in labels), labels
    assert "Delete this run…" in labels


def test_a_viewer_gets_only_the_presenter_view_unless_the_owner_allows_more(monkeypatch, store_root):
    at = app_in(monkeypatch, store_root, **{access.MODE_ENV: "viewer"})
    at.run()
    assert not at.exception
    # An example is shown with the model's verdict (not the prompt to pick a picture).
    assert any("present-verdict" in h.proto.body and "present-prompt" not in h.proto.body
               for h in at.get("html"))
    with pytest.raises(Exception):  # noqa: B017  (Streamlit raises for a page not in the app)
        at.switch_page("app_pages/new_run.py").run()
    assert not at.sidebar.children or not controls_in_sidebar(at)


def controls_in_sidebar(at: AppTest) -> list:
    return [el for kind in CONTROL_TYPES for el in at.sidebar.get(kind)]


def test_the_lab_on_every_interface_shows_only_the_refusal(monkeypatch, store_root):
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    try:
        at = app_in(monkeypatch, store_root).run()
    finally:
        config.set_option("server.address", before)
    assert not at.exception
    assert [e.value for e in at.error] and "Refusing to serve the lab on 0.0.0.0" in at.error[0].value
    assert not controls(at)


def test_access_object_is_the_only_judge():
    """Pages hold no rule of their own: a viewer Access says no to every change."""
    a = Access(Mode.VIEWER, (), access.ANONYMOUS, False, "viewer")
    assert not a.may_change() and not a.offers("runs") and a.started_by is None


# ---------------------------------------------------------------- scripts/start.sh's check


def test_start_refuses_the_lab_on_every_interface_with_the_fix(tmp_path):
    """What scripts/start.sh runs before starting Streamlit: the address from the command
    line (both forms), Streamlit's environment variable or config.toml; viewer mode or a
    configured provider lets it start."""
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "config.toml").write_text('[server]\naddress = "localhost"\n')
    assert access.refusal_at_start(tmp_path, [], {}) is None
    line = access.refusal_at_start(tmp_path, ["--server.address", "0.0.0.0"], {})
    assert line and line.startswith("Refusing to serve the lab on 0.0.0.0") and "Fix:" in line
    assert access.refusal_at_start(tmp_path, ["--server.address=192.168.0.9"], {})
    assert access.refusal_at_start(tmp_path, [], {access.ADDRESS_ENV: "0.0.0.0"})
    assert access.refusal_at_start(tmp_path, ["--server.address", "0.0.0.0"],
                                   {access.MODE_ENV: "viewer"}) is None
    (tmp_path / ".streamlit" / "secrets.toml").write_text(
        '[auth]\nredirect_uri = "http://lab.example.org/oauth2callback"\ncookie_secret = "s"\n'
        'client_id = "c"\nclient_secret = "x"\n'
        'server_metadata_url = "https://id.example.org/.well-known/openid-configuration"\n')
    assert access.refusal_at_start(tmp_path, ["--server.address", "0.0.0.0"], {}) is None

