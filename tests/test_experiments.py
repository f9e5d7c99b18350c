"""Experiment statistics (known inputs give known intervals), verdicts, records and results."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
from scipy import stats

from core import config as cfgmod
from core.analysis import experiments as ex
from core.runs.store import RunResults, RunStore
from tests.conftest import tiny_config

# ---------------------------------------------------------------- statistics


def test_mean_and_sample_std_use_n_minus_1():
    assert ex.mean([1, 2, 3, 4]) == 2.5
    # sum of squared deviations 5, divided by n - 1 = 3 (not by n = 4)
    assert ex.sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(ex.sample_std([7.0]))


def test_welch_interval_equal_sizes_known_values():
    # a: mean 3, var 2.5; b: mean 5, var 2.5; se = sqrt(0.5 + 0.5) = 1, df = 8
    d = ex.welch_difference([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    assert d.diff == pytest.approx(-2.0)
    assert d.df == pytest.approx(8.0)
    assert d.half_width == pytest.approx(2.3060041, rel=1e-5)  # t(0.975, 8) * 1
    assert (d.low, d.high) == pytest.approx((-4.3060041, 0.3060041), rel=1e-5)
    assert not d.excludes_zero


def test_welch_unequal_variances_uses_satterthwaite_df():
    a, b = [10.0, 12.0, 14.0], [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    va, vb = 4.0 / 3, 0.875 / 6  # sample variances 4 and 0.875, over n
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 5)
    d = ex.welch_difference(a, b)
    assert d.df == pytest.approx(df)
    assert d.diff == pytest.approx(12 - 2.25)
    assert d.half_width == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    assert d.excludes_zero


def test_welch_without_spread_or_with_one_value():
    same = ex.welch_difference([80.0, 80.0], [78.0, 78.0])
    assert (same.low, same.high) == (2.0, 2.0) and same.excludes_zero
    single = ex.welch_difference([80.0], [78.0, 79.0])
    assert not single.has_interval and not single.excludes_zero


# ---------------------------------------------------------------- verdicts


def test_verdict_names_the_winner_with_interval():
    d = ex.welch_difference([81.0, 82.0, 83.0, 82.5, 81.5], [79.0, 80.0, 80.5, 80.2, 80.3])
    text = ex.verdict("Two-stage", "All at once", d)
    assert text.startswith(f"Two-stage beat All at once by {d.diff:.1f} ± {d.half_width:.1f} points")
    assert "over 5 seeds" in text and "95 % confidence interval" in text
    # Same data the other way round: still says who won, with a positive interval.
    flipped = ex.verdict("All at once", "Two-stage", ex.welch_difference(
        [79.0, 80.0, 80.5, 80.2, 80.3], [81.0, 82.0, 83.0, 82.5, 81.5]))
    assert flipped.startswith("Two-stage beat All at once")
    assert f"interval {d.low:.1f} to {d.high:.1f}" in flipped


def test_verdict_says_no_clear_winner_when_interval_has_zero():
    d = ex.welch_difference([80.0, 82.0, 81.0], [81.0, 80.0, 82.5])
    text = ex.verdict("A", "B", d)
    assert text.startswith("No clear winner") and "includes 0" in text


def test_verdict_mentions_stability_and_single_seed():
    d = ex.welch_difference([80.0, 80.2, 80.1], [75.0, 85.0, 80.0])
    assert "A was also more stable across seeds" in ex.verdict("A", "B", d, std_a=0.1, std_b=5.0)
    one = ex.verdict("A", "B", ex.welch_difference([80.0], [70.0]))
    assert "A scored 10.0 points higher" in one and "at least 2 seeds" in one


# ---------------------------------------------------------------- records and results


def _recipes(tiny_folder):
    base = tiny_config(tiny_folder)
    return ex.preset_recipes(["Two-stage", "All at once"], epochs=1, lr=0.01, base=base)


def test_validate_experiment_is_all_or_nothing(store, tiny_folder):
    recipes = _recipes(tiny_folder)
    bad = [recipes[0], ("Broken", cfgmod.with_stage(recipes[1][1], 0, lr=-1.0))]
    with pytest.raises(cfgmod.ConfigError) as err:
        ex.submit_experiment(store, bad, [0, 1])
    assert any(e.startswith("Broken: stage 1: learning rate") for e in err.value.errors)
    assert store.list_runs() == [] and ex.list_experiments(store) == []
    missing = [recipes[0], ("Elsewhere", replace(recipes[1][1], data_path=str(tiny_folder) + "-gone"))]
    with pytest.raises(cfgmod.ConfigError) as err:
        ex.submit_experiment(store, missing, [0])
    assert any(e.startswith("Elsewhere: data:") for e in err.value.errors)
    assert store.list_runs() == [] and ex.list_experiments(store) == []
    assert "recipes: pick at least two recipes to compare" in ex.validate_experiment(recipes[:1], [0])
    assert "seeds: a seed is listed twice" in ex.validate_experiment(recipes, [1, 1])


def test_preset_recipes_share_run_fields(tiny_folder):
    (n1, c1), (n2, c2) = _recipes(tiny_folder)
    assert (n1, n2) == ("Two-stage", "All at once")
    assert len(c1.stages) == 2 and len(c2.stages) == 1
    assert replace(c1, stages=()) == replace(c2, stages=())


def test_submit_records_groups_and_results_compute_stats(store, tiny_folder, monkeypatch):
    from core.runs import jobs

    started = []
    monkeypatch.setattr(jobs, "dispatch", lambda s: started.append(1) or [])  # no processes
    exp = ex.submit_experiment(store, _recipes(tiny_folder), [0, 1, 2], name="claim test")
    record = RunStore(store.root).get_experiment(exp.id)  # a row another process reads
    assert record.name == "claim test" and record.seeds == (0, 1, 2)
    assert [r.name for r in record.recipes] == ["Two-stage", "All at once"]
    assert all(r.group.startswith(exp.id) for r in record.recipes)
    assert ex.load_experiment(store, exp.id) == exp == record
    assert [e.id for e in ex.list_experiments(store)] == [exp.id]

    runs = {r.recipe.name: r for r in ex.experiment_results(store, exp).recipes}
    assert all(len(r.runs) == 3 and r.counts == {"queued": 3} for r in runs.values())
    assert sorted(x.config.seed for x in runs["Two-stage"].runs) == [0, 1, 2]

    # Pretend the runs finished with known accuracies.
    accs = {"Two-stage": [0.80, 0.82, 0.84], "All at once": [0.78, 0.79, 0.80]}
    for name, rr in runs.items():
        for run, acc in zip(rr.runs, accs[name]):
            assert store.claim_run_now(run.id, os.getpid())
            store.set_best(run.id, acc, 1, 1, "")
            store.set_results(run.id, RunResults(), test_acc=acc - 0.01)
            store.finish_run(run.id, "finished")
    res = ex.experiment_results(store, exp)
    two, all_ = res.recipes
    assert two.stat("val") == pytest.approx((82.0, 2.0))
    assert all_.stat("test") == pytest.approx((78.0, 1.0))
    assert res.active == 0 and res.finished == res.total == 6
    val_cmp = next(c for c in res.comparisons if c.metric == "val")
    assert val_cmp.difference.diff == pytest.approx(3.0)
    assert val_cmp.difference == ex.welch_difference([80, 82, 84], [78, 79, 80])
    # 3 points apart with spreads of 2 and 1 over 3 seeds: the 95 % interval includes 0.
    assert val_cmp.text.startswith("No clear winner")
    assert {c.metric for c in res.comparisons} == {"val", "test"}


def test_load_experiment_rejects_bad_ids_and_records(store):
    with pytest.raises(ex.ExperimentError):
        ex.load_experiment(store, "../../etc/passwd")
    with pytest.raises(ex.ExperimentError, match="does not exist"):
        ex.load_experiment(store, "exp-missing")
    (store.root / "experiments").mkdir()
    (store.root / "experiments" / "exp-bad.json").write_text("{not json")
    assert ex.list_experiments(RunStore(store.root)) == []  # the file is not a record
    assert (store.root / "experiments" / "exp-bad.json").exists()  # and is left alone


def test_saved_run_recipes_name_each_run_once_and_report_unusable_configs(store, tmp_path):
    cfg = tiny_config(tmp_path)
    a = store.create_run(cfg, name="mine")
    b = store.create_run(replace(cfg, seed=3), name="mine")
    invalid = store.create_run(replace(cfg, val_fraction=5.0), name="old rules")
    unreadable = store.create_run(cfg, name="old schema")
    with store._write() as con:  # a config written by a version whose fields are gone
        con.exec_driver_sql("UPDATE runs SET config=? WHERE id=?", ('{"stages": "nope"}', unreadable.id))
    unreadable = store.get_run(unreadable.id)
    assert unreadable.config_error
    recipes, problems = ex.saved_run_recipes([a, b, invalid, unreadable], taken=["Two-stage"])
    assert [n for n, _ in recipes] == ["config of mine", f"config of mine ({b.id})"]
    assert recipes[1][1] == replace(cfg, seed=3)
    assert [p.split(":")[0] for p in problems] == [f"run {invalid.id}", f"run {unreadable.id}"]
    assert all("its config can no longer be used" in p for p in problems)


def test_scipy_is_imported_only_when_statistics_are_computed():
    """The Experiments page imports this module at start-up: scipy loads on first use."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from core.analysis import experiments as ex; before = 'scipy' in sys.modules; "
            "ex.welch_difference([1.0, 2.0], [3.0, 5.0]); print(before, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_an_experiment_record_hands_out_typed_recipe_configs(store, tiny_folder, monkeypatch):
    """The record stores each recipe's config as JSON and reads it back as the RunConfig
    it was queued with (no dict read by key)."""
    from core.runs import jobs

    monkeypatch.setattr(jobs, "dispatch", lambda s: [])  # no processes
    recipes = _recipes(tiny_folder)
    exp = ex.submit_experiment(store, recipes, [0], name="typed")
    loaded = ex.load_experiment(store, exp.id)
    assert [r.config for r in loaded.recipes] == [c for _, c in recipes]
    assert all(isinstance(r.config, cfgmod.RunConfig) for r in loaded.recipes)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_experiment_files_become_rows_on_first_open_and_nothing_is_lost(
        backend, tmp_path, tiny_folder, request):
    """Issue 17.8: experiments kept as JSON files (before store migration 10) become rows
    when the store first opens; each file is kept as <id>.json.migrated; a file that does
    not parse stays where it was; opening again imports nothing twice."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    folder = tmp_path / "runs" / "experiments"
    folder.mkdir(parents=True)
    recipes = _recipes(tiny_folder)
    exp = ex.Experiment(id="exp-20240101-000000-abcd", name="old", created_at=1.0e9,
                        seeds=(0, 1), note="kept", tags=("a", "b"),
                        recipes=tuple(ex.Recipe(n, f"exp-20240101-000000-abcd-{i}", c)
                                      for i, (n, c) in enumerate(recipes)))
    record = {"id": exp.id, "name": exp.name, "created_at": exp.created_at, "seeds": [0, 1],
              "recipes": [{"name": r.name, "group": r.group, "config": cfgmod.to_dict(r.config)}
                          for r in exp.recipes], "note": "kept", "tags": ["b", "a"]}
    (folder / f"{exp.id}.json").write_text(json.dumps(record))
    older = {k: v for k, v in record.items() if k not in ("note", "tags")}  # before notes
    older.update(id="exp-20230101-000000-0000", created_at=9.0e8)
    (folder / f"{older['id']}.json").write_text(json.dumps(older))
    (folder / "exp-broken.json").write_text("{not json")

    store = RunStore(tmp_path / "runs", url=url)
    if url:
        from tests.conftest import empty_store_tables

        empty_store_tables(store)  # a module-wide database: start from no rows
        for path in folder.glob("*.migrated"):
            path.rename(path.with_suffix(""))
        store = RunStore(tmp_path / "runs", url=url)
    assert ex.list_experiments(store) == [
        exp, replace(exp, id=older["id"], created_at=9.0e8, note="", tags=())]
    assert sorted(p.name for p in folder.iterdir()) == [
        "exp-20230101-000000-0000.json.migrated", "exp-20240101-000000-abcd.json.migrated",
        "exp-broken.json"]
    assert [r.config for r in store.get_experiment(exp.id).recipes] == [c for _, c in recipes]
    # A second open (another process, a restart) adds nothing; the API edits the row.
    again = RunStore(tmp_path / "runs", url=url)
    assert len(again.list_experiments()) == 2
    edited = again.update_experiment(exp.id, note="edited", tags=[" z ", "z", ""])
    assert edited.note == "edited" and edited.tags == ("z",)
    assert store.get_experiment(exp.id) == edited
    again.delete_experiment(exp.id)
    assert [e.id for e in store.list_experiments()] == [older["id"]]
