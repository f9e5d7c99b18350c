"""A tool's background job on a page (the LR finder on New run, an export on Insights):
its progress, time left and a Cancel button while it is queued or running."""

from __future__ import annotations

import streamlit as st

from app_pages._common import get_store
from core.runs import jobs
from core.views.tables import progress_fraction, progress_text

JOB_REFRESH_S = 1.5  # seconds between looks at a tool's job while it is active


@st.fragment(run_every=JOB_REFRESH_S)
def active_job(run_id: str, key: str, what: str) -> None:
    """Refreshes itself while the job is queued or running; when it ends, the whole page
    reruns to show the result. `what` names the job in words ("The range test")."""
    store = get_store()
    run = store.get_run(run_id)
    if run is None or not run.is_active:
        st.rerun()
        return
    st.progress(progress_fraction(run), text=progress_text(run))
    if run.cancel_requested:
        st.caption(f"{what} stops after its current step…")
    elif st.button("Cancel", key=f"{key}.cancel", icon=":material/stop_circle:"):
        jobs.cancel(store, run_id)
        st.rerun(scope="fragment")
