"""Figure builders (core.views.charts) and the pure page helpers they draw from (core.views.tables)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from core import config as cfgmod
from core.runs.store import MetricRow, Run, RunProgress
from core.views import charts
from core.views import tables as views

TWO_STAGE = cfgmod.preset_config("Two-stage", epochs=2)  # stages of 2 + 2 epochs
ONE_STAGE = cfgmod.preset_config("All at once", epochs=2)  # one stage, 4 epochs


def make_run(config=TWO_STAGE, name="r", **fields) -> Run:
    return Run(id=fields.pop("id", name), name=name, group=fields.pop("group", ""),
               status=fields.pop("status", "finished"), config=config, created_at=0.0, **fields)


def frame(points: dict[str, list[tuple[float, float]]]) -> pd.DataFrame:
    rows, i = [], 0
    for key, pts in points.items():
        for x, y in pts:
            i += 1
            rows.append(MetricRow(i, "r", 1 if x <= 2 else 2, x, i, key, y, 0.0))
    return views.metrics_frame(rows)


# ---------------------------------------------------------------- views


def test_stage_bounds_follow_the_global_epoch_axis():
    assert views.stage_bounds(TWO_STAGE) == [(0.0, 2.0, "Stage 1: layer4+fc"),
                                             (2.0, 4.0, "Stage 2: layer3+layer4+fc")]
    assert views.stage2_offset(TWO_STAGE) == 2.0
    assert views.stage2_offset(ONE_STAGE) == 0.0  # nothing to align on


def test_ema_keeps_constant_series_and_smooths_noise():
    assert views.ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    # Bias correction: a constant series is not pulled towards 0 at the start.
    assert views.ema([5.0] * 4, 0.9) == pytest.approx([5.0] * 4)
    noisy = [0.0, 1.0] * 10
    smoothed = views.ema(noisy, 0.8)
    spread = max(smoothed[5:]) - min(smoothed[5:])
    assert spread < 0.5  # raw spread is 1.0
    with pytest.raises(ValueError):
        views.ema([1.0], 1.0)


def test_group_curve_is_mean_and_std_over_seeds_and_tolerates_a_short_seed():
    runs = [make_run(name=f"s{i}", id=f"s{i}") for i in range(3)]
    frames = [frame({"val/acc": [(1, 0.5), (2, 0.6)]}),
              frame({"val/acc": [(1, 0.7), (2, 0.8)]}),
              frame({"val/acc": [(1, 0.6)]})]  # still running: one epoch so far
    c = views.group_curve("g", runs, frames, "val/acc")
    assert c.x == [1.0, 2.0]
    assert c.y == pytest.approx([0.6, 0.7])
    assert c.std[0] == pytest.approx(0.1)  # sample std of 0.5, 0.7, 0.6
    assert c.std[1] == pytest.approx(math.sqrt(0.02))  # of 0.6 and 0.8
    assert c.n_runs == 3


def test_alignment_moves_stage_2_start_to_zero_but_leaves_one_stage_runs():
    f = frame({"val/acc": [(1, 0.1), (2, 0.2), (3, 0.3)]})
    aligned = views.run_curve(make_run(TWO_STAGE), f, "val/acc", align_stage2=True)
    assert aligned.x == [-1.0, 0.0, 1.0]
    assert aligned.bounds[1][0] == 0.0
    single = views.run_curve(make_run(ONE_STAGE), f, "val/acc", align_stage2=True)
    assert single.x == [1.0, 2.0, 3.0]


def test_config_diff_table_lists_only_fields_that_differ():
    b = cfgmod.to_dict(cfgmod.with_stage(cfgmod.preset_config("Two-stage", epochs=2), 1, lr=0.005))
    two, one = cfgmod.to_dict(TWO_STAGE), cfgmod.to_dict(ONE_STAGE)
    table = views.config_diff_table([("recipe", two), ("lower lr", b), ("one stage", one)])
    assert "stage 2.lr" in table.index
    assert "batch_size" not in table.index  # equal everywhere
    assert table.loc["stage 2.lr", "lower lr"] == "0.005"
    assert table.loc["stage 2.lr", "one stage"] == "—"  # it has no stage 2
    same = views.config_diff_table([("a", two), ("b", two)])
    assert same.empty


def test_config_diff_table_shows_a_found_lr_in_four_significant_digits():
    """An LR finder's suggestion is a float like 0.0014508287784959393: the table cell is
    cut unless it is rounded for display (the config keeps the exact value)."""
    found = cfgmod.to_dict(cfgmod.with_stage(TWO_STAGE, 0, lr=0.0014508287784959393))
    table = views.config_diff_table([("recipe", cfgmod.to_dict(TWO_STAGE)), ("found", found)])
    assert table.loc["stage 1.lr", "found"] == "0.001451"


def test_final_metrics_table_aggregates_groups_as_mean_and_std():
    a = make_run(name="a", best_val_acc=0.5, test_acc=0.4, best_stage=2, best_epoch=1)
    g = [make_run(name=f"g{i}", best_val_acc=v, test_acc=v) for i, v in enumerate((0.6, 0.8))]
    t = views.final_metrics_table([("a", [a]), ("group", g)])
    assert t.loc[0, "Best val acc"] == "50.00 %"
    assert t.loc[0, "Best at"] == "stage 2, epoch 1"
    assert t.loc[1, "Best val acc"] == "70.00 ± 14.14 %"
    assert t.loc[1, "Runs"] == 2


def test_progress_text_and_fraction_describe_where_a_run_is():
    running = make_run(status="running", progress=RunProgress(
        phase="training", stage=2, stages=2, epoch=1, epochs=3, step=5,
        steps_per_epoch=10, fraction=0.7, eta_s=125))
    assert views.progress_text(running) == "Stage 2/2 · epoch 1/3 · step 5/10 · about 2 min 05 s left"
    assert views.progress_fraction(running) == 0.7
    assert views.progress_fraction(make_run(status="finished")) == 1.0
    assert "queue" in views.progress_text(make_run(status="queued"))


def test_runs_table_shows_recipe_and_percentages():
    t = views.runs_table([make_run(name="x", best_val_acc=0.8123, test_acc=None)])
    assert t.loc[0, "Recipe"] == "layer4+fc → layer3+layer4+fc"
    assert t.loc[0, "Best val acc"] == "81.2 %"
    assert t.loc[0, "Test acc"] == "—"


def test_metrics_csv_has_one_row_per_value():
    rows = [MetricRow(1, "r", 1, 0.5, 3, "train/step_loss", 2.25, 0.0)]
    text = views.metrics_csv(rows).decode()
    assert text.splitlines()[0] == "stage,epoch,step,key,value,time"
    assert "train/step_loss,2.25" in text


# ---------------------------------------------------------------- charts


def test_metric_figure_shades_and_labels_each_stage_and_shows_accuracy_in_percent():
    f = frame({"train/acc": [(1, 0.5), (2, 0.6)], "val/acc": [(1, 0.4), (2, 0.55)]})
    fig = charts.metric_figure(f, "acc", views.stage_bounds(TWO_STAGE))
    assert len(fig.layout.shapes) == 2  # one band per stage
    labels = [a.text for a in fig.layout.annotations]
    assert "Stage 1: layer4+fc" in labels and "Stage 2: layer3+layer4+fc" in labels
    names = [t.name for t in fig.data]
    assert names == ["train (epoch)", "validation"]
    assert list(fig.data[1].y) == pytest.approx([40.0, 55.0])
    assert fig.layout.yaxis.title.text == "accuracy (%)"
    assert fig.layout.xaxis.title.text == charts.EPOCH_AXIS


def test_accuracy_axis_never_zooms_into_equal_values():
    """Early in a run train and validation accuracy can be equal (seen: 72.2 % both, ticks
    72.222221 .. 72.222222): the axis keeps one decimal and a span of a few points."""
    f = frame({"train/acc": [(1, 0.7222222)], "val/acc": [(1, 0.7222222)]})
    fig = charts.metric_figure(f, "acc", views.stage_bounds(TWO_STAGE))
    low, high = fig.layout.yaxis.range
    assert high - low == pytest.approx(charts.MIN_PERCENT_SPAN) and low < 72.2 < high
    assert fig.layout.yaxis.tickformat == ".1f"
    top = charts.metric_figure(frame({"val/acc": [(1, 1.0)]}), "acc",
                               views.stage_bounds(TWO_STAGE))
    assert top.layout.yaxis.range[1] == pytest.approx(100.0)  # never above 100 %
    spread = charts.metric_figure(frame({"val/acc": [(1, 0.2), (2, 0.6)]}), "acc",
                                  views.stage_bounds(TWO_STAGE))
    assert spread.layout.yaxis.range is None  # a real spread: plotly's own range
    # Compare's accuracy chart too: two runs level at 72.2 %.
    level = [views.Curve(n, [1.0], [0.7222222]) for n in ("a", "b")]
    compared = charts.compare_figure(level, "val/acc")
    low, high = compared.layout.yaxis.range
    assert high - low == pytest.approx(charts.MIN_PERCENT_SPAN) and low < 72.2 < high
    assert compared.layout.yaxis.tickformat == ".1f"
    assert charts.compare_figure(level, "val/loss").layout.yaxis.range is None  # not a percent


def test_lines_never_join_two_stages():
    """A stage that a plateau ended at epoch 1 of 2 leaves epoch 2 untrained: the line must
    break there, not run straight from stage 1's last point to stage 2's first."""
    f = frame({"val/acc": [(1, 0.4), (3, 0.7), (4, 0.8)], "lr": [(0.5, 0.01), (1, 0.005),
                                                                  (3.5, 0.001)]})
    fig = charts.metric_figure(f, "acc", views.stage_bounds(TWO_STAGE))
    assert list(fig.data[0].x) == [1.0, None, 3.0, 4.0]
    assert list(fig.data[0].y) == pytest.approx([40.0, None, 70.0, 80.0])
    lr = charts.lr_figure(f, views.stage_bounds(TWO_STAGE))
    assert list(lr.data[0].x) == [0.5, 1.0, None, 3.5]


def test_loss_figure_draws_step_loss_under_the_epoch_means():
    f = frame({"train/step_loss": [(0.5, 2.0), (1.0, 1.5)], "train/loss": [(1, 1.7)],
               "val/loss": [(1, 1.6)]})
    fig = charts.metric_figure(f, "loss", views.stage_bounds(TWO_STAGE))
    assert [t.name for t in fig.data] == ["train (per step)", "train (epoch)", "validation"]
    assert fig.data[0].opacity < 1


def test_compare_figure_draws_group_band_and_keeps_raw_points_when_smoothing():
    g = views.Curve("seeds", [1.0, 2.0], [0.5, 0.7], [0.1, 0.05], n_runs=3,
                    bounds=views.stage_bounds(TWO_STAGE))
    r = views.Curve("single", [1.0, 2.0, 3.0], [0.4, 0.6, 0.5], bounds=views.stage_bounds(ONE_STAGE))
    fig = charts.compare_figure([g, r], "val/acc", smoothing=0.5)
    band = fig.data[0]
    assert band.fill == "toself"
    assert list(band.y) == pytest.approx([60.0, 75.0, 65.0, 40.0])  # upper, then lower reversed
    raw = [t for t in fig.data if t.mode == "markers"]
    assert len(raw) == 2  # one raw-points trace per entry
    assert list(raw[1].y) == pytest.approx([40.0, 60.0, 50.0])
    smoothed = fig.data[-1]
    assert list(smoothed.y) != list(raw[1].y)
    # Stage 2 of the two-stage entry begins at epoch 2: marked once.
    assert [a.text for a in fig.layout.annotations] == ["Stage 2 starts"]


def test_confusion_figure_rows_are_true_classes():
    fig = charts.confusion_figure([[3, 1], [0, 4]], ["cat", "dog"])
    heat = fig.data[0]
    assert list(heat.y) == ["cat", "dog"] and list(heat.x) == ["cat", "dog"]
    assert fig.layout.yaxis.title.text == "true class"
    assert fig.layout.xaxis.title.text == "predicted class"


def test_recipe_figure_marks_trained_groups_per_stage():
    fig = charts.recipe_figure(TWO_STAGE.stages)
    z = [list(r) for r in fig.data[0].z]
    assert z == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_per_class_figure_handles_a_class_missing_from_the_test_set():
    fig = charts.per_class_figure([0.5, None], ["a", "b"])
    assert list(fig.data[0].y) == [50.0, None]
    assert list(fig.data[0].text) == ["50 %", "—"]


def test_accuracy_band_is_clipped_to_possible_values():
    g = views.Curve("seeds", [1.0, 2.0], [0.95, 0.05], [0.1, 0.1], n_runs=2)
    band = charts.compare_figure([g], "val/acc").data[0]
    assert list(band.y) == pytest.approx([100.0, 15.0, 0.0, 85.0])
    loss = charts.compare_figure([g], "val/loss").data[0]  # losses are not clipped
    assert list(loss.y) == pytest.approx([1.05, 0.15, -0.05, 0.85])


def test_group_label_drops_the_seed_suffix():
    from core.runs.store import Run
    from core.views.tables import group_label

    def run(name):
        return Run(id=name, name=name, group="g", status="finished", config=cfgmod.RunConfig(), created_at=0.0)

    assert group_label([run("Exp: Two-stage seed 0"), run("Exp: Two-stage seed 1")]) == "Exp: Two-stage"
    assert group_label([run("alpha"), run("beta")]) == "alpha"


def test_a_run_keeps_its_colour_whatever_else_is_on_the_chart():
    """Issue 11.7: a run's colour comes from its id, not its position among the curves."""
    f = frame({"val/acc": [(1, 0.1), (2, 0.2)]})
    a, b = make_run(id="20260101-aaa", name="a"), make_run(id="20260101-bbb", name="b")
    alone = charts.compare_figure([views.run_curve(a, f, "val/acc")], "val/acc")
    both = charts.compare_figure([views.run_curve(b, f, "val/acc"), views.run_curve(a, f, "val/acc")],
                                 "val/acc")
    colour = alone.data[0].line.color
    assert colour == views.run_color(a.id) == both.data[1].line.color
    assert views.run_color("x" * 8) == views.run_color("x" * 8)  # stable across calls


def test_legends_sit_below_the_plot_clear_of_the_toolbar():
    """Issue 11.7: a legend at the top right ran into the chart's toolbar."""
    fig = charts.metric_figure(frame({"val/acc": [(1, 0.1)], "train/acc": [(1, 0.2)]}), "acc",
                               views.stage_bounds(TWO_STAGE))
    assert fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"


def test_run_labels_carry_a_short_id_and_status_is_plain_text():
    r = make_run(id="20260101-0930-abcdef", name="same name", status="running")
    assert views.run_label(r).startswith("same name · abcdef (running")
    assert views.runs_table([r]).loc[0, "Status"] == "running"  # no emoji to render as boxes


def test_issue_20_7_empty_accuracy_chart_and_class_order():
    """Issue 20.7: before the first epoch the accuracy chart's axis is 0..100 % (it read
    -1..4 %); the same classes picked in another order are not a config difference."""
    f = frame({"train/step_loss": [(0.5, 2.0)]})
    fig = charts.metric_figure(f, "acc", views.stage_bounds(TWO_STAGE))
    assert tuple(fig.layout.yaxis.range) == (0.0, 100.0)
    a = cfgmod.to_dict(cfgmod.preset_config("Two-stage", classes=("cat", "dog", "frog")))
    b = cfgmod.to_dict(cfgmod.preset_config("Two-stage", classes=("frog", "cat", "dog")))
    assert views.config_diff_table([("a", a), ("b", b)]).empty
    c = cfgmod.to_dict(cfgmod.preset_config("Two-stage", classes=("cat", "dog")))
    assert list(views.config_diff_table([("a", a), ("c", c)]).index) == ["classes"]
