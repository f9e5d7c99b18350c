"""AppTest of the Search page, served alone: the empty page, starting a search from the
form (the driver is not started here), and a search whose trials have ended: trials table,
recommendation in words, parallel coordinates, importances, and Confirm queuing an
experiment. Trials are real store runs and a real Optuna study; their training is written
into the store directly, so no worker runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.analysis import experiments as ex
from core.analysis import search as searchmod
from core.runs import search_driver
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "app_pages" / "search.py")
TIMEOUT_S = 120


@pytest.fixture
def no_driver(monkeypatch) -> list:
    started: list = []
    monkeypatch.setattr(search_driver, "ensure_running", lambda store, sid: started.append(sid))
    return started


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [x.value for kind in (at.info, at.success, at.warning, at.error) for x in kind]
    return "\n".join(str(p) for p in parts)


def run_page(**state) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT_S)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at) -> str:
    return "\n".join(el.proto.spec for el in at.get("plotly_chart"))


def trained(store, run_id: str, accs: list[float]) -> None:
    """What a worker would have recorded: one validated epoch per accuracy, then finished."""
    assert store.claim_run_now(run_id, os.getpid())
    store.log_metrics(run_id, [(1, float(i), i, "val/acc", a) for i, a in enumerate(accs, 1)])
    store.set_best(run_id, max(accs), 1, accs.index(max(accs)) + 1, None)
    store.finish_run(run_id, "finished")


def ended_search(store, data, monkeypatch) -> str:
    """A four-trial search whose trials all finished, told to Optuna by the driver's step."""
    monkeypatch.setenv("FINETUNE_LAB_MAX_JOBS", "4")
    spec = searchmod.SearchSpec(name="overnight", base=tiny_config(data), trials=4)
    sid = searchmod.create_search(store, spec, start=False)
    study = searchmod.load_study(store, sid)
    now = searchmod.read_spec_of(study).created_at
    search_driver.step(store, study, sid, now)  # asks for four trials: four queued runs
    for i, run in enumerate(sorted(store.list_runs(group=sid), key=lambda r: r.name)):
        trained(store, run.id, [0.4 + 0.1 * i] * run.config.total_epochs)
    assert search_driver.step(store, study, sid, now)
    return sid


def test_the_empty_page_offers_the_form(app_env, no_driver):
    at = run_page()
    assert "No searches yet" in texts(at)
    assert at.multiselect(key="search.dim.schedule").value == list(searchmod.SearchSpace().of("schedule"))
    assert at.select_slider(key="search.dim.lr").value == (1e-4, 0.1)


def test_starting_a_search_from_the_form_records_its_spec(app_env, no_driver, no_workers):
    at = run_page()
    at.selectbox(key="search.weights").set_value("random")
    at.selectbox(key="search.device").set_value("cpu")
    at.number_input(key="search.trials").set_value(5)
    at.slider(key="search.dim.stages").set_value((2, 2))
    at.multiselect(key="search.dim.schedule").set_value(["onecycle"])
    at.text_input(key="search.name").set_value("<b>mine</b>")
    at.run()
    at.button(key="search.start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [sid] = searchmod.list_searches(app_env)
    assert set(no_driver) == {sid}  # started, and looked after on each rerun
    spec = searchmod.summary(app_env, sid).spec
    assert spec.trials == 5 and spec.name == "<b>mine</b>" and spec.base.weights == "random"
    assert spec.space.of("stages") == (2, 2) and spec.space.of("schedule") == ("onecycle",)
    assert spec.base.data_path.endswith("colors")


def test_an_ended_search_shows_trials_recommendation_parcoords_and_confirms(
        app_env, tiny_folder, no_driver, no_workers, monkeypatch):
    sid = ended_search(app_env, tiny_folder, monkeypatch)
    found = searchmod.summary(app_env, sid)
    best = found.best
    at = run_page()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["trial"]) == [0, 1, 2, 3] and set(table["status"]) == {"finished"}
    assert searchmod.describe_recipe(best.config) in [s.value for s in at.success]
    spec = charts(at)
    assert "parcoords" in spec and "Best validation accuracy so far" in spec
    assert "Which dimensions mattered" in spec
    at.button(key="search.confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [exp] = ex.list_experiments(app_env)
    assert [r.name for r in exp.recipes] == [f"search best (trial {best.number})", "Two-stage"]
    assert exp.recipes[0].config == best.config and exp.seeds == searchmod.CONFIRM_SEEDS
    assert "confirming experiment" in texts(at)
