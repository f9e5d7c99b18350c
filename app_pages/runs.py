"""Runs: the live view of a running run (curves stream in via a fragment that reruns on a
timer, never a sleep loop) and the results of a finished one.

Thin page: pick a run -> the store and core.runs.jobs -> core.views (tables, charts).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_pages._common import (
    INSIGHTS_PAGE,
    NEW_RUN_PAGE,
    RUN_PARAM,
    SELECTED_RUN,
    access,
    get_store,
    no_runs_message,
    open_run,
    pick_run,
)
from app_pages._forms import CONFIG_FOR_NEW_RUN
from core import config as cfgmod
from core.analysis import disk, lr_finder
from core.analysis.disk import fmt_bytes
from core.runs import jobs
from core.runs.entities import TRAINING_KINDS
from core.runs.store import Run, RunStore, StoreError
from core.views import charts
from core.views.tables import (
    fmt_count,
    fmt_duration,
    fmt_pct,
    metrics_csv,
    metrics_frame,
    progress_fraction,
    progress_text,
    recipe_text,
    run_color,
    run_label,
    stage_bounds,
    val_caveat,
)
from core.views.text import md

P = "runs."
LIVE_REFRESH_S = 1.5  # seconds between live-view refreshes while a run is active
LOG_TAIL_BYTES = 6000


def act(action, *args) -> bool:
    """Run a button's store action; on StoreError (locked or unwritable store, a run that
    changed state meanwhile) show the message instead of a traceback. True if it worked."""
    try:
        action(*args)
    except StoreError as exc:
        st.error(str(exc))
        return False
    except cfgmod.ConfigError as exc:  # a note or tag over its length limit
        st.error(md("; ".join(exc.errors)))
        return False
    return True


def read_metrics(store: RunStore, run: Run) -> list:
    """All metric rows of a run, read incrementally: each refresh fetches only rows newer
    than the last one seen (the store's indexed "after id" read). Cached per start of the
    run: a resumed run drops its rows past the last checkpoint and logs them again."""
    cache = st.session_state.setdefault(P + "metrics_cache", {})
    key = (run.id, run.started_at)
    rows = cache.get(key, [])
    new = store.metrics(run.id, after_id=rows[-1].id if rows else 0)
    if new or key not in cache:
        rows = rows + new
        cache.clear()  # one run's rows only: memory stays bounded
        cache[key] = rows
    return rows


def curves(run: Run, rows: list, key_prefix: str) -> None:
    frame = metrics_frame(rows)
    bounds = stage_bounds(run.config)
    if frame.empty or not frame["key"].isin(["train/step_loss", "val/acc"]).any():
        st.info("No curves yet: the first points appear after a few training steps.")
        return
    left, right = st.columns(2)
    left.plotly_chart(charts.metric_figure(frame, "loss", bounds), key=key_prefix + "loss")
    right.plotly_chart(charts.metric_figure(frame, "acc", bounds), key=key_prefix + "acc")
    st.plotly_chart(charts.lr_figure(frame, bounds), key=key_prefix + "lr")


def log_tail(store: RunStore, run_id: str) -> None:
    text = jobs.log_tail(store, run_id, LOG_TAIL_BYTES)
    st.code(text or "(the log is empty so far)", language="log")


@st.fragment(run_every=LIVE_REFRESH_S)
def live_view(run_id: str, shown_status: str) -> None:
    """`shown_status`: the status the page (its picker) was drawn with; when it changes
    (queued -> running, or the run ends) the whole page reruns, so the picker never says
    "queued" while the run trains."""
    store = get_store()
    run = store.get_run(run_id)
    if run is None or run.status != shown_status:
        st.rerun()  # it started or ended: rerun the whole page (picker, results view)
        return
    st.progress(progress_fraction(run), text=progress_text(run))
    if run.status == "running" and run.started_at:
        st.caption(f"Running for {fmt_duration(run.duration_s)}"
                   + (" · stopping after the current batch…" if run.cancel_requested else ""))
    curves(run, read_metrics(store, run), P + "live.")
    with st.expander("Log (last lines)", expanded=False):
        log_tail(store, run_id)


def summary_metrics(run: Run) -> None:
    r = run.results
    # Training time gets room for "12 min 39 s" (it was cut to "12 min 3...").
    c = st.columns([1.1, 0.9, 1.4, 1.5, 0.6])
    best_at = f"stage {run.best_stage}, epoch {run.best_epoch}" if run.best_stage else None
    c[0].metric("Best validation accuracy", fmt_pct(run.best_val_acc, 2), help=best_at,
                delta=best_at, delta_color="off", delta_arrow="off")
    c[1].metric("Test accuracy", fmt_pct(run.test_acc, 2),
                help="Measured once, at the end, with the best checkpoint.")
    c[2].metric("Training time", fmt_duration(run.duration_s))
    sizes = r.sizes
    # Compact counts ("45 k · 5 k · 10 k"): the full numbers were cut off in the tile.
    c[3].metric("Images: train · val · test",
                " · ".join(fmt_count(n) for n in (sizes.train, sizes.val, sizes.test)) if sizes
                else " · ".join("—" * 3),
                help=f"{sizes.train:,} training, {sizes.val:,} validation and {sizes.test:,} "
                     f"test images." if sizes else None)
    c[4].metric("Classes", len(r.classes) or "—")
    if caveat := val_caveat(run):
        st.warning(caveat, icon=":material/info:")
    if r.skipped_files:
        with st.expander(f":material/warning: {r.skipped_files} unreadable files were skipped"):
            st.code("\n".join(r.skipped_examples))


def results_view(store: RunStore, run: Run) -> None:
    r = run.results
    if run.status == "failed":
        st.error(f"This run failed: {md(run.error) if run.error else 'no reason recorded'}")
    elif run.status == "cancelled":
        st.warning(f"This run was cancelled ({md(run.error) if run.error else 'by request'}).")
    if run.status in ("failed", "cancelled") and access().may_change():
        # Always offered: without a saved epoch (killed while writing the first last.pt)
        # the worker starts over, which gives the same run.
        label = ("Resume from the last completed epoch" if store.files(run.id).last.exists()
                 else "Resume (no epoch was saved: starts from the beginning)")
        if st.button(label, key=P + "resume"):
            if act(jobs.resume, store, run.id):
                st.rerun()
    summary_metrics(run)
    curves(run, read_metrics(store, run), P + "done.")
    classes = r.classes
    if r.confusion and classes:
        left, right = st.columns(2)
        left.plotly_chart(charts.confusion_figure(r.confusion, classes), key=P + "confusion")
        if r.per_class_acc:
            right.plotly_chart(charts.per_class_figure(r.per_class_acc, classes),
                               key=P + "per_class")
    if access().may_change():  # a viewer downloads, reruns and exports nothing (core.access)
        downloads(store, run)
    if access().may_change() and st.button(
            "Run again with this config", key=P + "again", disabled=bool(run.config_error),
            help="Opens New run filled in with this run's config: change anything, then Start."):
        st.session_state[CONFIG_FOR_NEW_RUN] = cfgmod.to_json(run.config)
        st.switch_page(NEW_RUN_PAGE)
    if run.status == "finished" and access().may_change() and st.button(
            "Insights and export →", key=P + "insights",
            help="What each stage added, which layers moved, confused classes, top mistakes, "
                 "TorchScript/ONNX export"):
        open_run(run.id, INSIGHTS_PAGE)
    with st.expander("Log"):
        log_tail(store, run.id)
    disk_section(store, run)
    delete_section(store, run)


def lr_find_view(store: RunStore, run: Run) -> None:
    """A recorded LR range test (core.analysis.lr_finder): its loss against the learning
    rate and the suggestion, not the training charts and results it never had."""
    c = lr_finder.curve_of(store, run.id)
    st.plotly_chart(charts.lr_find_figure(c.lrs, c.losses, c.smoothed, c.suggested_lr),
                    key=P + "lr_find")
    st.caption(f"An LR range test of {len(c.lrs)} steps, started from {md(run.results.weights)}."
               + (" Stopped early: the loss diverged." if c.diverged else ""))
    if c.suggested_lr is None:
        st.info("No clear fall in the loss: no suggestion.")
    else:
        st.success(f"Suggested learning rate: {c.suggested_lr:.2g} (where the loss falls "
                   f"fastest). Use it as the stage's learning rate on **New run**.",
                   icon=":material/tips_and_updates:")
    delete_section(store, run)


def disk_section(store: RunStore, run: Run) -> None:
    """The run's size on disk, what each checkpoint is for, and freeing what it no longer
    needs."""
    if not access().may_change():  # paths and a delete: not for a viewer (core.access)
        return
    usage = disk.run_disk(run, store.files(run.id))
    with st.expander(f"Disk: {fmt_bytes(usage.total_bytes)}"):
        for f in usage.checkpoints:
            st.markdown(f"- `{f.path.name}` ({fmt_bytes(f.bytes)}): {f.purpose}")
        if not usage.checkpoints:
            st.caption("No checkpoints were kept.")
        if usage.freeable_bytes and st.button(
                f"Delete last.pt (frees {fmt_bytes(usage.freeable_bytes)})", key=P + "free",
                help="Classify, export and downloads keep working: they use best.pt."):
            freed = disk.clean_up(store, [run])
            st.toast(f"Freed {fmt_bytes(freed)}.", icon=":material/cleaning_services:")
            st.rerun()


def notes_and_tags(store: RunStore, run: Run) -> None:
    """Edit the run's note and tags (Overview and Compare filter by tag)."""
    if not access().may_change():  # a viewer changes nothing (core.access)
        return
    with st.expander("Note and tags" + (f": {', '.join(md(t) for t in run.tags)}" if run.tags else ""),
                     expanded=bool(run.note)):
        with st.form(P + f"annotate.{run.id}", border=False):
            note = st.text_area("Note", value=run.note, key=P + f"note.{run.id}",
                                max_chars=cfgmod.NOTE_MAX_CHARS,
                                placeholder="what you tried, what you saw", height=80)
            tags = st.multiselect("Tags", sorted(set(store.all_tags()) | set(run.tags)),
                                  default=list(run.tags), key=P + f"tags.{run.id}",
                                  accept_new_options=True, placeholder="type a tag, press Enter")
            if st.form_submit_button("Save note and tags"):
                if act(store.set_note, run.id, note) and act(store.set_tags, run.id, tags):
                    st.toast("Saved.", icon=":material/check:")
                    st.rerun()


def downloads(store: RunStore, run: Run) -> None:
    st.markdown("**Downloads**")
    c = st.columns(3)
    best = Path(run.best_checkpoint) if run.best_checkpoint else None
    if best and best.is_file():
        # A callable: the ~45 MB checkpoint is read only when the button is clicked.
        c[0].download_button("Best checkpoint (.pt)", data=lambda: best.read_bytes(),
                             file_name=f"{run.id}-{best.name}", mime="application/octet-stream",
                             key=P + "dl_ckpt", on_click="ignore")
    else:
        c[0].caption("No checkpoint was saved.")
    c[1].download_button("Metrics (.csv)", data=lambda: metrics_csv(store.metrics(run.id)),
                         file_name=f"{run.id}-metrics.csv", mime="text/csv",
                         key=P + "dl_csv", on_click="ignore")
    c[2].download_button("Config (.json)", data=cfgmod.to_json(run.config),
                         file_name=f"{run.id}-config.json", mime="application/json",
                         key=P + "dl_cfg", on_click="ignore")


def delete_section(store: RunStore, run: Run) -> None:
    if not access().may_change():  # a viewer deletes nothing (core.access)
        return
    confirm_key = P + "confirm_delete"
    if st.session_state.get(confirm_key) != run.id:
        if st.button("Delete this run…", key=P + "delete"):
            st.session_state[confirm_key] = run.id
            st.rerun()
        return
    st.warning(f"Delete **{md(run.name)}** with its checkpoints, metrics and log? This cannot "
               f"be undone.")
    yes, no, _ = st.columns([1, 1, 4])
    if yes.button("Yes, delete", type="primary", key=P + "delete_yes"):
        if not act(store.delete_run, run.id):
            return
        st.session_state.pop(confirm_key, None)
        st.session_state.pop(SELECTED_RUN, None)
        st.toast(f"Deleted {md(run.name)}")
        st.rerun()
    if no.button("Keep it", key=P + "delete_no"):
        st.session_state.pop(confirm_key, None)
        st.rerun()


def stop_buttons(store: RunStore, run: Run) -> None:
    """Cancel (honoured after the current batch), then Force stop if that was not enough."""
    if not access().may_change():  # a viewer cancels nothing (core.access)
        return
    cols = st.columns([1, 1, 4])
    if not run.cancel_requested:
        if cols[0].button("Cancel run", key=P + "cancel",
                          help="Stops after the current batch; the best checkpoint so far is kept."):
            if act(jobs.cancel, store, run.id):
                st.rerun()
    elif cols[0].button("Force stop", key=P + "kill",
                        help="The run did not stop on request: end its process."):
        if act(jobs.kill, store, run.id):
            st.rerun()


# ---------------------------------------------------------------- page

def page() -> None:
    """The page body. It ends early with `return`, never st.stop(): the app draws the
    sidebar after the page (streamlit_app.py), and st.stop() would end that run too."""
    st.title("Runs")
    store = get_store()
    # Training runs; a tool's record (an LR range test) only when a link opens it.
    runs = store.list_runs(kinds=TRAINING_KINDS)
    linked = st.query_params.get(RUN_PARAM) or st.session_state.get(SELECTED_RUN)
    if linked and linked not in {r.id for r in runs} and (tool_run := store.get_run(linked)):
        runs.insert(0, tool_run)
    if not runs:
        no_runs_message()
        return

    run = pick_run("Run", runs, P + "pick", run_label)  # the newest unless one was picked
    st.markdown(f"<span style='color:{run_color(run.id)}'>&#9632;</span> "  # its colour on Compare
                f"**{recipe_text(run.config)}** · id `{run.id}`"
               + (f" · group {md(run.group)}" if run.group else "")
               + f" · {run.config.data_source}, {run.config.weights} weights",
                unsafe_allow_html=True)
    st.caption(f"Where: {run.executor or 'in the foreground (command line)'}"  # issue 10 §1
               + (f" job `{run.job_id}`" if run.job_id else "") + f" on {md(run.host) if run.host else 'no host yet'}"
               + (f" · started by {md(run.started_by)}" if run.started_by else ""))
    notes_and_tags(store, run)

    if run.is_active:
        stop_buttons(store, run)
        live_view(run.id, run.status)
    elif lr_finder.is_lr_find_run(run):
        lr_find_view(store, run)
    else:
        results_view(store, run)


page()
