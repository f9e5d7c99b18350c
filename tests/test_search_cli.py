"""`python -m core search`: start (prints the id), --status ID --json, --stop ID, and clear
errors. The driver is not started here (tests/test_search.py runs real searches)."""

from __future__ import annotations

import json

import pytest

from core import cli
from core.analysis import search as searchmod
from core.runs import search_driver


@pytest.fixture
def no_driver(monkeypatch) -> list:
    started: list = []
    monkeypatch.setattr(search_driver, "ensure_running",
                        lambda store, sid: started.append(sid))
    return started


def _data_args(tmp_path, tiny_folder) -> list[str]:
    return ["--data-dir", str(tmp_path / "runs"), "search", "--data-source", "folder",
            "--data-path", str(tiny_folder), "--weights", "random", "--device", "cpu"]


def test_search_starts_prints_its_id_and_reports_its_status_as_json(
        tmp_path, tiny_folder, no_driver, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"stages": [2, 2], "schedule": ["onecycle"]}))
    assert cli.main([*_data_args(tmp_path, tiny_folder), "--trials", "5", "--minutes", "30",
                     "--name", "night run", "--space", str(space), "--resolution", "48"]) == 0
    sid = capsys.readouterr().out.strip()
    assert sid.startswith(searchmod.SEARCH_PREFIX) and no_driver == [sid]

    assert cli.main(["--data-dir", str(tmp_path / "runs"), "search", "--status", sid,
                     "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "running"
    assert (status["trials"], status["finished"], status["pruned"], status["failed"]) == (0, 0, 0, 0)
    assert status["best"] is None and status["name"] == "night run"

    from core.runs.store import RunStore

    spec = searchmod.summary(RunStore(tmp_path / "runs"), sid).spec
    assert (spec.trials, spec.minutes, spec.base.resolution) == (5, 30.0, 48)
    assert spec.space.of("stages") == (2, 2) and spec.space.of("schedule") == ("onecycle",)
    assert spec.space.of("lr") == searchmod.SearchSpace().of("lr")  # not given: the default

    assert cli.main(["--data-dir", str(tmp_path / "runs"), "search", "--stop", sid]) == 0
    assert searchmod.summary(RunStore(tmp_path / "runs"), sid).stop_requested


def test_a_bad_space_or_an_unknown_search_is_a_clear_error(tmp_path, tiny_folder, no_driver,
                                                           capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"stages": [1, 9], "colour": ["red"]}))
    assert cli.main([*_data_args(tmp_path, tiny_folder), "--space", str(space)]) == 2
    assert "unknown dimensions colour" in capsys.readouterr().err
    space.write_text(json.dumps({"stages": [1, 9]}))
    assert cli.main([*_data_args(tmp_path, tiny_folder), "--space", str(space)]) == 2
    assert "Stages: the range must lie within 1..3" in capsys.readouterr().err
    assert cli.main([*_data_args(tmp_path, tiny_folder), "--tag", "x"]) == 2
    assert "--note/--tag: label runs, not searches" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(tmp_path / "runs"), "search", "--status",
                     "search-missing"]) == 2
    assert "no search 'search-missing'" in capsys.readouterr().err
    assert no_driver == []
