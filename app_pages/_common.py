"""Helpers shared by the pages: store access and the sidebar job panel.

The store is not cached across reruns: it is re-opened on every call (cheap: one SQLite
connection per query), so new runs always show. The data-set folder scan is cached for 30 s.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.engine.datasets import DatasetInfo, list_datasets
from core.engine.paths import data_roots
from core.runs import jobs
from core.runs.store import RunStore, StoreError
from core.views.tables import progress_fraction, progress_text

SELECTED_RUN = "selected_run_id"  # shared session key: the run the Runs page opens
SIDEBAR_REFRESH_S = 3  # seconds between sidebar job-panel refreshes


def get_store() -> RunStore:
    """The run store at $FINETUNE_LAB_DATA (or ./runs); stops the page with a readable
    message if it cannot be opened."""
    try:
        return RunStore()
    except StoreError as exc:
        st.error(str(exc))
        st.stop()
        raise  # unreachable; st.stop raises


def open_run(run_id: str) -> None:
    """Open a run on the Runs page."""
    st.session_state[SELECTED_RUN] = run_id
    st.switch_page("app_pages/runs.py")


@st.fragment(run_every=SIDEBAR_REFRESH_S)
def jobs_panel() -> None:
    """Running and queued jobs with progress; refreshes itself without rerunning the page.
    Until a supervisor does it (a later issue), the sidebar advances the queue: runs whose
    worker died are marked failed and queued runs start in their place."""
    store = get_store()
    try:
        jobs.advance_queue(store)
        s = jobs.summary(store)
    except StoreError as exc:
        st.warning(f"Job status unavailable: {exc}")
        return
    st.markdown("**Jobs**")
    if not s.running and not s.queued:
        st.caption("Nothing running. Start a run on **New run**.")
        return
    for run in s.running:
        st.markdown(f"▶️ {run.name}")
        st.progress(progress_fraction(run), text=progress_text(run))
    if s.queued:
        st.caption(f"{len(s.queued)} queued: " + ", ".join(r.name for r in s.queued[:5])
                   + (" …" if len(s.queued) > 5 else ""))


def render_sidebar() -> None:
    with st.sidebar:
        jobs_panel()


def no_runs_message() -> None:
    st.info("No runs yet — start one on **New run**.")
    st.page_link("app_pages/new_run.py", label="New run", icon=":material/add_circle:")


@st.cache_data(ttl=30, show_spinner=False)
def _datasets_under(roots: tuple[str, ...]) -> list[DatasetInfo]:
    return list_datasets([Path(r) for r in roots])


def found_datasets() -> list[DatasetInfo]:
    """The data sets under the data roots; the folder scan is cached for 30 s (keyed on the
    roots). Call forget_datasets() after adding one so it shows at once."""
    return _datasets_under(tuple(str(r) for r in data_roots()))


def forget_datasets() -> None:
    _datasets_under.clear()
