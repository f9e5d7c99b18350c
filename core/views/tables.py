"""Pure functions that turn store entities into tables and series for the pages.

No streamlit and no torch here: everything is plain data in, pandas/plain data out, so it is
tested without a browser and the pages stay thin.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.config import LAYER_GROUPS, RunConfig, flatten, to_dict
from core.runs.store import MetricRow, Run
from core.views.text import visible

if TYPE_CHECKING:
    from core.analysis.experiments import ExperimentResults

# Metric keys a page can plot, with a readable name and the unit on the y axis.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "val/acc": ("Validation accuracy", "accuracy (%)"),
    "train/acc": ("Training accuracy", "accuracy (%)"),
    "val/loss": ("Validation loss", "cross-entropy loss"),
    "train/loss": ("Training loss (epoch mean)", "cross-entropy loss"),
    "train/step_loss": ("Training loss (per step)", "cross-entropy loss"),
    "lr": ("Learning rate", "learning rate"),
    "images_per_s": ("Training speed", "images per second"),
    "epoch_s": ("Epoch time", "seconds"),
}
ACCURACY_KEYS = ("val/acc", "train/acc", "test/acc")
# Status marks as Streamlit material icons (rendered from the app's own font, so they show
# where no emoji font is installed); tables show the plain word.
STATUS_ICONS = {"queued": ":material/schedule:", "running": ":material/play_circle:",
                "finished": ":material/check_circle:", "failed": ":material/error:",
                "cancelled": ":material/stop_circle:"}
ENDED_BADLY = ("failed", "cancelled")  # statuses Overview hides unless asked
# How much of a run id pickers show: its random end (ids are "<date>-<time>-<hex>"), enough
# to tell same-named runs apart.
SHORT_ID_CHARS = 6
RUN_COLORS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692",
              "#B6E880", "#FF97FF", "#FECB52")


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """Accuracy in 0..1 as a percentage string; '—' when unknown."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.{digits}f} %"


def fmt_duration(seconds: float | None) -> str:
    """Seconds as '45 s', '3 min 05 s', '2 h 07 min'; '—' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def fmt_count(n: int) -> str:
    """Parameter counts as 11.2 M / 513 k / 42."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M"
    if n >= 1_000:
        return f"{n / 1e3:.0f} k"
    return str(n)


def recipe_text(config: RunConfig) -> str:
    """'layer4+fc → layer3+layer4+fc' from a run's config."""
    return " → ".join(s.trains for s in config.stages)


def recipe_short(config: RunConfig) -> str:
    """recipe_text, with a stage that trains every group said as "all layers" (fits a
    table column)."""

    return " → ".join("all layers" if set(s.groups) >= set(LAYER_GROUPS) else s.trains
                      for s in config.stages)


def stage_bounds(config: RunConfig) -> list[tuple[float, float, str]]:
    """(start, end, label) per stage on the global epoch axis: stage 1 covers (0, e1],
    stage 2 (e1, e1+e2], ... — the same axis the trainer logs metrics on."""
    out, start = [], 0.0
    for i, s in enumerate(config.stages, 1):
        end = start + float(s.epochs)
        out.append((start, end, f"Stage {i}: {s.trains}"))
        start = end
    return out


def stage2_offset(config: RunConfig) -> float:
    """Global epoch where stage 2 starts (0 for one-stage runs): subtracting it aligns runs
    at the start of their second stage."""
    return float(config.stages[0].epochs) if len(config.stages) > 1 else 0.0


def runs_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run for the overview and pickers: newest first, as given."""
    rows = []
    for r in runs:
        best_at = f"stage {r.best_stage}, epoch {r.best_epoch}" if r.best_stage else "—"
        rows.append({
            "Run": r.name,
            "Status": r.status,
            "Progress": progress_fraction(r),
            "Recipe": recipe_text(r.config),
            "Best val acc": fmt_pct(r.best_val_acc),
            "Best at": best_at,
            "Test acc": fmt_pct(r.test_acc),
            "Group": r.group or "",
            "Started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)),
            "Duration": fmt_duration(r.duration_s),
            "Id": r.id,
        })
    return pd.DataFrame(rows, columns=["Run", "Status", "Progress", "Recipe", "Best val acc",
                                       "Best at", "Test acc", "Group", "Started", "Duration", "Id"])


def short_id(run_id: str) -> str:
    """The end of a run id, as pickers and chips show it."""
    return run_id[-SHORT_ID_CHARS:]


def run_label(run: Run) -> str:
    """How a run is named in pickers: name and short id (two runs may share a name), its
    live status and best accuracy."""
    best = f", best val {fmt_pct(run.best_val_acc)}" if run.best_val_acc is not None else ""
    return f"{visible(run.name)} · {short_id(run.id)} ({run.status}{best})"  # pickers: plain text


def run_chip(run: Run) -> str:
    """A short label for chips (multiselects), which have room for little: name and short
    id, without status or accuracy."""
    return f"{visible(run.name)} · {short_id(run.id)}"


def run_color(run_id: str) -> str:
    """A run's colour, the same on every page and every rerun: picked by a stable hash of
    its id (Python's hash() is salted per process, so crc32)."""
    return RUN_COLORS[zlib.crc32(run_id.encode()) % len(RUN_COLORS)]


def tiny_validation(run: Run) -> int | None:
    """The validation set's size when it is too small for its accuracy to mean much (the
    rule Classify ranks models by: core.analysis.inference.has_real_validation), else None."""
    from core.analysis.inference import has_real_validation  # the one rule; PIL, no torch

    sizes = run.results.sizes
    if sizes is not None and sizes.val > 0 and not has_real_validation(run):
        return sizes.val
    return None


def val_caveat(run: Run) -> str:
    """Plain words on a tiny validation set, or ''."""
    n = tiny_validation(run)
    if n is None:
        return ""
    return (f"Scored on only {n} validation image{'s' * (n != 1)}: one more right or wrong "
            f"moves it by {100 / n:.0f} points, so this accuracy says little.")


def group_label(members: list[Run]) -> str:
    """How a group of seeds is named: its runs' shared name without " seed N" (runs are
    named "<name> seed <n>" by core.runs.jobs.submit_seeds), else the first run's name."""
    names = [re.sub(r"\s+seed\s+\d+$", "", r.name) for r in members]
    common = os.path.commonprefix(names).rstrip(" :-")
    return common or names[0]


def progress_fraction(run: Run) -> float:
    """0..1 of the whole run; finished runs are 1, queued ones 0."""
    if run.status == "finished":
        return 1.0
    return float(min(1.0, max(0.0, run.progress.fraction)))


def progress_text(run: Run) -> str:
    """Where a run is, in words: 'Stage 2/2 · epoch 3/5 · step 40/98 · 1 min 10 s left'."""
    p = run.progress
    if run.status == "queued":
        return "Waiting in the queue for a free worker"
    if run.status != "running":
        return run.status
    phase = p.phase or "starting"
    if phase == "loading data":
        msg = p.message or "Loading data"
        df = p.data_fraction
        return f"{msg} ({100 * df:.0f} %)" if df is not None else msg
    parts = []
    if p.stage:
        parts.append(f"Stage {p.stage}/{p.stages or '?'}")
    if p.epoch:
        parts.append(f"epoch {p.epoch}/{p.epochs or '?'}")
    if phase == "training" and p.step:
        parts.append(f"step {p.step}/{p.steps_per_epoch or '?'}")
    elif phase != "training":
        # Validating, testing, saving a checkpoint: what and how far, in the worker's words.
        parts.append(p.message or phase)
    eta = p.eta_s
    if eta is not None:
        parts.append(f"about {fmt_duration(eta)} left")
    elif phase == "training":  # only the first epoch's training has no timing yet
        parts.append("time left known after the first epoch")
    return " · ".join(parts)


def metrics_frame(rows: Iterable[MetricRow]) -> pd.DataFrame:
    """Metric rows as a frame with columns id, stage, epoch, step, key, value, time."""
    cols = ["id", "stage", "epoch", "step", "key", "value", "time"]
    return pd.DataFrame([(r.id, r.stage, r.epoch, r.step, r.key, r.value, r.time) for r in rows],
                        columns=cols)


def metrics_csv(rows: Iterable[MetricRow]) -> bytes:
    """The downloadable metrics table (one row per logged value)."""
    return metrics_frame(rows).drop(columns=["id"]).to_csv(index=False).encode()


def series(frame: pd.DataFrame, key: str) -> tuple[list[float], list[float]]:
    """(x = global epoch, y) of one metric key, sorted by epoch."""
    if frame.empty:
        return [], []
    sub = frame[frame["key"] == key].sort_values(["epoch", "id"] if "id" in frame else ["epoch"])
    return sub["epoch"].astype(float).tolist(), sub["value"].astype(float).tolist()


def stage_series(frame: pd.DataFrame, key: str) -> tuple[list[float | None], list[float | None]]:
    """`series` with a break (None, which plotly leaves undrawn) where the stage changes: a
    line never joins two stages, so a stage that a plateau ended early shows its untrained
    epochs as a gap, not as a straight line across them."""
    if frame.empty:
        return [], []
    sub = frame[frame["key"] == key].sort_values(["epoch", "id"] if "id" in frame else ["epoch"])
    x: list[float | None] = []
    y: list[float | None] = []
    previous = None
    for stage, epoch, value in zip(sub["stage"], sub["epoch"], sub["value"]):
        if previous is not None and stage != previous:
            x.append(None)
            y.append(None)
        x.append(float(epoch))
        y.append(float(value))
        previous = stage
    return x, y


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing):
    weight 0 returns the values unchanged, 0.9 is heavy smoothing. pandas' `ewm` with
    adjust=True is exactly this bias-corrected average."""
    if not 0 <= weight < 1:
        raise ValueError("smoothing weight must be in [0, 1)")
    return pd.Series(values, dtype=float).ewm(alpha=1 - weight, adjust=True).mean().tolist()


@dataclass
class Curve:
    """One line on a comparison chart: a run, or a group's mean with a ± std band."""
    name: str
    x: list[float]
    y: list[float]
    std: list[float] | None = None  # per point, for groups of seeds
    n_runs: int = 1
    bounds: list[tuple[float, float, str]] = field(default_factory=list)
    color_key: str = ""  # what picks its colour (run_color): the run id, or the group name


def run_curve(run: Run, frame: pd.DataFrame, key: str, align_stage2: bool = False) -> Curve:
    x, y = series(frame, key)
    shift = stage2_offset(run.config) if align_stage2 else 0.0
    return Curve(run.name, [v - shift for v in x], y, color_key=run.id,
                 bounds=[(a - shift, b - shift, label) for a, b, label in stage_bounds(run.config)])


def group_curve(name: str, runs: Sequence[Run], frames: Sequence[pd.DataFrame], key: str,
                align_stage2: bool = False) -> Curve:
    """Mean and (sample) standard deviation across the runs of a group, per x position.
    Points logged by only some runs (an unfinished seed) average over those that have them."""
    parts = []
    for run, frame in zip(runs, frames):
        c = run_curve(run, frame, key, align_stage2)
        parts.append(pd.DataFrame({"x": [round(v, 6) for v in c.x], "y": c.y}))
    if not parts or all(p.empty for p in parts):
        return Curve(name, [], [], [], n_runs=len(runs), color_key=name)
    stats = pd.concat(parts).groupby("x")["y"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    bounds = run_curve(runs[0], frames[0], key, align_stage2).bounds if runs else []
    return Curve(name, stats["x"].tolist(), stats["mean"].tolist(), stats["std"].tolist(),
                 n_runs=len(runs), bounds=bounds, color_key=name)


def seed_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs that share a group (seeds of one recipe), by group name; runs without one are left out."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.group:
            groups.setdefault(r.group, []).append(r)
    return groups


def comparison_curves(entries: Sequence[tuple[str, Sequence[Run]]],
                      frame_of: Callable[[Run], pd.DataFrame], key: str,
                      align_stage2: bool = False) -> list[Curve]:
    """One curve per compared entry: a run's own, or a group's mean ± std. `frame_of` reads
    a run's metric rows (each run is read once)."""
    frames: dict[str, pd.DataFrame] = {}

    def frame(run: Run) -> pd.DataFrame:
        if run.id not in frames:
            frames[run.id] = frame_of(run)
        return frames[run.id]

    return [run_curve(members[0], frame(members[0]), key, align_stage2) if len(members) == 1
            else group_curve(name, members, [frame(r) for r in members], key, align_stage2)
            for name, members in entries]


def entry_configs(entries: Sequence[tuple[str, Sequence[Run]]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, config) per compared entry, for the config diff: a group's config is its first
    run's, with the seeds of all its runs listed."""
    named = []
    for name, members in entries:
        cfg = to_dict(members[0].config)
        if len(members) > 1:
            cfg["seed"] = ", ".join(str(v) for v in sorted(r.config.seed for r in members))
        named.append((name, cfg))
    return named


def final_metrics_table(entries: Sequence[tuple[str, Sequence[Run]]]) -> pd.DataFrame:
    """One row per compared entry (a run, or a group of seeds: mean ± std)."""
    rows = []
    for name, runs in entries:
        def agg(values: list[float | None]) -> str:
            vals = [v for v in values if v is not None]
            if not vals:
                return "—"
            if len(vals) == 1:
                return fmt_pct(vals[0], 2)
            return f"{100 * statistics.fmean(vals):.2f} ± {100 * statistics.stdev(vals):.2f} %"

        one = runs[0] if len(runs) == 1 else None
        rows.append({
            "Entry": name,
            "Runs": len(runs),
            "Recipe": recipe_text(runs[0].config) if runs else "",
            "Best val acc": agg([r.best_val_acc for r in runs]),
            "Best at": (f"stage {one.best_stage}, epoch {one.best_epoch}"
                        if one and one.best_stage else "—"),
            "Test acc": agg([r.test_acc for r in runs]),
            "Training time": fmt_duration(
                sum(r.duration_s or 0 for r in runs) / max(1, len(runs))),
            "Status": ", ".join(sorted({r.status for r in runs})),
        })
    return pd.DataFrame(rows)


def config_diff_table(named_configs: Sequence[tuple[str, dict[str, Any]]]) -> pd.DataFrame:
    """Config fields (flattened, 'stage 2.lr') whose values differ between any of the given
    configs; one column per config. Fields equal everywhere are left out."""
    # A class list is a set: the same classes picked in another order are no difference.
    flat = [(name, flatten({**cfg, "classes": sorted(cfg["classes"])} if cfg.get("classes")
                           else cfg)) for name, cfg in named_configs]
    keys = sorted({k for _, f in flat for k in f})
    missing = object()
    differing = [k for k in keys if len({repr(f.get(k, missing)) for _, f in flat}) > 1]
    data = {}
    for name, f in flat:
        col = name
        while col in data:  # two runs with the same name stay two columns
            col += " "
        data[col] = ["—" if k not in f else _cell(f[k]) for k in differing]
    return pd.DataFrame(data, index=pd.Index(differing, name="Field"))


def _cell(v: Any) -> str:
    """A config value as a table shows it: floats to 4 significant digits (an LR finder's
    0.0014508287784959393 reads 0.001451), everything else as it is."""
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_points(m: float, s: float) -> str:
    """A mean ± spread in percentage points: "91.0 ± 1.4", "91.0" without a spread, "–"."""
    if math.isnan(m):
        return "–"
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


def _seed_cell(run) -> str:
    """One seed's result in a recipe row: its accuracy, or what became of it ("failed"):
    a failed run shows where its result would be (its reason is under the table)."""
    if run.status == "finished" and run.best_val_acc is not None:
        return f"{100 * run.best_val_acc:.1f}"
    return f"seed {run.config.seed} {run.status}"


def recipe_results_table(res: ExperimentResults) -> pd.DataFrame:
    """One row per recipe of an experiment: finished runs, mean ± std per metric, per seed."""
    rows = []
    for r in res.recipes:
        vm, vs = r.stat("val")
        tm, ts = r.stat("test")
        rows.append({"recipe": r.recipe.name,
                     "finished": f"{r.n_done} of {len(r.runs)}",
                     "best val acc (%)": fmt_points(vm, vs),
                     "test acc (%)": fmt_points(tm, ts),
                     "val acc per seed (%)": ", ".join(_seed_cell(run) for run in r.runs),
                     "other": ", ".join(f"{n} {k}" for k, n in sorted(r.counts.items())
                                        if k != "finished")})
    return pd.DataFrame(rows)
