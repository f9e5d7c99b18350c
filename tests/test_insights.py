"""Run insights: per-stage attribution, weight change per group, confused pairs, top losses."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from core import config as cfgmod
from core.analysis import insights
from core.runs.store import Run, RunResults, results_from_json
from tests.conftest import tiny_config

# Images are shown only from data under the data roots: the tests' data is in temp folders.
pytestmark = pytest.mark.usefixtures("data_in_temp_roots")


def _run_with(store, cfg, results=None) -> Run:
    """A run whose stored results are `results` as JSON (read back by the store's parser)."""
    run = store.create_run(cfg, name="synthetic")
    if results is not None:
        store.set_results(run.id, results_from_json(json.dumps(results)))
    return store.get_run(run.id)


def test_stage_attribution_from_known_metrics(store, tiny_folder):
    cfg = replace(tiny_config(tiny_folder), stages=cfgmod.preset_stages("Two-stage", epochs=2))
    run = _run_with(store, cfg, {"classes": ["a", "b", "c", "d"]})
    # global epochs 1-2 are stage 1, 3-4 stage 2
    store.log_metrics(run.id, [(1, 1.0, 5, "val/acc", 0.50), (1, 2.0, 10, "val/acc", 0.60),
                               (2, 3.0, 15, "val/acc", 0.70), (2, 4.0, 20, "val/acc", 0.68),
                               (1, 1.5, 7, "train/step_loss", 1.0)])
    gains = insights.stage_attribution(store, run)
    assert [(g.stage, g.trains, g.first_epoch, g.last_epoch) for g in gains] == [
        (1, "layer4+fc", 1, 2), (2, "layer3+layer4+fc", 3, 4)]
    assert gains[0].val_before == pytest.approx(0.25)  # chance with 4 classes
    assert gains[0].gain == pytest.approx(0.35)
    assert gains[1].val_before == pytest.approx(0.60)
    assert gains[1].gain == pytest.approx(0.08)  # end of stage, not its best epoch
    assert gains[1].best_in_stage == pytest.approx(0.70)
    table = insights.stage_attribution_table(gains)
    assert table[1]["added (points)"] == pytest.approx(8.0) and table[0]["epochs"] == "1-2"


def test_stage_attribution_of_an_unfinished_stage(store, tiny_folder):
    run = _run_with(store, tiny_config(tiny_folder), {})
    store.log_metrics(run.id, [(1, 1.0, 3, "val/acc", 0.4)])
    gains = insights.stage_attribution(store, run)
    assert gains[0].val_before is None and gains[0].val_after == pytest.approx(0.4)
    assert gains[1].val_after is None and gains[1].gain is None


def test_weight_changes_marks_trained_groups(store, tiny_folder):
    results = {"weight_change": [
        {"stage": 1, "groups": {"conv1": 0.0, "layer3": 0.0, "layer4": 0.12, "fc": 0.9}},
        {"stage": 2, "groups": {"conv1": 0.0, "layer3": 0.05, "layer4": 0.03, "fc": 0.2}},
        {"broken": True}]}
    run = _run_with(store, tiny_config(tiny_folder), results)
    rows = insights.weight_changes(run)
    by = {(r.stage, r.group): r for r in rows}
    assert by[(1, "layer4")].trained and not by[(1, "layer3")].trained
    assert by[(2, "layer3")].trained and by[(2, "layer3")].relative_change == pytest.approx(0.05)
    assert [r.group for r in rows if r.stage == 1] == ["conv1", "layer3", "layer4", "fc"]
    assert insights.weight_changes(_run_with(store, tiny_config(tiny_folder), {})) == []


def test_confused_pairs_sorted_by_count_with_rates():
    results = RunResults(classes=["cat", "dog", "car"],
                         confusion=[[5, 4, 1], [2, 8, 0], [0, 0, 10]])
    pairs = insights.confused_pairs(results, k=2)
    assert [(p.true, p.predicted, p.count) for p in pairs] == [("cat", "dog", 4), ("dog", "cat", 2)]
    assert pairs[0].rate == pytest.approx(0.4)
    assert insights.confused_pairs(RunResults(confusion=[[3, 0], [0, 3]])) == []
    assert insights.confused_pairs(RunResults()) == []


def test_finished_run_has_attribution_and_weight_change(finished_run):
    store, run = finished_run
    gains = insights.stage_attribution(store, run)
    assert len(gains) == 2 and all(g.val_after is not None for g in gains)
    rows = insights.weight_changes(run)
    assert {r.stage for r in rows} == {1, 2}
    # Frozen groups do not move; trained ones do (weight decay and updates change them).
    for r in rows:
        if r.group in ("conv1", "layer1", "layer2"):
            assert r.relative_change == pytest.approx(0.0, abs=1e-12)
    assert all(r.relative_change > 0 for r in rows if r.trained)


def test_top_losses_are_wrong_and_sorted_by_confidence(finished_run):
    store, run = finished_run
    losses = insights.top_losses(store, run, k=50)
    n_test = run.results.sizes.test
    wrong_total = n_test - sum(run.results.confusion[i][i] for i in range(3))
    assert len(losses) == wrong_total
    assert all(t.true != t.predicted for t in losses)
    conf = [t.confidence for t in losses]
    assert conf == sorted(conf, reverse=True)
    assert all(1 / 3 <= c <= 1 for c in conf)  # the argmax of 3 classes
    if losses:
        assert losses[0].image.shape == (32, 32, 3) and str(losses[0].image.dtype) == "uint8"
        # Agrees with the stored confusion matrix: each (true, pred) cell count matches.
        classes = run.results.classes
        for t in {(x.true, x.predicted) for x in losses}:
            n = sum(1 for x in losses if (x.true, x.predicted) == t)
            assert n == run.results.confusion[classes.index(t[0])][classes.index(t[1])]


def test_top_losses_without_checkpoint(store, tiny_folder):
    run = _run_with(store, tiny_config(tiny_folder), {})
    with pytest.raises(insights.InsightError, match="no best checkpoint"):
        insights.top_losses(store, run)


def test_analysis_and_pages_never_change_torchs_thread_count():
    """The dashboard's server process is shared by every session: page code and the analyses
    it triggers leave torch's global thread setting alone (only the worker sets it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for folder in ("app_pages", "core/analysis", "core/views")
                 for p in sorted((root / folder).glob("*.py"))
                 if "set_num_threads" in p.read_text(encoding="utf-8")]
    offenders += [f for f in ("streamlit_app.py",) if "set_num_threads" in (root / f).read_text()]
    assert offenders == []
