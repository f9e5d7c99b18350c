"""Issue 20, a new user's second hour, page by page (AppTest of the whole app): tools'
records kept out of lists of results, forms that remember, one figure per concept."""

from __future__ import annotations

from pathlib import Path

from core.runs.entities import TRAINING_KINDS
from tests.conftest import tiny_config
from tests.test_app_pages import open_page, seed_finished


def _lr_finder_record(store):
    """A range test recorded the way the LR finder records one (kind "lr_finder")."""
    from core.analysis import lr_finder

    lrs = tuple(lr_finder.lr_at(i, 20) for i in range(20))
    losses = tuple(2.0 - 0.05 * i for i in range(20))
    finding = lr_finder.LrFinding(1, "layer4+fc", lr_finder.LrCurve(lrs, losses, losses, False),
                                  "random initialisation")
    return lr_finder.record(store, tiny_config(Path("/x")), finding)


def test_lists_of_results_show_training_runs_only(app_env):
    """Issue 20.6: an LR range test is a run of kind lr_finder: Overview's table and picker,
    Compare's picker, Experiments' "configs of earlier runs" and the Runs picker list only
    training runs (it showed as a 0 s, 0 B two-stage run); a link still opens the record."""
    trained = seed_finished(app_env, "trained", tiny_config(Path("/x")), 0.6, 0.55)
    record = _lr_finder_record(app_env)
    assert record.kind == "lr_finder" and "lr_finder" not in TRAINING_KINDS
    at = open_page("app_pages/overview.py")
    assert list(at.dataframe[0].value["Run"]) == ["trained"]
    assert len(at.selectbox(key="overview.pick").options) == 1
    at.switch_page("app_pages/compare.py").run()
    assert len(at.multiselect(key="compare.runs").options) == 1
    at.switch_page("app_pages/experiments.py").run()
    assert len(at.multiselect(key="experiments.saved").options) == 1
    at.switch_page("app_pages/runs.py").run()
    assert at.selectbox(key="runs.pick").value == trained.id
    assert len(at.selectbox(key="runs.pick").options) == 1
    at = open_page("app_pages/runs.py", selected_run_id=record.id)  # opened from its tool
    assert at.selectbox(key="runs.pick").value == record.id
    assert not at.exception
