"""Run insights: look inside one run — what each stage added, which layer groups moved,
which classes it confuses, its most confident mistakes — and export its best model.

Thin page: pick a run -> core.analysis.insights / core.analysis.export -> render.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages._common import get_store, pick_run
from app_pages._tool_jobs import active_job
from core.analysis import export, insights
from core.runs.entities import TRAINING_KINDS
from core.runs.preflight import PreflightError
from core.runs.store import Run, RunStore
from core.views import charts
from core.views.images import pixelated
from core.views.tables import run_label
from core.views.text import md

P = "insights."
TOP_LOSSES = 12
TILE_PX = 128  # on-screen side of a mistake's picture


@st.cache_data(max_entries=4, show_spinner="Looking for the most confident mistakes…")
def cached_top_losses(root: str, run_id: str, checkpoint: str, mtime: float) -> list:
    """Top losses of a run; keyed on the checkpoint file's mtime so a new best is picked up."""
    store = RunStore(root)
    run = store.get_run(run_id)
    return insights.top_losses(store, run, k=TOP_LOSSES)  # type: ignore[arg-type]


def attribution(store: RunStore, run: Run) -> None:
    gains = insights.stage_attribution(store, run)
    st.markdown("**What each stage added to validation accuracy**")
    if not gains:
        st.caption("This run has no stages recorded.")
        return
    st.dataframe(pd.DataFrame(insights.stage_attribution_table(gains)), hide_index=True,
                 width="stretch")
    if words := insights.attribution_words(gains):
        st.markdown("In words: " + words)


def weight_movement(run: Run) -> None:
    changes = insights.weight_changes(run)
    st.markdown("**How far each layer group's weights moved in each stage**")
    if not changes:
        st.caption("Not recorded for this run (it predates weight-change tracking, or no "
                   "stage completed).")
        return
    st.plotly_chart(charts.weight_change_figure(changes), key=P + f"wc.{run.id}")
    st.caption("Change = ‖W_end − W_start‖ / ‖W_start‖ over the group's weights; frozen groups "
               "stay at 0. A trained group that barely moved learned little. "
               + insights.moved_groups_words(changes))


def confusion(run: Run) -> None:
    st.markdown("**Most confused classes (test set)**")
    pairs = insights.confused_pairs(run.results, k=5)
    if not pairs:
        st.caption("No confusions recorded" + (" — every test image was right." if
                                               run.results.confusion else "."))
        return
    for p in pairs:
        st.markdown(f"- **{md(p.true)}** taken for **{md(p.predicted)}**: {p.count} time"
                    f"{'s' * (p.count != 1)} ({100 * p.rate:.0f} % of the {md(p.true)} test images)")


def mistakes(store: RunStore, run: Run) -> None:
    st.markdown("**The test images it got wrong most confidently**")
    if not st.toggle("Show the gallery (loads the test images and runs the model)",
                     key=P + f"losses.{run.id}"):
        return
    ckpt = run.best_checkpoint or ""
    try:
        mtime = Path(ckpt).stat().st_mtime if ckpt else 0.0
        losses = cached_top_losses(str(store.root), run.id, ckpt, mtime)
    except (insights.InsightError, OSError) as exc:
        st.warning(str(exc))
        return
    if not losses:
        st.success("It got every test image right.")
        return
    cols = st.columns(6)
    for i, t in enumerate(losses):
        cols[i % 6].image(pixelated(t.image, TILE_PX), width="stretch",
                          caption=f"is {t.true}, said {t.predicted} ({100 * t.confidence:.0f} %)")


def export_section(store: RunStore, run: Run) -> None:
    """The export as a background job (core.analysis.export): the button, the job's progress
    and Cancel while it runs, then the zip to download and the export's notes."""
    st.markdown("**Export the best model**")
    st.caption("TorchScript and ONNX files, a README on loading them, the class names and the "
               "metrics as CSV, in one zip. It runs as a background job, in the queue like a run.")
    key = P + f"export.{run.id}"
    job = export.latest_job(store, run.id)
    if st.button("Export", key=key, disabled=job is not None and job.is_active):
        try:
            export.submit(store, run)
        except (export.ExportError, PreflightError) as exc:
            st.warning(md(str(exc)))
            return
        st.rerun()  # drawn again with the button held while the job runs
    if job is None:
        return
    if job.is_active:
        active_job(job.id, key, "The export")
        return
    if job.status != "finished":
        st.warning(f"The last export {job.status}" + (f": {md(job.error)}" if job.error else "."))
        return
    outcome = export.outcome_of(store, job.id)
    if outcome is None or not Path(outcome.zip_path).is_file():
        st.caption("The last export's files are gone: export again.")
        return
    for note in outcome.notes:
        st.info(md(note))
    zip_path = Path(outcome.zip_path)
    # A callable: the zip (tens of MB) is read only when the button is clicked.
    st.download_button("Download the export (zip)", data=lambda: zip_path.read_bytes(),
                       file_name=zip_path.name, mime="application/zip",
                       key=P + f"download.{run.id}", on_click="ignore")


# ---------------------------------------------------------------- page

def page() -> None:
    """The page body. It ends early with `return`, never st.stop(): the app draws the
    sidebar after the page (streamlit_app.py), and st.stop() would end that run too."""
    st.title("Run insights")
    store = get_store()
    runs = [r for r in store.list_runs(kinds=TRAINING_KINDS)
            if r.best_checkpoint or r.status == "finished"]
    if not runs:
        st.info("Insights appear here once a run has finished an epoch.")
        return
    run = pick_run("Run", runs, P + "run", run_label)
    attribution(store, run)
    weight_movement(run)
    confusion(run)
    if run.status == "finished":
        mistakes(store, run)
        export_section(store, run)
    else:
        st.caption("The mistakes gallery and export need a finished run.")


page()
