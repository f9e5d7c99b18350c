"""Issue 20, a new user's second hour, page by page (AppTest of the whole app): tools'
records kept out of lists of results, forms that remember, one figure per concept."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from core import config as cfgmod
from core.analysis import experiments as ex
from core.runs.entities import TRAINING_KINDS
from tests.conftest import tiny_config
from tests.test_app_pages import fill_valid_folder_run, open_page, seed_finished


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


# ---------------------------------------------------------------- 20.4: forms remember


def test_new_run_keeps_its_form_for_the_session_and_starts_with_a_note_and_tags(
        app_env, no_workers, tiny_folder):
    """Issue 20.4: leave New run and come back: data folder, classes, cap and weights are as
    left (they were back to CIFAR-10 / ImageNet); a note and tags given before Start are on
    the run."""
    at = fill_valid_folder_run(open_page("app_pages/new_run.py"), tiny_folder)
    at.multiselect(key="new_run.classes").set_value(["red", "blue"])
    at.number_input(key="new_run.max_train_images").set_value(30).run()
    at.switch_page("app_pages/overview.py").run()
    at.switch_page("app_pages/new_run.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="new_run.data_source").value == "folder"
    assert at.text_input(key="new_run.data_path").value == str(tiny_folder)
    assert at.multiselect(key="new_run.classes").value == ["red", "blue"]
    assert at.number_input(key="new_run.max_train_images").value == 30
    assert at.radio(key="new_run.weights").value == "random"
    assert at.select_slider(key="new_run.s1.lr").value == 0.002
    at.text_area(key="new_run.note").input("does a lower stage-2 lr help?")
    at.multiselect(key="new_run.tags").select("pilot").run()
    at.button(key="new_run.start").click().run()
    [run] = app_env.list_runs()
    assert run.note == "does a lower stage-2 lr help?" and run.tags == ("pilot",)
    assert run.config.classes == ("red", "blue") and run.config.max_train_images == 30


def test_run_again_and_load_a_config_fill_new_run(app_env, tiny_folder):
    """Issue 20.4: "Run again with this config" on a run opens New run with its config;
    "Load a config" takes the JSON the Runs page downloads; a file that is not a config is
    refused in words and the form is left as it was."""
    cfg = replace(tiny_config(tiny_folder), batch_size=4, max_train_images=20,
                  classes=("green", "red"))
    run = seed_finished(app_env, "tiny", cfg, 0.6, 0.55)
    at = open_page("app_pages/runs.py", selected_run_id=run.id)
    at.button(key="runs.again").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["New run"]
    assert at.select_slider(key="new_run.batch_size").value == 4
    assert at.number_input(key="new_run.max_train_images").value == 20
    assert at.multiselect(key="new_run.classes").value == ["green", "red"]
    assert at.text_input(key="new_run.data_path").value == str(tiny_folder)
    assert at.number_input(key="new_run.n_stages").value == len(cfg.stages)

    at = open_page("app_pages/new_run.py")
    assert at.select_slider(key="new_run.batch_size").value != 4
    at.file_uploader(key="new_run.config_file").set_value(
        ("tiny-config.json", cfgmod.to_json(cfg).encode(), "application/json")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.select_slider(key="new_run.batch_size").value == 4
    assert at.number_input(key="new_run.max_train_images").value == 20
    at.file_uploader(key="new_run.config_file").set_value(
        ("notes.json", b'{"stages": "lots"}', "application/json")).run()
    assert any(e.value.startswith("notes.json is not a run config:") for e in at.error)
    assert at.select_slider(key="new_run.batch_size").value == 4


def test_experiments_keep_their_form_and_open_in_compare(app_env, no_workers):
    """Issue 20.4: the Experiments form is as left after a visit elsewhere; "Open in
    Compare" shows the experiment's recipes as groups of seeds."""
    at = open_page("app_pages/experiments.py")
    at.selectbox(key="experiments.weights").set_value("random")
    at.selectbox(key="experiments.device").set_value("cpu")
    at.number_input(key="experiments.cap").set_value(300)
    at.number_input(key="experiments.seeds").set_value(2).run()
    at.switch_page("app_pages/overview.py").run()
    at.switch_page("app_pages/experiments.py").run()
    assert at.selectbox(key="experiments.weights").value == "random"
    assert at.number_input(key="experiments.cap").value == 300
    assert at.number_input(key="experiments.seeds").value == 2
    at.button(key="experiments.submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [exp] = ex.list_experiments(app_env)
    for run in app_env.list_runs():  # they ran
        app_env.claim_run_now(run.id, os.getpid())
        app_env.set_best(run.id, 0.5, 1, 1, "")
        app_env.finish_run(run.id, "finished")
    at.button(key="experiments.compare").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Compare"]
    assert at.multiselect(key="compare.groups").value == [r.group for r in exp.recipes]


# ---------------------------------------------------------------- 20.2: pickers


def _state_dict_bytes() -> bytes:
    import io

    import torch

    from core.engine.model import build_resnet18

    buf = io.BytesIO()
    torch.save(build_resnet18(3).state_dict(), buf)
    return buf.getvalue()


def test_offline_fixes_are_pickers_not_typed_paths(app_env, no_workers, tiny_folder,
                                                    tmp_path, monkeypatch):
    """Issue 20.2: offline, New run offers the fixes that keep the recipe: a weights file
    uploaded (checked, stored under the data folder, then picked from a list) or another
    run's checkpoint picked from a list; the data folder is picked from the data sets found
    under the data roots. A file that is not ResNet-18 weights is refused in words and not
    stored."""
    roots = tmp_path / "roots"
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", f"{roots}{os.pathsep}{tiny_folder.parent}")
    donor = seed_finished(app_env, "donor", tiny_config(tiny_folder), 0.6, 0.55)
    best = app_env.files(donor.id).best
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_bytes(_state_dict_bytes())
    app_env.set_best(donor.id, 0.6, 2, 1, str(best))
    at = open_page("app_pages/new_run.py")
    at.button(key="new_run.fix_run").click().run()
    assert at.radio(key="new_run.weights").value == "run"
    assert at.selectbox(key="new_run.weights_run").value == donor.id
    at.radio(key="new_run.weights").set_value("imagenet").run()  # the notice again
    at.button(key="new_run.fix_file").click().run()
    assert at.radio(key="new_run.weights").value == "file"
    at.file_uploader(key="new_run.weights_path.upload").set_value(
        ("notes.pt", b'{"not": "weights"}', "application/octet-stream")).run()
    assert any(e.value.startswith("Not stored: notes.pt is a JSON file") for e in at.error)
    assert not (roots / "weights").exists() or not list((roots / "weights").iterdir())
    at.file_uploader(key="new_run.weights_path.upload").set_value(
        ("my resnet.pth", _state_dict_bytes(), "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    stored = roots / "weights" / "my-resnet.pth"
    assert stored.is_file()
    assert at.selectbox(key="new_run.weights_path").value == str(stored)
    at.radio(key="new_run.data_source").set_value("folder").run()
    at.selectbox(key="new_run.data_pick").set_value(str(tiny_folder)).run()
    assert at.text_input(key="new_run.data_path").value == str(tiny_folder)
    assert not at.error, [e.value for e in at.error]
    at.button(key="new_run.start").click().run()
    [run] = [r for r in app_env.list_runs() if r.id != donor.id]
    assert run.config.weights == "file" and run.config.weights_path == str(stored)
    assert run.config.data_path == str(tiny_folder)
