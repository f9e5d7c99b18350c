"""Compare: runs and groups of seeds overlaid on one epoch axis, final metrics, config diff.

Thin page: pick runs and groups -> core.views.tables (curves, tables) -> core.views.charts.
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import get_store, no_runs_message
from core.runs.entities import TRAINING_KINDS
from core.runs.store import Run
from core.views import charts
from core.views.tables import (
    METRIC_LABELS,
    comparison_curves,
    config_diff_table,
    entry_configs,
    final_metrics_table,
    group_label,
    metrics_frame,
    run_chip,
    seed_groups,
)
from core.views.text import md

P = "compare."
RUNS_PARAM, GROUPS_PARAM = "runs", "group"  # URL query parameters: run ids, group names
METRICS = ("val/acc", "val/loss", "train/loss", "train/acc", "train/step_loss", "lr")


def from_url(by_id: dict[str, Run], groups: dict[str, list[Run]]) -> None:
    """A link or a reload: the runs and groups in the URL (?runs=a,b&groups=g) are picked."""
    if P + "runs" in st.session_state:
        return
    linked = [i for i in st.query_params.get(RUNS_PARAM, "").split(",") if i in by_id]
    linked_groups = [g for g in st.query_params.get_all(GROUPS_PARAM) if g in groups]
    st.session_state[P + "runs"] = linked
    st.session_state[P + "groups"] = linked_groups


def to_url(run_ids: list[str], group_names: list[str]) -> None:
    """The comparison in the URL, so a link opens the same view."""
    st.query_params[RUNS_PARAM] = ",".join(run_ids)
    st.query_params[GROUPS_PARAM] = group_names
    if not run_ids:
        del st.query_params[RUNS_PARAM]


def pick_entries(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """The runs and groups of seeds picked to compare, as (name, runs) entries."""
    by_id = {r.id: r for r in runs}
    groups = seed_groups(runs)
    from_url(by_id, groups)
    st.session_state[P + "runs"] = [i for i in st.session_state[P + "runs"] if i in by_id]
    st.session_state[P + "groups"] = [g for g in st.session_state[P + "groups"] if g in groups]
    pick = st.columns([3, 2])
    run_ids = pick[0].multiselect("Runs", list(by_id), key=P + "runs",
                                  format_func=lambda i: run_chip(by_id[i]),
                                  placeholder="pick runs to overlay")
    group_names = pick[1].multiselect(
        "Groups of seeds (mean ± std)", sorted(groups), key=P + "groups",
        format_func=lambda g: f"{group_label(groups[g])} ({len(groups[g])} runs)",
        placeholder="no groups yet" if not groups else "pick groups")
    to_url(run_ids, group_names)
    if not run_ids and not group_names:
        st.info("Pick two or more runs or groups above to overlay their curves."
                + ("" if groups else " Groups appear when you start a run with "
                   "**Repeat with N seeds** on New run."))
    return ([(by_id[i].name, [by_id[i]]) for i in run_ids]
            + [(group_label(groups[g]), groups[g]) for g in group_names])


def aligned_entries(entries: list[tuple[str, list[Run]]], align: bool
                    ) -> list[tuple[str, list[Run]]]:
    """With "align at stage 2", one-stage entries have no stage 2 to align on: they are
    left out of the chart, and the page says so."""
    if not align:
        return entries
    kept = [(n, m) for n, m in entries if len(m[0].config.stages) > 1]
    left_out = [n for n, m in entries if len(m[0].config.stages) < 2]
    if left_out:
        st.caption("Left out of the aligned chart (one stage, no stage 2 to align on): "
                   + ", ".join(f"**{md(n)}**" for n in left_out) + ".")
    return kept


def chart_options() -> tuple[str, float, bool]:
    """(metric key, smoothing weight 0..0.95, align at stage 2)."""
    opts = st.columns([2, 2, 1.5])
    metric = opts[0].selectbox("Metric", METRICS, key=P + "metric",
                               format_func=lambda k: METRIC_LABELS[k][0])
    smoothing = opts[1].slider("Smoothing", min_value=0.0, max_value=0.95, step=0.05,
                               key=P + "smooth",
                               help="Exponential moving average; the raw points stay visible.")
    align = opts[2].checkbox("Align at the start of stage 2", key=P + "align",
                             help="Shift each run so its stage 2 starts at epoch 0. One-stage "
                                  "runs have no stage 2: they are left out of the chart.")
    return metric, smoothing, align


def config_differences(entries: list[tuple[str, list[Run]]]) -> None:
    st.subheader("Config differences")
    named = entry_configs(entries)
    diff = config_diff_table(named)
    if len(named) < 2:
        st.caption("Pick a second run or group to see how their configs differ.")
    elif diff.empty:
        st.caption("The configs are identical: any difference in the curves is run-to-run "
                   "noise.")
    else:
        st.dataframe(diff, key=P + "diff")


# ---------------------------------------------------------------- page

def page() -> None:
    """The page body. It ends early with `return`, never st.stop(): the app draws the
    sidebar after the page (streamlit_app.py), and st.stop() would end that run too."""
    st.title("Compare")
    store = get_store()
    runs = [r for r in store.list_runs(kinds=TRAINING_KINDS) if r.status != "queued"]
    if not runs:
        no_runs_message()
        return
    if tags := store.all_tags():
        tag = st.columns([1, 2])[0].selectbox("Only runs tagged", [None, *tags], key=P + "tag",
                                              format_func=lambda t: "any tag" if t is None else t)
        if tag:
            runs = [r for r in runs if tag in r.tags]
    if len(runs) < 2:
        st.info("Compare needs at least two runs — start another on **New run** (for example the "
                "*All at once* preset, to test the two-stage recipe against it).")
    entries = pick_entries(runs)
    if not entries:
        return

    metric, smoothing, align = chart_options()
    curves = comparison_curves(aligned_entries(entries, align), lambda r: metrics_frame(store.metrics(r.id, keys=(metric,))),
                               metric, align)
    if not any(c.x for c in curves):
        st.info(f"No {METRIC_LABELS[metric][0].lower()} logged yet for these runs.")
    else:
        st.plotly_chart(charts.compare_figure(curves, metric, smoothing, align), key=P + "chart")
    if len(entries) == 1:
        st.caption("Add another run or group to compare against.")

    st.subheader("Final metrics")
    # Widths in px that fit a laptop's content width with no cut cell: the recipe and the
    # mean ± std accuracies are the long ones; Status ("finished") is the one that was cut.
    st.dataframe(final_metrics_table(entries), hide_index=True, key=P + "table", column_config={
        c: st.column_config.Column(c, width=w) for c, w in
        (("Entry", int(min(330, max(150, 7.5 * max(len(n) for n, _ in entries))))), ("Runs", 40), ("Recipe", 200), ("Best val acc", 120), ("Best at", 110),
         ("Test acc", 120), ("Training time", 95), ("Status", 80))})
    config_differences(entries)


page()
