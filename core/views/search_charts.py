"""Figures and tables of a recipe search (core.analysis.search): the trials table, best
validation accuracy against time, the parallel-coordinates view of recipe dimensions
against validation accuracy, and which dimensions mattered. No streamlit import."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from core.analysis import search as searchmod
from core.views.tables import fmt_pct

STATE_LABELS = {"running": "running", "finished": "finished", "pruned": "pruned",
                "failed": "failed", "stopped": "stopped"}


def trials_table(found: searchmod.SearchSummary) -> pd.DataFrame:
    """One row per trial: recipe, status, best val acc, pruned at, its run."""
    rows = []
    for t in sorted(found.trials, key=lambda t: t.number):
        rows.append({
            "trial": t.number,
            "status": t.outcome if t.state in ("pruned", "failed", "stopped") else t.state,
            "best val acc": fmt_pct(t.val_acc) if t.val_acc is not None else "",
            "epochs run": f"{t.epochs_run} of {t.config.total_epochs}" if t.config else "",
            "pruned at epoch": str(t.pruned_at) if t.pruned_at is not None else "",
            "recipe": searchmod.describe_recipe(t.config) if t.config else "",
            "run": t.run_id or "",
        })
    return pd.DataFrame(rows, columns=["trial", "status", "best val acc", "epochs run",
                                       "pruned at epoch", "recipe", "run"])


def best_so_far_figure(found: searchmod.SearchSummary) -> go.Figure:
    """Best finished validation accuracy against minutes since the search started."""
    points = found.best_so_far()
    xs = [s / 60.0 for s, _ in points]
    ys = [v for _, v in points]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", line_shape="hv",
                               name="best so far", hovertemplate="%{x:.1f} min: %{y:.1%}"))
    fig.update_layout(title="Best validation accuracy so far", height=300,
                      xaxis_title="minutes since the search started",
                      yaxis_title="val accuracy", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.02],
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def _coded(values: Sequence[str], choices: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    index = {c: i for i, c in enumerate(choices)}
    return [index[v] for v in values], list(range(len(choices))), list(choices)


def parcoords_figure(found: searchmod.SearchSummary) -> go.Figure | None:
    """Recipe dimensions against validation accuracy, one line per trial that validated at
    least one epoch (a pruned trial shows the best accuracy it reached); None until one has.
    Per-stage dimensions are the first stage's; the learning rate is on a log10 axis."""
    rows = [t for t in found.trials if t.val_acc is not None and t.config is not None]
    if not rows:
        return None
    first = [t.config.stages[0] for t in rows]
    dims = [
        {"label": "stages", "values": [len(t.config.stages) for t in rows],
         "tickvals": [1, 2, 3], "range": [1, searchmod.MAX_SEARCH_STAGES]},
        {"label": "stage 1 groups", "values": [len(s.groups) for s in first],
         "tickvals": list(range(1, 7)),
         "ticktext": [searchmod.group_range(d) for d in range(1, 7)], "range": [1, 6]},
        {"label": "stage 1 lr (log10)", "values": [math.log10(s.lr) for s in first]},
        {"label": "stage 1 epochs", "values": [s.epochs for s in first]},
        {"label": "total epochs", "values": [t.config.total_epochs for t in rows]},
    ]
    for name in ("schedule", "bn_policy"):
        dim = searchmod.dimension(name)
        codes, ticks, labels = _coded([getattr(s, name) for s in first], dim.bounds)
        dims.append({"label": name.replace("_", " "), "values": codes, "tickvals": ticks,
                     "ticktext": labels, "range": [0, max(1, len(ticks) - 1)]})
    dims.append({"label": "group lr mult", "values": [s.group_lr_mult for s in first]})
    accs = [float(t.val_acc) for t in rows]
    dims.append({"label": "val acc", "values": accs, "tickformat": ".0%"})
    fig = go.Figure(go.Parcoords(line={"color": accs, "colorscale": "Viridis",
                                       "showscale": True, "colorbar": {"title": "val acc"}},
                                 dimensions=dims))
    fig.update_layout(title="Recipes against validation accuracy (one line per trial)",
                      height=380, margin={"l": 60, "r": 60, "t": 80, "b": 30})
    return fig


def importance_figure(importances: dict[str, float]) -> go.Figure | None:
    if not importances:
        return None
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                           hovertemplate="%{y}: %{x:.2f}"))
    fig.update_layout(title="Which dimensions mattered (share of the variation explained)",
                      height=60 + 28 * len(items), xaxis_title="importance",
                      margin={"l": 140, "r": 20, "t": 50, "b": 40})
    return fig
