"""Compare: runs and groups of seeds overlaid on one epoch axis, final metrics, config diff."""

from __future__ import annotations

import streamlit as st

from app_pages._common import get_store, no_runs_message
from core import config as cfgmod
from core.views import charts
from core.views.tables import (
    METRIC_LABELS,
    config_diff_table,
    final_metrics_table,
    group_curve,
    group_label,
    metrics_frame,
    run_curve,
    run_label,
)

P = "compare."
METRICS = ("val/acc", "val/loss", "train/loss", "train/acc", "train/step_loss", "lr")

store = get_store()
st.title("Compare")
runs = [r for r in store.list_runs() if r.status != "queued"]
if not runs:
    no_runs_message()
    st.stop()
if len(runs) < 2:
    st.info("Compare needs at least two runs — start another on **New run** (for example the "
            "*All at once* preset, to test the two-stage recipe against it).")

by_id = {r.id: r for r in runs}
groups: dict[str, list] = {}
for r in runs:
    if r.group:
        groups.setdefault(r.group, []).append(r)

pick = st.columns([3, 2])
run_ids = pick[0].multiselect("Runs", list(by_id), key=P + "runs",
                              format_func=lambda i: run_label(by_id[i]),
                              placeholder="pick runs to overlay")
group_names = pick[1].multiselect("Groups of seeds (mean ± std)", sorted(groups), key=P + "groups",
                                  format_func=lambda g: f"{group_label(groups[g])} ({len(groups[g])} runs)",
                                  placeholder="no groups yet" if not groups else "pick groups")

entries: list[tuple[str, list]] = [(by_id[i].name, [by_id[i]]) for i in run_ids]
entries += [(group_label(groups[g]), groups[g]) for g in group_names]
if not entries:
    st.info("Pick two or more runs or groups above to overlay their curves."
            + ("" if groups else " Groups appear when you start a run with "
               "**Repeat with N seeds** on New run."))
    st.stop()

opts = st.columns([2, 2, 1.5])
metric = opts[0].selectbox("Metric", METRICS, key=P + "metric",
                           format_func=lambda k: METRIC_LABELS[k][0])
smoothing = opts[1].slider("Smoothing", min_value=0.0, max_value=0.95, step=0.05, key=P + "smooth",
                           help="Exponential moving average; the raw points stay visible.")
align = opts[2].checkbox("Align at the start of stage 2", key=P + "align",
                         help="Shift each run so its stage 2 starts at epoch 0. One-stage runs "
                              "are not shifted.")

frames: dict[str, object] = {}


def frame_of(run_id: str):
    if run_id not in frames:
        frames[run_id] = metrics_frame(store.metrics(run_id, keys=(metric,)))
    return frames[run_id]


curves = []
for name, members in entries:
    if len(members) == 1:
        curves.append(run_curve(members[0], frame_of(members[0].id), metric, align))
    else:
        curves.append(group_curve(name, members, [frame_of(r.id) for r in members], metric, align))
if not any(c.x for c in curves):
    st.info(f"No {METRIC_LABELS[metric][0].lower()} logged yet for these runs.")
else:
    st.plotly_chart(charts.compare_figure(curves, metric, smoothing, align), key=P + "chart")
if len(entries) == 1:
    st.caption("Add another run or group to compare against.")

st.subheader("Final metrics")
st.dataframe(final_metrics_table(entries), hide_index=True, key=P + "table")

st.subheader("Config differences")
named = []
for name, members in entries:
    cfg = cfgmod.to_dict(members[0].config)
    if len(members) > 1:
        cfg["seed"] = ", ".join(str(v) for v in sorted(r.config.seed for r in members))
    named.append((name, cfg))
diff = config_diff_table(named)
if len(named) < 2:
    st.caption("Pick a second run or group to see how their configs differ.")
elif diff.empty:
    st.caption("The configs are identical: any difference in the curves is run-to-run "
               "noise.")
else:
    st.dataframe(diff, key=P + "diff")
