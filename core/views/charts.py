"""Plotly figure builders for the pages. No streamlit, no torch.

Every chart has a title, labelled axes with units, and (for training curves) the stages
shaded and labelled on the global epoch axis the trainer logs on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go

from core.config import LAYER_GROUPS, StageConfig
from core.engine.stage_ends import STAGE_END_KEY, StageEnd, stage_end_text
from core.views.tables import ACCURACY_KEYS, METRIC_LABELS, Curve, ema, run_color, stage_series

if TYPE_CHECKING:
    from core.analysis.insights import WeightChange

EPOCH_AXIS = "epoch (global, across stages)"
# Alternating stage shades; light enough that curves on top stay readable.
STAGE_FILLS = ("rgba(99, 110, 250, 0.08)", "rgba(0, 204, 150, 0.08)")
TRAIN_COLOR, VAL_COLOR = "#636EFA", "#EF553B"


# The legend sits under the x-axis title, so it never runs into the chart's toolbar (top
# right) or the title; the bottom margin makes room for it (pixels).
LEGEND_BELOW = {"orientation": "h", "yanchor": "top", "y": -0.22, "xanchor": "left", "x": 0.0}


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 340) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"}, height=height + 40,
        margin={"l": 60, "r": 20, "t": 60, "b": 100},
        legend=LEGEND_BELOW,
        hovermode="x unified",
    )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def shade_stages(fig: go.Figure, bounds: Sequence[tuple[float, float, str]]) -> go.Figure:
    """Each stage as a shaded, labelled band."""
    for i, (x0, x1, label) in enumerate(bounds):
        fig.add_vrect(x0=x0, x1=x1, fillcolor=STAGE_FILLS[i % 2], line_width=0, layer="below",
                      annotation_text=label, annotation_position="top left",
                      annotation_font_size=11)
    return fig


def mark_stage_ends(fig: go.Figure, frame: pd.DataFrame) -> go.Figure:
    """A dotted line where a stage ended before its last epoch (a plateau or an early stop),
    labelled with why. Stages that ran all their epochs end at their shaded band's edge."""
    if frame.empty:
        return fig
    ends = frame[(frame["key"] == STAGE_END_KEY) & (frame["value"] != float(StageEnd.COMPLETED))]
    last_epoch = float(frame["epoch"].max())
    for stage, x, code in zip(ends["stage"], ends["epoch"], ends["value"]):
        why = stage_end_text(code)
        # A short label that fits a half-width chart ("stage 1 ended: plateau"), on the side
        # of the line with room for it; the full reason shows on hover.
        fig.add_vline(x=float(x), line_dash="dot", line_color="#444", opacity=0.8,
                      annotation_text=f"stage {int(stage)} ended: {why.split(':')[0]}",
                      annotation_hovertext=f"stage {int(stage)} ended: {why}",
                      annotation_position=("bottom left" if x > 0.6 * last_epoch
                                           else "bottom right"),
                      annotation_font_size=10)
    return fig


def _mode(x: Sequence[float]) -> str:
    """Lines, plus markers while there are few points (a lone point has no line to show)."""
    return "lines" if len(x) > 30 else "lines+markers"


def _scale(key: str, values: Sequence[float]) -> list[float]:
    """Accuracies are stored as 0..1 and shown in percent."""
    if key not in ACCURACY_KEYS:
        return list(values)
    return [None if v is None else 100 * v for v in values]


def metric_figure(frame: pd.DataFrame, metric: str, bounds: Sequence[tuple[float, float, str]]
                  ) -> go.Figure:
    """Training and validation of one metric ('loss' or 'acc') on one chart.
    For loss, the per-step training loss is drawn faintly under the per-epoch mean."""
    fig = go.Figure()
    shown: list[float] = []  # the epoch-level values drawn, in the axis's unit
    if metric == "loss":
        x, y = stage_series(frame, "train/step_loss")
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, name="train (per step)", mode=_mode(x),
                                     line={"color": TRAIN_COLOR, "width": 1}, opacity=0.35))
    for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
        key = f"{split}/{metric}"
        x, y = stage_series(frame, key)
        if x:
            scaled = _scale(key, y)
            shown += [v for v in scaled if v is not None]
            fig.add_trace(go.Scatter(x=x, y=scaled, name="validation" if split == "val" else
                                     "train (epoch)", mode="lines+markers",
                                     line={"color": color, "width": 2}))
    shade_stages(fig, bounds)
    mark_stage_ends(fig, frame)
    y_title = METRIC_LABELS[f"val/{metric}"][1]
    name = {"loss": "Loss", "acc": "Accuracy"}[metric]
    _layout(fig, f"{name}: training and validation", EPOCH_AXIS, y_title)
    if metric == "acc":
        _percent_axis(fig, shown)
    if bounds:
        fig.update_xaxes(range=[0, max(b[1] for b in bounds)])
    return fig


MIN_PERCENT_SPAN = 2.0  # percentage points an accuracy axis shows at least


def _percent_axis(fig: go.Figure, values: Sequence[float]) -> None:
    """Accuracy in percent with one decimal, over at least MIN_PERCENT_SPAN points: early in
    a run train and validation can be equal, and plotly then zooms into nothing (ticks like
    72.2222215 %)."""
    fig.update_yaxes(tickformat=".1f")
    if not values:  # nothing yet (before the first epoch): the whole scale, not -1..4 %
        fig.update_yaxes(range=[0.0, 100.0])
    elif max(values) - min(values) < MIN_PERCENT_SPAN:
        mid = (max(values) + min(values)) / 2
        low = min(max(0.0, mid - MIN_PERCENT_SPAN / 2), 100.0 - MIN_PERCENT_SPAN)
        fig.update_yaxes(range=[low, low + MIN_PERCENT_SPAN])


def lr_figure(frame: pd.DataFrame, bounds: Sequence[tuple[float, float, str]]) -> go.Figure:
    fig = go.Figure()
    x, y = stage_series(frame, "lr")
    if x:
        fig.add_trace(go.Scatter(x=x, y=y, name="learning rate", mode=_mode(x),
                                 line={"color": "#AB63FA", "width": 2}))
    shade_stages(fig, bounds)
    _layout(fig, "Learning rate (head group)", EPOCH_AXIS, "learning rate", height=260)
    fig.update_yaxes(exponentformat="e")
    if bounds:
        fig.update_xaxes(range=[0, max(b[1] for b in bounds)])
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> go.Figure:
    """Rows are the true class, columns the predicted one; counts in the cells."""
    z = [list(r) for r in confusion]
    fig = go.Figure(go.Heatmap(z=z, x=list(classes), y=list(classes), colorscale="Blues",
                               text=z, texttemplate="%{text}", hovertemplate=
                               "true %{y}, predicted %{x}: %{z} images<extra></extra>",
                               colorbar={"title": "images"}))
    _layout(fig, "Confusion matrix (test set)", "predicted class", "true class",
            height=max(320, 40 * len(classes) + 140))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(hovermode="closest")
    return fig


def per_class_figure(per_class: Sequence[float | None], classes: Sequence[str]) -> go.Figure:
    vals = [None if v is None else 100 * v for v in per_class]
    fig = go.Figure(go.Bar(x=list(classes), y=vals, marker_color=VAL_COLOR,
                           text=[("—" if v is None else f"{v:.0f} %") for v in vals],
                           textposition="outside",
                           hovertemplate="%{x}: %{y:.1f} %<extra></extra>"))
    _layout(fig, "Accuracy per class (test set)", "class", "accuracy (%)")
    fig.update_yaxes(range=[0, 110])
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig


def recipe_figure(stages: Sequence[StageConfig], title: str = "The recipe: which layer groups "
                  "train in which stage") -> go.Figure:
    """Stage-by-group grid: filled = trains in that stage, empty = frozen."""
    z = [[1 if g in s.groups else 0 for g in LAYER_GROUPS] for s in stages]
    labels = [[("trains" if v else "frozen") for v in row] for row in z]
    y = [f"Stage {i}" for i in range(1, len(stages) + 1)]
    fig = go.Figure(go.Heatmap(z=z, x=list(LAYER_GROUPS), y=y, zmin=0, zmax=1, showscale=False,
                               colorscale=[[0, "#EEF0F4"], [1, "#00CC96"]], text=labels,
                               texttemplate="%{text}", xgap=3, ygap=3,
                               hovertemplate="%{y}, %{x}: %{text}<extra></extra>"))
    _layout(fig, title, "layer group (input side → output side)", "", height=120 + 50 * len(stages))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(hovermode="closest")
    return fig


def compare_figure(curves: Sequence[Curve], key: str, smoothing: float = 0.0,
                   aligned: bool = False) -> go.Figure:
    """Curves of several runs/groups on one epoch axis. Groups get a ± std band; with
    smoothing, the raw points stay visible as faint markers under the smoothed line."""
    fig = go.Figure()
    shown: list[float] = []  # every value drawn, in the axis's unit
    for c in curves:
        color = run_color(c.color_key or c.name)  # the run's (or group's) colour on every page
        if not c.x:
            continue
        y = _scale(key, c.y)
        shown += [v for v in y if v is not None]
        if c.std is not None and c.n_runs > 1:
            std = _scale(key, c.std)
            upper = [a + b for a, b in zip(y, std)]
            lower = [a - b for a, b in zip(y, std)]
            if key in ACCURACY_KEYS:  # a band past 0 or 100 % would show impossible values
                upper = [min(100.0, v) for v in upper]
                lower = [max(0.0, v) for v in lower]
            shown += upper + lower
            fig.add_trace(go.Scatter(x=list(c.x) + list(c.x)[::-1], y=upper + lower[::-1],
                                     fill="toself", mode="lines", fillcolor=_rgba(color, 0.15),
                                     line={"width": 0}, hoverinfo="skip", showlegend=True,
                                     name=f"{c.name}: ± 1 std ({c.n_runs} runs)",
                                     legendgroup=c.name))
        name = f"{c.name} (mean of {c.n_runs})" if c.n_runs > 1 else c.name
        if smoothing > 0:
            fig.add_trace(go.Scatter(x=c.x, y=y, mode="markers", marker={"color": color, "size": 5},
                                     opacity=0.3, name=f"{c.name} (raw)", legendgroup=c.name,
                                     showlegend=False))
            y = ema(y, smoothing)
        fig.add_trace(go.Scatter(x=c.x, y=y, mode="lines" if smoothing > 0 or len(c.x) > 30
                                 else "lines+markers", line={"color": color, "width": 2},
                                 name=name, legendgroup=c.name))
    # Stage boundaries: each distinct start of a later stage, once.
    seen: set[float] = set()
    for c in curves:
        for j, (x0, _, label) in enumerate(c.bounds):
            if j == 0 or round(x0, 6) in seen:
                continue
            seen.add(round(x0, 6))
            fig.add_vline(x=x0, line_dash="dash", line_color="grey", opacity=0.6,
                          annotation_text=f"{label.split(':')[0]} starts",
                          annotation_position="top left", annotation_font_size=11)
    title, unit = METRIC_LABELS.get(key, (key, key))
    x_title = "epochs since the start of stage 2" if aligned else EPOCH_AXIS
    _layout(fig, title, x_title, unit, height=420)
    if key in ACCURACY_KEYS:
        _percent_axis(fig, shown)
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def seed_box_figure(values: Sequence[tuple[str, Sequence[float]]]) -> go.Figure:
    """One box per recipe of its best validation accuracies (in %), one dot per seed."""
    fig = go.Figure()
    for name, vals in values:
        if vals:
            fig.add_trace(go.Box(y=list(vals), name=name, boxpoints="all", jitter=0.3,
                                 pointpos=0, boxmean=True))
    fig.update_layout(title="Best validation accuracy, one dot per seed", yaxis_title="%",
                      showlegend=False, height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def weight_change_figure(changes: Sequence[WeightChange]) -> go.Figure:
    """Grouped bars: one group of bars per layer group (input side first), one bar per stage;
    frozen groups show as empty (0)."""
    fig = go.Figure()
    for s in sorted({c.stage for c in changes}):
        rows = [c for c in changes if c.stage == s]
        fig.add_trace(go.Bar(x=[c.group for c in rows], y=[100 * c.relative_change for c in rows],
                             name=f"stage {s}",
                             customdata=["trained" if c.trained else "frozen" for c in rows],
                             hovertemplate="%{x}: %{y:.2f} %% (%{customdata})<extra>stage " + str(s)
                                           + "</extra>"))
    fig.update_layout(barmode="group", height=300, yaxis_title="relative change (%)",
                      xaxis=dict(categoryorder="array", categoryarray=list(LAYER_GROUPS)),
                      margin=dict(l=10, r=10, t=10, b=10), legend_title_text="")
    return fig


def top_guesses_figure(names: Sequence[str], probabilities: Sequence[float],
                       texts: Sequence[str]) -> go.Figure:
    """Horizontal bars of a prediction's top classes, most likely first (drawn on top);
    probabilities are 0..1, `texts` their labels ("87 %")."""
    fig = go.Figure(go.Bar(x=[100 * p for p in probabilities][::-1], y=list(names)[::-1],
                           orientation="h", marker_color="#2F6FDE", text=list(texts)[::-1],
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{y}: %{x:.1f} %<extra></extra>"))
    fig.update_layout(height=60 + 36 * len(names), margin=dict(l=10, r=40, t=10, b=30),
                      xaxis=dict(range=[0, 105], title="How sure (%)"), yaxis=dict(title=None),
                      showlegend=False)
    return fig


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                   suggested_lr: float | None, title: str = "LR finder: loss against learning rate"
                   ) -> go.Figure:
    """A range test's loss (raw, faint; smoothed, bold) against the learning rate on a log
    axis, with the suggested LR marked."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(lrs), y=list(losses), name="loss (per step)", mode="markers",
                             marker={"color": TRAIN_COLOR, "size": 4}, opacity=0.35))
    fig.add_trace(go.Scatter(x=list(lrs), y=list(smoothed), name="loss (smoothed)", mode="lines",
                             line={"color": TRAIN_COLOR, "width": 2}))
    if suggested_lr is not None:
        fig.add_vline(x=suggested_lr, line_dash="dash", line_color=VAL_COLOR)
        # Labelled with its own annotation: add_vline's label lands at the wrong x on a log
        # axis (annotations there take log10 of the value, shapes the value itself).
        fig.add_annotation(x=math.log10(suggested_lr), y=1, xref="x", yref="paper",
                           text=f"suggested {suggested_lr:.2g} (steepest descent)",
                           showarrow=False, xanchor="left", yanchor="top", xshift=4,
                           font={"size": 11})
    _layout(fig, title, "learning rate (log scale)", "training loss", height=320)
    fig.update_xaxes(type="log", exponentformat="e")
    if smoothed:  # the blown-up tail would flatten everything else
        # The low end takes the raw points too: they fall faster than the moving average.
        low, high = min(min(smoothed), min(losses, default=math.inf)), smoothed[0]
        fig.update_yaxes(range=[low - 0.1 * abs(high - low) - 1e-3, max(high, low) * 1.3 + 1e-3])
    return fig
