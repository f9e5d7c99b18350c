"""Plateau-triggered stage switch and early stop: config, the stage loop, resume, chart."""

from dataclasses import replace

import pytest
import torch

from core import config as cfgmod
from core.engine.data import Preprocess, load_splits
from core.engine.model import build_resnet18
from core.engine.stage_ends import STAGE_END_KEY, StageEnd
from core.engine.train import PlateauState, ResumeState, Runtime, TrainHooks, run_stages
from tests.conftest import tiny_config

torch.set_num_threads(1)
TIMING = ("epoch_s", "images_per_s")  # wall-clock rows differ by nature


@pytest.fixture(scope="module")
def splits(tiny_folder):
    return load_splits("folder", str(tiny_folder), Preprocess(32), val_fraction=0.25, seed=0)


def _flat_config(tiny_folder, **run_fields):
    """Two head-only stages at an LR too small to change a prediction: validation accuracy
    is flat from the first epoch on, so every later epoch is a plateau epoch."""
    return replace(tiny_config(tiny_folder), stages=(
        cfgmod.StageConfig(groups=("fc",), epochs=4, lr=1e-12, plateau_patience=1),
        cfgmod.StageConfig(groups=("fc",), epochs=3, lr=1e-12, plateau_patience=1),
    ), **run_fields)


def _run(cfg, splits, resume=None, ends=None):
    torch.manual_seed(cfg.seed)
    model = build_resnet18(len(splits.classes))
    rows = []

    def on_epoch_end(e):
        if ends is not None:
            ends.append((e, {k: v.clone() for k, v in e.model.state_dict().items()},
                         len([r for r in rows if r[3] not in TIMING])))

    hooks = TrainHooks(on_metrics=rows.extend, on_epoch_end=on_epoch_end)
    result = run_stages(model, cfg, splits, Preprocess(32), Runtime(), hooks, resume)
    return result, [r for r in rows if r[3] not in TIMING]


def _rows(rows, key):
    return [(s, e, v) for s, e, _, k, v in rows if k == key]


def test_plateau_counts_epochs_without_a_new_best():
    stage = cfgmod.StageConfig(epochs=10, plateau_patience=2)
    p = PlateauState()
    ends = []
    for epoch, (acc, run_best) in enumerate([(0.5, True), (0.6, True), (0.6, False),
                                             (0.55, False)], 1):
        p = p.after_epoch(acc, run_best, stage, epoch, last_stage=False, early_stop_patience=0)
        ends.append(p.stage_end)
    assert ends == [StageEnd.NONE, StageEnd.NONE, StageEnd.NONE, StageEnd.PLATEAU]
    assert p.stage_best_val_acc == 0.6 and p.stage_stale_epochs == 2
    # The run's patience spans stages; a new stage starts its own count.
    assert p.next_stage() == PlateauState(run_stale_epochs=2)
    stopped = p.next_stage().after_epoch(0.1, False, stage, 1, last_stage=False,
                                         early_stop_patience=3)
    assert stopped.stage_end is StageEnd.EARLY_STOP
    # At the cap nothing is cut short: the stage completed.
    at_cap = PlateauState(0.9, 5, 0).after_epoch(0.1, False, stage, 10, False, 0)
    assert at_cap.stage_end is StageEnd.COMPLETED


def test_config_patience_fields_are_validated_by_name(tiny_folder):
    cfg = tiny_config(tiny_folder)
    assert cfgmod.validate(_flat_config(tiny_folder, early_stop_patience=2)) == []
    errors = cfgmod.validate(cfgmod.with_stage(replace(cfg, early_stop_patience=-1), 0,
                                               plateau_patience=1))
    # Stage 1 has 1 epoch: a patience of 1 could never end it.
    assert any(e.startswith("stage 1: plateau_patience (1 epochs) must be less") for e in errors)
    assert any(e.startswith("early_stop_patience must be a whole number") for e in errors)
    # The round trip and the form state carry the new fields.
    flat = _flat_config(tiny_folder, early_stop_patience=3)
    assert cfgmod.from_json(cfgmod.to_json(flat)) == flat
    state = cfgmod.form_state(flat.stages[0], "s.")
    assert state["s.plateau_patience"] == 1
    assert cfgmod.from_form(cfgmod.StageConfig, state, "s.").plateau_patience == 1


def test_cli_flags_set_patience(tiny_folder):
    from core.cli import _parser, build_config

    args = _parser().parse_args([
        "train", "--preset", "Two-stage", "--epochs", "5", "--plateau-patience", "2",
        "--early-stop-patience", "4", "--data-source", "folder", "--data-path", str(tiny_folder)])
    cfg = build_config(args)
    assert [s.plateau_patience for s in cfg.stages] == [2, 2] and cfg.early_stop_patience == 4


def test_a_plateau_ends_the_stage_early_and_marks_why(splits, tiny_folder):
    result, rows = _run(_flat_config(tiny_folder), splits)
    # Stage 1: epoch 1 sets the best, epoch 2 does not beat it -> stage 1 ends at 2 of 4.
    # Stage 2 keeps its nominal place after stage 1's cap (global epoch 4).
    assert [(s, e) for s, e, _ in _rows(rows, "val/acc")] == [(1, 1.0), (1, 2.0), (2, 5.0),
                                                              (2, 6.0)]
    assert _rows(rows, STAGE_END_KEY) == [(1, 2.0, float(StageEnd.PLATEAU)),
                                          (2, 6.0, float(StageEnd.PLATEAU))]
    assert result.epochs_run == 6


def test_early_stop_skips_the_remaining_stages(splits, tiny_folder):
    cfg = _flat_config(tiny_folder, early_stop_patience=1)
    result, rows = _run(cfg, splits)
    assert [(s, e) for s, e, _ in _rows(rows, "val/acc")] == [(1, 1.0), (1, 2.0)]
    assert _rows(rows, STAGE_END_KEY) == [(1, 2.0, float(StageEnd.EARLY_STOP))]
    assert result.epochs_run == 2


def test_without_patience_every_epoch_runs(splits, tiny_folder):
    cfg = _flat_config(tiny_folder)
    cfg = replace(cfg, stages=tuple(replace(s, plateau_patience=0) for s in cfg.stages))
    _, rows = _run(cfg, splits)
    assert len(_rows(rows, "val/acc")) == 7
    assert _rows(rows, STAGE_END_KEY) == [(1, 4.0, float(StageEnd.COMPLETED)),
                                          (2, 7.0, float(StageEnd.COMPLETED))]


@pytest.mark.parametrize("after", [2, 5])  # right after the plateau end; mid stage 2
def test_resume_after_a_plateau_end_continues_exactly(splits, tiny_folder, after):
    cfg = _flat_config(tiny_folder)
    ends = []
    full_result, full_rows = _run(cfg, splits, ends=ends)
    end, state, logged = next(x for x in ends if x[0].global_epoch == after)
    resume = ResumeState(state, end.training_state)
    result, rows = _run(cfg, splits, resume=resume)
    # The resumed run logs exactly the uninterrupted run's rows after that epoch: it knows
    # stage 1 ended early and does not train its remaining epochs.
    assert rows == full_rows[logged:]
    assert result.epochs_run == full_result.epochs_run


def test_resume_after_an_early_stop_trains_nothing(splits, tiny_folder):
    cfg = _flat_config(tiny_folder, early_stop_patience=1)
    ends = []
    _run(cfg, splits, ends=ends)
    end, state, _ = ends[-1]
    assert end.stage_end is StageEnd.EARLY_STOP
    result, rows = _run(cfg, splits, resume=ResumeState(state, end.training_state))
    assert rows == [] and result.epochs_run == 2


def test_chart_marks_where_and_why_a_stage_ended():
    from core.runs.store import MetricRow
    from core.views import charts
    from core.views import tables as views

    cfg = cfgmod.preset_config("Two-stage", epochs=4)
    rows = [MetricRow(1, "r", 1, 1.0, 2, "val/acc", 0.5, 0.0),
            MetricRow(2, "r", 1, 2.0, 4, "val/acc", 0.5, 0.0),
            MetricRow(3, "r", 1, 2.0, 4, STAGE_END_KEY, float(StageEnd.PLATEAU), 0.0),
            MetricRow(4, "r", 2, 5.0, 6, "val/acc", 0.6, 0.0),
            MetricRow(5, "r", 2, 8.0, 12, STAGE_END_KEY, float(StageEnd.COMPLETED), 0.0)]
    fig = charts.metric_figure(views.metrics_frame(rows), "acc", views.stage_bounds(cfg))
    labels = [a.text for a in fig.layout.annotations]
    # Where (the line) and why: a label short enough for a half-width chart, the full
    # reason on hover.
    [mark] = [a for a in fig.layout.annotations if a.text.startswith("stage 1 ended")]
    assert mark.text == "stage 1 ended: plateau"
    assert mark.hovertext == "stage 1 ended: plateau: validation accuracy stopped improving"
    assert not any(t.startswith("stage 2 ended") for t in labels)  # ran all its epochs
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [s.x0 for s in lines] == [2.0]


def test_a_worker_run_keeps_the_early_ended_stage_checkpoint(store, tiny_folder):
    import os

    from core.engine.checkpoints import read_checkpoint
    from core.runs.worker import execute_run

    run = store.create_run(_flat_config(tiny_folder), name="plateau")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished"
    done = store.get_run(run.id)
    # Stage 1 ended at its epoch 2 of 4: its stage-end checkpoint and weight change exist.
    stage1 = read_checkpoint(store.files(run.id).stage_end(1))
    assert (stage1.stage, stage1.epoch) == (1, 2)
    assert [w.stage for w in done.results.weight_change] == [1, 2]
    ends = [(r.stage, r.epoch, r.value) for r in store.metrics(run.id, keys=(STAGE_END_KEY,))]
    assert ends == [(1, 2.0, float(StageEnd.PLATEAU)), (2, 6.0, float(StageEnd.PLATEAU))]
    last = read_checkpoint(store.files(run.id).last).training_state
    assert last.stage_end == StageEnd.PLATEAU and last.global_epoch == 6
    test_rows = store.metrics(run.id, keys=("test/acc",))
    assert [r.epoch for r in test_rows] == [6.0]  # after the last epoch that ran
