"""LR finder per stage: the range test trains exactly the stage's groups, rises
exponentially, stops on divergence, suggests an LR, and is recorded as a run."""

import math

import pytest
import torch

from core import config as cfgmod
from core.analysis import lr_finder
from core.engine.data import Preprocess, load_splits
from core.engine.model import build_resnet18
from core.engine.train import Runtime
from tests.conftest import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(tiny_folder):
    return load_splits("folder", str(tiny_folder), Preprocess(32), val_fraction=0.25, seed=0)


def test_steepest_descent_is_where_the_loss_falls_fastest():
    lrs = [lr_finder.lr_at(i, 100) for i in range(100)]
    # Loss falls fastest around 1e-3 (log10 = -3), bottoms out near 1e-1, then blows up.
    smoothed = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3)))
                + (50 * (math.log10(lr) + 1) ** 2 if lr > 0.1 else 0.0) for lr in lrs]
    lr = lr_finder.steepest_descent_lr(lrs, smoothed)
    assert 10 ** -3.2 < lr < 10 ** -2.8
    assert lr_finder.steepest_descent_lr(lrs[:6], smoothed[:6]) is None  # too short to tell
    flat = [1.0] * 100
    assert lr_finder.steepest_descent_lr(lrs, flat) is None  # never falls
    assert lr_finder.lr_at(0, 100) == pytest.approx(lr_finder.START_LR)
    assert lr_finder.lr_at(99, 100) == pytest.approx(lr_finder.END_LR)


@pytest.mark.parametrize("bn_policy", ["eval", "train"])
def test_range_test_trains_only_the_stage_groups_and_stops_on_divergence(splits, bn_policy):
    torch.manual_seed(0)
    model = build_resnet18(len(splits.classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = cfgmod.StageConfig(groups=("layer4", "fc"), bn_policy=bn_policy)
    curve = lr_finder.range_test(model, stage, splits.train, Preprocess(32), Runtime(), 8, True,
                                 torch.Generator().manual_seed(0), steps=60, end_lr=1e4)
    assert curve.diverged and len(curve.lrs) < 60  # 1e4 blows any loss up
    assert all(b > a for a, b in zip(curve.lrs, curve.lrs[1:]))  # exponentially rising
    ratios = [b / a for a, b in zip(curve.lrs, curve.lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert len(curve.losses) == len(curve.smoothed) == len(curve.lrs)
    after = model.state_dict()
    for key, old in before.items():
        moved = not torch.equal(old, after[key])
        if key.startswith(("layer4", "fc")):
            continue
        if bn_policy == "train" and key.startswith("layer3") and key.endswith("running_mean"):
            assert moved  # the policy lets frozen BN statistics drift, as in training
        elif key.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
            if not (bn_policy == "train" and key.endswith(("running_mean", "running_var",
                                                             "num_batches_tracked"))):
                assert not moved, f"frozen {key} moved"
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_find_records_a_run_with_the_curve(store, tiny_folder, finished_run):
    done_store, done = finished_run
    cfg = tiny_config(tiny_folder)
    stage1 = done_store.files(done.id).stage_end(1)
    finding = lr_finder.find_lr(store, cfg, 2, start_checkpoint=str(stage1), steps=20)
    assert finding.stage == 2 and finding.trains == "layer3+layer4+fc"
    assert "stage1" in finding.start
    assert len(finding.curve.lrs) >= lr_finder.SKIP_START
    run = lr_finder.record(store, cfg, finding)
    assert run.status == "finished" and lr_finder.is_lr_find_run(run)
    assert run.name.startswith("LR finder · stage 2 (layer3+layer4+fc)")
    assert run.best_checkpoint is None  # nothing offers it as a model
    back = lr_finder.curve_of(store, run.id)
    assert back.lrs == pytest.approx(finding.curve.lrs)
    assert back.smoothed == pytest.approx(finding.curve.smoothed)
    assert back.diverged == finding.curve.diverged
    # Later stages without a checkpoint say what they measured from.
    plain = lr_finder.find_lr(store, cfg, 2, steps=8)
    assert "measured from the starting weights" in plain.start
    with pytest.raises(ValueError, match="stage 3"):
        lr_finder.find_lr(store, cfg, 3)


def test_figure_is_log_lr_with_the_suggestion_marked():
    from core.views import charts

    lrs = [lr_finder.lr_at(i, 20) for i in range(20)]
    smoothed = [2.0 - 0.05 * i for i in range(20)]
    fig = charts.lr_find_figure(lrs, smoothed, smoothed, 1e-3)
    assert fig.layout.xaxis.type == "log"
    assert [t.name for t in fig.data] == ["loss (per step)", "loss (smoothed)"]
    assert [s.x0 for s in fig.layout.shapes] == [1e-3]
    label = next(a for a in fig.layout.annotations if a.text == "suggested 0.001 (steepest descent)")
    # On a log axis an annotation's x is log10 of the LR (add_vline's label put it at 10**x).
    assert label.x == pytest.approx(-3)
    # The raw points may fall below the smoothed curve: the y range keeps them in view.
    raw = [v - 0.5 for v in smoothed]
    assert charts.lr_find_figure(lrs, raw, smoothed, 1e-3).layout.yaxis.range[0] < min(raw)


def test_cli_lr_find_prints_the_curve_and_records_a_run(tmp_path, tiny_folder, capsys):
    import json

    from core.cli import main
    from core.runs.store import RunStore

    config = tmp_path / "run.json"
    config.write_text(cfgmod.to_json(tiny_config(tiny_folder)))
    store_dir = tmp_path / "runs"
    assert main(["--data-dir", str(store_dir), "lr-find", "--config", str(config),
                 "--steps", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == 1 and out["trains"] == "layer4+fc" and len(out["lrs"]) >= 6
    run = RunStore(store_dir).get_run(out["run"])
    assert run.status == "finished" and lr_finder.is_lr_find_run(run)
    assert main(["--data-dir", str(store_dir), "lr-find", "--config", str(config),
                 "--stage", "3"]) == 2
    assert "stages 1 to 2" in capsys.readouterr().err


def test_new_run_page_finds_an_lr_and_uses_it_in_one_click(app_env, no_workers, tiny_folder):
    from tests.test_app_pages import fill_valid_folder_run, open_page

    at = fill_valid_folder_run(open_page("app_pages/new_run.py"), tiny_folder)
    at.button(key="new_run.lr_find.0.go").click().run(timeout=300)
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    finding = at.session_state["new_run.lr_find.0"]
    assert finding.stage == 1 and finding.trains == "layer4+fc"
    recorded = app_env.list_runs()
    assert len(recorded) == 1 and lr_finder.is_lr_find_run(recorded[0])
    assert recorded[0].status == "finished"  # not queued: no worker trains it
    suggested = finding.curve.suggested_lr
    if suggested is None:  # a tiny random-weights curve may not fall clearly
        assert "no suggestion" in " ".join(c.value for c in at.caption).lower()
        return
    at.button(key="new_run.lr_find.0.use").click().run()
    assert at.session_state["new_run.s0.lr"] == suggested
    at.button(key="new_run.start").click().run()
    queued = [r for r in app_env.list_runs() if not lr_finder.is_lr_find_run(r)]
    assert queued[0].config.stages[0].lr == suggested
