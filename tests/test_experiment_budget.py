"""Experiments that can answer the question (issue 11.11): the verdict warns when a recipe
is near chance or the interval is too wide, a stability claim from few seeds is hedged,
and the form's defaults and weights choices."""

import os

import pytest

from core import config as cfgmod
from core.analysis import experiments as ex
from core.runs.store import RunResults
from tests.conftest import tiny_config


def _finish(store, exp, accs, classes=("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")):
    runs = {r.recipe.name: r for r in ex.experiment_results(store, exp).recipes}
    for name, rr in runs.items():
        for run, acc in zip(rr.runs, accs[name]):
            assert store.claim_run_now(run.id, os.getpid())
            store.set_best(run.id, acc, 1, 1, "")
            store.set_results(run.id, RunResults(classes=list(classes)), test_acc=acc)
            store.finish_run(run.id, "finished")
    return ex.experiment_results(store, exp)


@pytest.fixture
def submitted(store, tiny_folder, monkeypatch):
    from core.runs import jobs

    monkeypatch.setattr(jobs, "dispatch", lambda s: [])  # no processes
    base = tiny_config(tiny_folder)
    recipes = ex.preset_recipes(["Two-stage", "All at once"], 1, 0.01, base)
    return ex.submit_experiment(store, recipes, [0, 1, 2], name="budget")


def test_verdict_warns_when_a_recipe_is_near_chance_and_the_interval_is_wide(store, submitted):
    # The case: one recipe near chance (10 classes: 10 %), a ±16-point interval.
    res = _finish(store, submitted, {"Two-stage": [0.40, 0.52, 0.60],
                                     "All at once": [0.11, 0.13, 0.12]})
    val = next(c for c in res.comparisons if c.metric == "val")
    assert "All at once is near chance level (12.0 % against 10.0 % for guessing among 10 " \
           "classes)" in val.text
    assert "Two-stage is near chance" not in val.text
    assert f"± {val.difference.half_width:.1f} points wide" in val.text
    assert "more images or epochs" in val.text


def test_a_budget_that_answers_gets_no_warning(store, submitted):
    res = _finish(store, submitted, {"Two-stage": [0.80, 0.81, 0.82],
                                     "All at once": [0.75, 0.76, 0.75]})
    val = next(c for c in res.comparisons if c.metric == "val")
    assert "Warning" not in val.text and val.difference.excludes_zero


def test_a_stability_claim_from_three_seeds_is_hedged():
    d = ex.welch_difference([80.0, 80.0, 80.0], [75.0, 85.0, 80.0])
    text = ex.verdict("A", "B", d, std_a=0.0, std_b=5.0)
    assert "A was also more stable" in text
    assert "a spread from 3 seeds is itself uncertain" in text and "0.5x to 6.3x" in text
    many = [80.0 + 0.1 * i for i in range(10)]
    assert "itself uncertain" not in ex.verdict("A", "B", ex.welch_difference(many, [m + 5 for m in many]),
                                                std_a=0.1, std_b=0.1)


def test_estimated_time_counts_every_recipe_stage_and_seed(tiny_folder):
    base = tiny_config(tiny_folder, max_train_images=1000)
    recipes = ex.preset_recipes(["Two-stage", "Head only"], 3, 0.01, replace_source(base))
    seconds = ex.estimated_seconds(recipes, 3, None, lambda *shape: 2.0)
    # Two-stage: 2 stages x 3 epochs; Head only: 1 stage x 6 epochs; 2 s each; 3 seeds.
    assert seconds == pytest.approx((6 + 6) * 2.0 * 3)


def replace_source(cfg):
    from dataclasses import replace

    return replace(cfg, data_source="cifar10", data_path="")


def test_experiments_form_offers_every_weights_choice_and_an_answering_budget(app_env):
    from tests.test_app_pages import open_page

    at = open_page("app_pages/experiments.py")
    weights = at.selectbox(key="experiments.weights")
    assert list(weights.options) == [cfgmod.field_spec(cfgmod.RunConfig, "weights").choice_label(c)
                                     for c in cfgmod.WEIGHT_SOURCES]
    assert at.number_input(key="experiments.epochs").value == ex.DEFAULT_EPOCHS_PER_STAGE
    assert at.number_input(key="experiments.cap").value == ex.DEFAULT_IMAGE_CAP
    assert at.number_input(key="experiments.seeds").value == ex.DEFAULT_SEEDS
    assert any("Estimated time" in c.value for c in at.caption)
    weights.set_value("file").run()
    # A weights file is picked from the stored ones or uploaded (issue 20.2), never typed.
    assert at.selectbox(key="experiments.weights_path") is not None
    assert any("weights_path" in w.value for w in at.warning)  # no file given yet
