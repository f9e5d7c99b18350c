"""Helpers shared by the pages: store access, the sidebar job panel, the run picker and the
links between pages.

Session keys: each page prefixes its own keys with its name ("runs.", "compare.",
"insights.", ...); the few keys that carry a choice from one page to another are defined
here, once.

The store is not cached across reruns: it is re-opened on every call (cheap: one SQLite
connection per query), so new runs always show. The data-set folder scan is cached for 30 s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import streamlit as st

from core import access as access_rules
from core.analysis import planning, speed
from core.engine.datasets import DatasetInfo, list_datasets
from core.engine.paths import data_roots
from core.runs import jobs
from core.runs.entities import TRAINING_KINDS
from core.runs.store import Run, RunStore, StoreError
from core.views.tables import fmt_pct, progress_fraction, progress_text, short_id
from core.views.text import md

# Cross-page session keys.
SELECTED_RUN = "selected_run_id"  # the run last picked: Runs, Run insights and Classify open it
HANDED_DATA_PATH = "new_run_data_path"  # a data folder handed to New run (used there once)

RUNS_PAGE = "app_pages/runs.py"
INSIGHTS_PAGE = "app_pages/insights.py"
NEW_RUN_PAGE = "app_pages/new_run.py"
DATASETS_PAGE = "app_pages/datasets.py"
SIDEBAR_REFRESH_S = 3  # seconds between sidebar job-panel refreshes
APP_TITLE = "Two-Stage Fine-Tuning Lab"  # the browser tab's title when nothing runs
WATCHED = "_common.watched_runs"  # {run id: name} of runs this session saw queued or running


def _secrets_table(name: str) -> Mapping[str, object] | None:
    """A table of .streamlit/secrets.toml, or None (no file, no such table)."""
    try:
        table = st.secrets.get(name)
    except Exception:  # no secrets file at all, or one that does not parse
        return None
    return table if isinstance(table, Mapping) else None


def access() -> access_rules.Access:
    """What this visitor gets (lab or viewer mode), decided by core.access from the
    environment, .streamlit/secrets.toml ([lab], [auth]) and the signed-in user (st.user).
    The app and every page ask here; nothing else looks at identity."""
    sign_in = access_rules.sign_in_configured(_secrets_table("auth"))
    settings = access_rules.read_settings(os.environ, _secrets_table(access_rules.SECRETS_TABLE))
    visitor = access_rules.ANONYMOUS
    if sign_in and st.user.is_logged_in:
        email, name = st.user.get("email"), st.user.get("name")
        visitor = access_rules.Visitor(True, str(email) if email else None,
                                       str(name) if name else None)
    return access_rules.decide(settings, sign_in, visitor)


def get_store() -> RunStore:
    """The run store at $FINETUNE_LAB_DATA (or ./runs); stops the page with a readable
    message if it cannot be opened."""
    try:
        return RunStore()
    except StoreError as exc:
        st.error(str(exc))
        st.stop()
        raise  # unreachable; st.stop raises


# URL query parameters: the view a link or a reload opens (st.query_params).
RUN_PARAM = "run"  # a run id, on the pages that show one run


def open_run(run_id: str, page: str = RUNS_PAGE) -> None:
    """Open a run on the Runs page (or another page that shows one run), with the run in
    the URL."""
    st.session_state[SELECTED_RUN] = run_id
    st.switch_page(page, query_params={RUN_PARAM: run_id})


def pick_run(label: str, runs: list[Run], key: str, format_func: Callable[[Run], str],
             default_id: str | None = None, help: str | None = None) -> Run:
    """A run picker that opens on the run in the URL (?run=id: a shared link, a reload),
    else the run picked last on any page (SELECTED_RUN), else `default_id`, else the first
    run; picking one here makes it the shared choice and puts it in the URL."""
    by_id = {r.id: r for r in runs}
    linked = st.query_params.get(RUN_PARAM)
    shared = st.session_state.get(SELECTED_RUN)
    chosen = next((i for i in (linked, shared, default_id) if i in by_id), runs[0].id)
    st.session_state[key] = chosen
    if chosen == linked:
        st.session_state[SELECTED_RUN] = chosen

    def remember() -> None:
        picked = st.session_state[key]
        # The selectbox sends back the label the browser shows; a label that changed since
        # (queued -> running, a new best) maps to no option and arrives as the label text.
        # It is not a choice: keep the run shown (the code above re-selects it).
        if picked in by_id:
            st.session_state[SELECTED_RUN] = picked
            st.query_params[RUN_PARAM] = picked

    st.selectbox(label, list(by_id), key=key, on_change=remember,
                 format_func=lambda i: format_func(by_id[i]), help=help)
    st.query_params[RUN_PARAM] = chosen
    return by_id[chosen]


def page_link(page: str, label: str, icon: str, title: str) -> None:
    """A link to another page; in words when that page is not registered (a page served
    alone, as the page tests do). `title` is the page's name in the navigation."""
    try:
        st.page_link(page, label=label, icon=icon)
    except Exception:  # streamlit raises when the page is not part of the app
        st.markdown(f"Open **{title}** in the navigation.")


def new_run_link(label: str = "New run") -> None:
    if not access().may_change():  # a viewer has no New run page
        return
    page_link(NEW_RUN_PAGE, label, ":material/add_circle:", "New run")


def tab_title(running: list[Run], queued: int = 0) -> str:
    """The browser tab's title: the running run's progress first, so it shows in a
    background tab; else how many runs wait."""
    if not running:
        return f"{queued} queued · {APP_TITLE}" if queued else APP_TITLE
    run = running[0]
    more = f" +{len(running) - 1}" if len(running) > 1 else ""
    return f"{100 * progress_fraction(run):.0f} % {run.name}{more} · {APP_TITLE}"


def notify_ended(store: RunStore, active_ids: set[str]) -> None:
    """A toast for each run this session watched (queued or running) that has since
    finished, failed or been cancelled: on whatever page is open, since the sidebar is on
    every page. Compares with the previous refresh's statuses in session state."""
    watched: dict[str, str] = st.session_state.setdefault(WATCHED, {})
    for run_id in [i for i in watched if i not in active_ids]:
        name = watched.pop(run_id)
        run = store.get_run(run_id)
        if run is None:
            continue
        if run.status == "finished":
            # A tool's job (an LR finder's, an export's) has no validation accuracy.
            best = (f": best validation {fmt_pct(run.best_val_acc)}" if run.kind in TRAINING_KINDS
                    else "")
            st.toast(f"**{md(name)}** finished{best}.",
                     icon=":material/check_circle:", duration="long")
        elif run.status == "failed":
            st.toast(f"**{md(name)}** failed: {md(run.error) if run.error else 'see its log on Runs'}.",
                     icon=":material/error:", duration="long")
        elif run.status == "cancelled":
            st.toast(f"**{md(name)}** was cancelled.", icon=":material/stop_circle:",
                     duration="long")


@st.fragment(run_every=SIDEBAR_REFRESH_S)
def jobs_panel() -> None:
    """Running and queued jobs with progress; refreshes itself without rerunning the page.
    The queue supervisor (core.runs.supervisor), not a browser tab, settles dead runs and
    starts queued ones; the panel only makes sure one watches (after a restart nothing else
    would start it). It also tells when a watched run ends (a toast) and puts the running
    run's progress in the tab title."""
    store = get_store()
    try:
        jobs.ensure_watched(store)
        s = jobs.summary(store)
    except StoreError as exc:
        st.warning(f"Job status unavailable: {md(exc)}")
        return
    if notice := jobs.cluster_notice(store, short=True):  # a lost Ray head, since when
        st.warning(notice.replace("\\", "\\\\").replace("`", "\\`").replace("*", "\\*")
                   .replace("_", "\\_"), icon=":material/cloud_off:")
    active = {r.id: r.name for r in (*s.running, *s.queued)}
    notify_ended(store, set(active))
    st.session_state[WATCHED].update(active)
    st.set_page_config(page_title=tab_title(list(s.running), len(s.queued)))
    st.markdown("**Jobs**")
    if not s.running and not s.queued:
        st.caption("Nothing running. Start a run on **New run**.")
        return
    for run in s.running:
        st.markdown(f":material/play_circle: {md(run.name)} · `{short_id(run.id)}`")
        st.progress(progress_fraction(run), text=progress_text(run))
    if s.queued:
        st.caption(f"{len(s.queued)} queued: " + ", ".join(md(r.name) for r in s.queued[:5])
                   + (" …" if len(s.queued) > 5 else ""))


def render_sidebar() -> None:
    with st.sidebar:
        jobs_panel()


def no_runs_message() -> None:
    if not access().may_change():
        st.info("No runs yet.")
        return
    st.info("No runs yet — start one on **New run**.")
    new_run_link()


@st.cache_resource(max_entries=6, show_spinner="Loading the model…")
def _load_predictor(path: str, mtime_ns: int):
    """One Predictor per checkpoint file version: a retrained/overwritten file (new mtime)
    is loaded afresh. Raises CheckpointError with a plain message."""
    from core.analysis import inference

    del mtime_ns  # part of the cache key only
    return inference.Predictor.load(path)


def predictor_for(path: str | Path):
    """The checkpoint's Predictor (core.analysis.inference), shared by every session."""
    p = Path(path)
    return _load_predictor(str(p), p.stat().st_mtime_ns)


@st.cache_data(ttl=30, show_spinner=False)
def _datasets_under(roots: tuple[str, ...]) -> list[DatasetInfo]:
    return list_datasets([Path(r) for r in roots])


def found_datasets() -> list[DatasetInfo]:
    """The data sets under the data roots; the folder scan is cached for 30 s (keyed on the
    roots). Call forget_datasets() after adding one so it shows at once."""
    return _datasets_under(tuple(str(r) for r in data_roots()))


def forget_datasets() -> None:
    _datasets_under.clear()


@st.cache_data(ttl=30, show_spinner=False)
def epoch_estimate(groups: tuple[str, ...], n_images: int, resolution: int, feature_cache: bool,
                   device: str | None, store_root: str) -> speed.EpochEstimate:
    """Estimated seconds per epoch and how sure the figure is (New run, Experiments); the
    measured-speed lookup reads the run store, so it is cached for 30 s per stage shape
    instead of repeated on every rerun."""
    return speed.epoch_estimate(groups, n_images, resolution, feature_cache,
                                store=RunStore(store_root), device=device)


@st.cache_data(ttl=30, show_spinner="Scanning the image folder…")
def scan_image_folder(path: str) -> planning.FolderScan:
    """A data folder's classes and images per class (New run, Experiments), cached 30 s."""
    return planning.scan_image_folder(Path(path))


def serving_refusal() -> str | None:
    """Why the lab must not be served on this server's address (core.access), said once in
    the server's log as well; None when it may."""
    sign_in = access_rules.sign_in_configured(_secrets_table("auth"))
    settings = access_rules.read_settings(os.environ, _secrets_table(access_rules.SECRETS_TABLE))
    refusal = access_rules.serving_refusal(st.get_option("server.address"), settings, sign_in)
    if refusal:
        _log_refusal(refusal)
    return refusal


@st.cache_resource(show_spinner=False)
def _log_refusal(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)
