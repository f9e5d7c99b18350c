"""LR finder per stage: the range test trains exactly the stage's groups, rises
exponentially, stops on divergence, suggests an LR only from a curve that clearly gives one,
and runs as a background job (a real worker process) with progress and cancel."""

import math
import os
import random

import pytest
import torch

from core import config as cfgmod
from core.analysis import lr_finder
from core.engine.data import Preprocess, load_splits
from core.engine.model import build_resnet18
from core.engine.train import Runtime
from core.runs import jobs
from tests.conftest import tiny_config, wait_for

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
    rng_before = torch.random.get_rng_state()
    finding = lr_finder.find_lr(store, cfg, 2, start_checkpoint=str(stage1), steps=20)
    # The head's initialisation is seeded privately: the process's generator is untouched
    # (the dashboard's process is shared by every session).
    assert torch.equal(torch.random.get_rng_state(), rng_before)
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


# ---------------------------------------------------------------- the suggestion


def _curve(smoothed, noise=0.0, seed=0):
    rng = random.Random(seed)
    lrs = [lr_finder.lr_at(i, len(smoothed)) for i in range(len(smoothed))]
    losses = [v + rng.uniform(-noise, noise) for v in smoothed]
    return lr_finder.LrCurve(tuple(lrs), tuple(losses), tuple(smoothed), diverged=False)


def test_a_clear_fall_gets_a_suggestion_inside_the_range_searched():
    # Flat, then a steep fall around step 60 (lr ~ 1e-3), then a rise.
    smoothed = [2.3] * 50 + [2.3 - 0.15 * i for i in range(1, 11)] + [0.8 + 0.05 * i for i in range(40)]
    s = _curve(smoothed, noise=0.02).suggestion
    assert s.lr is not None and lr_finder.lr_at(49, 100) < s.lr < lr_finder.lr_at(61, 100)
    assert lr_finder.START_LR <= s.lr <= lr_finder.END_LR
    assert "fell fastest" in s.why


def test_a_flat_noisy_curve_gets_no_suggestion_and_says_why():
    """What a stage-2 checkpoint gives: the loss wanders about one level. The old rule
    offered its steepest wiggle (4e-07 in the field) in one click."""
    rng = random.Random(3)
    smoothed = [0.40 + 0.01 * math.sin(i / 3) + rng.uniform(-0.005, 0.005) for i in range(100)]
    curve = _curve(smoothed, noise=0.2)
    assert lr_finder.steepest_descent_lr(curve.lrs, curve.smoothed) is not None  # the old rule
    s = curve.suggestion
    assert s.lr is None and curve.suggested_lr is None
    assert s.why.startswith("No clear minimum") and "preset's rate" in s.why
    # A fall of 15 % that the batches' noise could make on its own is no minimum either.
    falling = [2.0 - 0.3 / (1 + math.exp(-(i - 50) / 5)) for i in range(100)]  # steepest mid-range
    assert _curve(falling, noise=3.0).suggestion.lr is None
    assert _curve(falling, noise=0.05).suggestion.lr is not None


def test_a_fall_at_the_bottom_of_the_range_gets_no_suggestion():
    # Falling fastest from the first usable step on: the fall began below 1e-7.
    smoothed = [1.0 + 1.3 * math.exp(-i / 10) for i in range(60)] + [1.0 + 0.05 * i for i in range(40)]
    s = _curve(smoothed).suggestion
    assert s.lr is None and "bottom of the range" in s.why


def test_too_short_a_test_gets_no_suggestion():
    assert _curve([2.0, 1.9, 1.8, 1.7, 1.6, 1.5]).suggestion.lr is None


# ---------------------------------------------------------------- the job


def _finished(store, run_id):
    jobs.reconcile(store)
    return store.get_run(run_id).status in ("finished", "failed", "cancelled")


def test_the_lr_finder_runs_as_a_job_in_a_worker_process(store, tiny_folder):
    cfg = tiny_config(tiny_folder)
    job = lr_finder.submit(store, cfg, lr_finder.LrFinderRequest(stage=1, steps=12))
    assert job.kind == "lr_finder" and job.status in ("queued", "running")
    assert lr_finder.request_of(store, job.id) == lr_finder.LrFinderRequest(1, None, 12)
    wait_for(lambda: _finished(store, job.id), 300, "the LR finder job to end")
    done = store.get_run(job.id)
    assert done.status == "finished", (done.error, jobs.log_tail(store, job.id))
    assert done.pid != os.getpid()  # a worker process ran it, not this one
    assert done.progress.phase == "range test" and done.progress.step >= lr_finder.SKIP_START
    curve = lr_finder.curve_of(store, job.id)
    assert len(curve.lrs) >= lr_finder.SKIP_START and curve.lrs[0] == pytest.approx(lr_finder.START_LR)
    assert done.results.weights == "random initialisation"
    assert "range test of stage 1" in jobs.log_tail(store, job.id)
    assert lr_finder.latest_job(store, cfg, 1).id == job.id
    assert lr_finder.latest_job(store, cfg, 2) is None
    assert done.best_checkpoint is None  # nothing offers it as a model


def test_a_running_lr_finder_job_can_be_cancelled(store, tiny_folder):
    job = lr_finder.submit(store, tiny_config(tiny_folder),
                           lr_finder.LrFinderRequest(stage=1, steps=5000))
    wait_for(lambda: store.get_run(job.id).progress.phase == "range test", 300,
             "the range test to start")
    jobs.cancel(store, job.id)
    wait_for(lambda: _finished(store, job.id), 120, "the job to stop")
    done = store.get_run(job.id)
    assert done.status == "cancelled", (done.error, jobs.log_tail(store, job.id))
    assert not store.metrics(job.id, keys=[lr_finder.LR_KEY])  # no half curve recorded


def test_an_lr_finder_job_waits_for_the_queue_limit(store, tiny_folder, monkeypatch):
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    training = jobs.submit(store, cfgmod.with_stage(tiny_config(tiny_folder), 0, epochs=200))
    wait_for(lambda: store.get_run(training.id).status == "running", 120, "the run to start")
    job = lr_finder.submit(store, tiny_config(tiny_folder), lr_finder.LrFinderRequest(stage=1))
    assert store.get_run(job.id).status == "queued"  # the one slot is taken
    jobs.cancel(store, job.id)
    assert store.get_run(job.id).status == "cancelled"
    jobs.cancel(store, training.id)
    wait_for(lambda: _finished(store, training.id), 120, "the run to stop")


def test_a_bad_request_is_refused_before_anything_is_queued(store, tiny_folder):
    with pytest.raises(cfgmod.ConfigError, match="stages 1 to 2"):
        lr_finder.submit(store, tiny_config(tiny_folder), lr_finder.LrFinderRequest(stage=3))
    with pytest.raises(cfgmod.ConfigError, match="does not exist"):
        lr_finder.submit(store, tiny_config(tiny_folder),
                         lr_finder.LrFinderRequest(stage=2, start_checkpoint="/nonexistent.pt"))
    assert store.list_runs() == []


# ---------------------------------------------------------------- the page


def _recorded_job(store, cfg, stage, smoothed):
    """A finished LR finder job of `cfg` with a known curve, as its worker records it."""
    run = store.create_run(cfg, kind="lr_finder")
    from core.atomic import atomic_write_json

    atomic_write_json(store.files(run.id).job_request, {"stage": stage, "steps": len(smoothed)})
    assert store.claim_run_now(run.id, os.getpid())
    curve = _curve(smoothed)
    lr_finder.record_curve(store, run, lr_finder.LrFinding(stage, cfg.stages[stage - 1].trains,
                                                           curve, "random initialisation"))
    store.finish_run(run.id, "finished")
    return curve


def test_new_run_page_queues_the_lr_finder_and_shows_its_progress_and_cancel(
        app_env, no_workers, tiny_folder):
    from tests.test_app_pages import fill_valid_folder_run, open_page

    at = fill_valid_folder_run(open_page("app_pages/new_run.py"), tiny_folder)
    at.button(key="new_run.lr_find.0.go").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    [job] = app_env.list_runs()
    assert job.kind == "lr_finder" and job.status == "queued"  # a job, not work in the page
    assert at.session_state["new_run.lr_find.0"] == job.id
    assert at.button(key="new_run.lr_find.0.go").disabled  # one test of a stage at a time
    assert "Waiting in the queue" in at.get("progress")[0].proto.text
    at.button(key="new_run.lr_find.0.cancel").click().run()
    assert app_env.get_run(job.id).status == "cancelled"
    at.run()
    assert any("cancelled" in w.value for w in at.warning)
    assert not at.button(key="new_run.lr_find.0.go").disabled


def test_new_run_page_shows_a_finished_test_and_uses_its_suggestion_in_one_click(
        app_env, no_workers, tiny_folder):
    from tests.test_app_pages import fill_valid_folder_run, open_page

    at = fill_valid_folder_run(open_page("app_pages/new_run.py"), tiny_folder)
    # Queue one to learn the page's config, then stand a finished test of it in its place.
    at.button(key="new_run.lr_find.0.go").click().run()
    [queued] = app_env.list_runs()
    cfg = queued.config
    jobs.cancel(app_env, queued.id)
    smoothed = [2.3] * 50 + [2.3 - 0.15 * i for i in range(1, 11)] + [0.8 + 0.05 * i for i in range(40)]
    curve = _recorded_job(app_env, cfg, 1, smoothed)
    at.session_state["new_run.lr_find.0"] = None  # a fresh session finds the newest test
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    suggested = curve.suggested_lr
    use = at.button(key="new_run.lr_find.0.use")
    assert use.label == f"Use {suggested:.2g} for stage 1"
    use.click().run()
    assert at.session_state["new_run.s0.lr"] == suggested


def test_new_run_page_offers_nothing_from_a_flat_curve(app_env, no_workers, tiny_folder):
    from tests.test_app_pages import fill_valid_folder_run, open_page

    at = fill_valid_folder_run(open_page("app_pages/new_run.py"), tiny_folder)
    at.button(key="new_run.lr_find.0.go").click().run()
    [queued] = app_env.list_runs()
    jobs.cancel(app_env, queued.id)
    _recorded_job(app_env, queued.config, 1, [0.4 + 0.001 * (i % 3) for i in range(100)])
    at.session_state["new_run.lr_find.0"] = None
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(i.value.startswith("No clear minimum") for i in at.info)
    assert "new_run.lr_find.0.use" not in [b.key for b in at.button]
