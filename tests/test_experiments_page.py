"""AppTest of the Experiments, Run insights and Datasets pages, each served alone
(AppTest.from_file): empty store, a finished run (insights, mistakes gallery, export),
submitting an experiment and reading its verdict, checking a folder data set and handing it
to New run."""

from __future__ import annotations

import os
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.analysis import experiments as ex
from core.runs import jobs
from core.runs.store import RunResults, RunStore
from core.views.text import md

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = str(ROOT / "app_pages" / "experiments.py")
INSIGHTS = str(ROOT / "app_pages" / "insights.py")
DATASETS = str(ROOT / "app_pages" / "datasets.py")
TIMEOUT_S = 120  # per script run; the first export/top-losses render imports torch


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [x.value for kind in (at.info, at.success, at.warning, at.error) for x in kind]
    return "\n".join(str(p) for p in parts)


def run_page(path, **state) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT_S)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_experiments_page_empty_store(app_env):
    at = run_page(EXPERIMENTS)
    body = texts(at)
    assert "No experiments yet" in body
    assert at.multiselect(key="experiments.presets").value == ["Two-stage", "All at once"]
    at = run_page(INSIGHTS)
    assert "Insights appear here" in texts(at)


def test_submit_experiment_then_verdict(app_env, no_workers):
    at = run_page(EXPERIMENTS)
    at.selectbox(key="experiments.weights").set_value("random")
    at.selectbox(key="experiments.device").set_value("cpu")
    at.number_input(key="experiments.seeds").set_value(2)
    at.run()
    assert "This queues 4 runs" in texts(at)
    at.button(key="experiments.submit").click().run()
    assert not at.exception
    [exp] = ex.list_experiments(app_env)
    assert len(app_env.list_runs()) == 4 and exp.seeds == (0, 1)
    assert exp.recipes[0].config.data_path.endswith("colors")
    assert "Queued 4 runs" in texts(at) and "0 of 2" in at.dataframe[0].value.to_string()

    # The runs "finish" with known accuracies: the page shows the statistics and verdict.
    accs = {0: [0.90, 0.92], 1: [0.70, 0.71]}
    for i, recipe in enumerate(exp.recipes):
        for run, acc in zip(sorted(app_env.list_runs(group=recipe.group), key=lambda r: r.config.seed),
                            accs[i]):
            app_env.claim_run_now(run.id, os.getpid())
            app_env.set_best(run.id, acc, 1, 1, "")
            app_env.set_results(run.id, RunResults(), test_acc=acc)
            app_env.finish_run(run.id, "finished")
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["best val acc (%)"]) == ["91.0 ± 1.4", "70.5 ± 0.7"]
    assert any(s.value.startswith("Two-stage beat All at once by 20.5") for s in at.success)


def test_insights_page_with_finished_run(app_env, finished_run, monkeypatch):
    store, run = finished_run
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(store.root))
    at = run_page(INSIGHTS)
    assert at.selectbox(key="insights.run").value == run.id
    body = texts(at)
    assert "What each stage added" in body and "stage 1 (layer4+fc) added" in body
    assert "How far each layer group" in body
    assert "Most confused classes" in body
    at.toggle(key=f"insights.losses.{run.id}").set_value(True).run()
    assert not at.exception
    wrong = sum(run.results.confusion[i][j] for i in range(3) for j in range(3) if i != j)
    if wrong:
        assert len(at.get("image")) >= 1
    else:
        assert any("every test image right" in s.value for s in at.success)
    at.button(key=f"insights.export.{run.id}").click().run()
    assert not at.exception
    # The export is a background job (a worker process); the page shows the zip when done.
    from core.analysis import export
    from core.runs import jobs
    from tests.conftest import wait_for

    job = export.latest_job(store, run.id)

    def ended():
        jobs.reconcile(store)
        return not store.get_run(job.id).is_active

    wait_for(ended, 300, "the export job to end")
    assert store.get_run(job.id).status == "finished", jobs.log_tail(store, job.id)
    at.run()
    assert (store.run_dir(run.id) / f"{run.id}-export.zip").is_file()
    assert at.get("download_button")


def test_datasets_page_empty_then_check_and_use(app_env, tiny_folder):
    at = run_page(DATASETS)
    assert at.selectbox(key="datasets.found").value.startswith("colors")
    at.button(key="datasets.check_found").click().run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Classes"] == "3" and metrics["Images"] == "48"
    assert list(at.dataframe[0].value["class"]) == ["blue", "green", "red"]
    assert len(at.get("image")) >= 3  # preview tiles
    at.button(key="datasets.use").click().run()
    assert at.session_state["new_run_data_path"] == str(tiny_folder)


def test_datasets_page_rejects_paths_outside_roots(app_env, tmp_path):
    at = run_page(DATASETS)
    at.text_input(key="datasets.path").set_value("/etc").run()
    at.button(key="datasets.check_path").click().run()
    assert not at.exception
    assert any("outside the allowed data folders" in e.value for e in at.error)


def test_datasets_page_without_any_data_set(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tmp_path / "empty"))
    at = run_page(DATASETS)
    assert "No data sets found" in texts(at)


def _zip_bytes(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, "holiday photos/" + p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_datasets_page_upload_zip(tmp_path, monkeypatch):
    from tests.conftest import make_image_folder

    roots = tmp_path / "datasets"
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(roots))
    src = make_image_folder(tmp_path / "src", per_class=3, split=False)
    at = run_page(DATASETS)
    at.file_uploader(key="datasets.zip").set_value(
        ("My Photos.zip", _zip_bytes(src, {"holiday photos/notes.txt": b"x"}), "application/zip"))
    at.run()
    assert at.text_input(key="datasets.name").value == "My-Photos"
    at.button(key="datasets.import").click().run()
    assert not at.exception
    assert (roots / "My-Photos" / "red").is_dir()
    # (the data set's name as text: markdown-escaped)
    assert any("Imported **My\\-Photos**: 9 images in 3 classes" in s.value for s in at.success)
    assert {m.label: m.value for m in at.metric}["Skipped (not images)"] == "1"

    evil = _zip_bytes(src, {"../../escape.png": b"x"})
    at.file_uploader(key="datasets.zip").set_value(("evil.zip", evil, "application/zip"))
    at.run()
    at.button(key="datasets.import").click().run()
    assert any(e.value.startswith("Not imported:") and "climbs out" in e.value for e in at.error)
    assert sorted(p.name for p in roots.iterdir()) == ["My-Photos"]
    assert not (tmp_path / "escape.png").exists()


def test_saved_run_config_as_a_recipe(finished_run, monkeypatch, tmp_path, tiny_folder):
    import shutil

    store, run = finished_run
    root = tmp_path / "runs"
    shutil.copytree(store.root, root)  # a copy: submitting must not touch the shared store
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(root))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tiny_folder.parent))
    monkeypatch.setattr(jobs, "dispatch", lambda store: [])
    at = run_page(EXPERIMENTS)
    at.multiselect(key="experiments.presets").set_value(["All at once"])
    at.multiselect(key="experiments.saved").set_value([run.id])
    at.selectbox(key="experiments.weights").set_value("random")
    at.number_input(key="experiments.seeds").set_value(1).run()
    at.button(key="experiments.submit").click().run()
    assert not at.exception
    [exp] = ex.list_experiments(RunStore(root))
    assert [r.name for r in exp.recipes] == ["All at once", "config of tiny finished"]
    saved = exp.recipes[1].config
    assert saved.stages == run.config.stages and saved.batch_size == 8


# ---------------------------------------------------------------- issue 11


def _finish(store: RunStore, run, acc: float, status: str = "finished") -> None:
    store.claim_run_now(run.id, os.getpid())
    if status == "finished":
        store.set_best(run.id, acc, 1, 1, "")
        store.set_results(run.id, RunResults(), test_acc=acc)
    store.finish_run(run.id, status)


def _queue_experiment(app_env) -> AppTest:
    at = run_page(EXPERIMENTS)
    at.selectbox(key="experiments.weights").set_value("random")
    at.selectbox(key="experiments.device").set_value("cpu")
    at.number_input(key="experiments.seeds").set_value(2)
    at.run()
    at.button(key="experiments.submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_queued_experiment_opens_its_results_and_cannot_be_queued_twice(app_env, no_workers):
    """Issue 11.6: after "Run the experiment" the Results tab opens (not "below" on another
    tab), the button stays disabled until the form changes, and the experiment is in the URL."""
    at = _queue_experiment(app_env)
    [exp] = ex.list_experiments(app_env)
    assert at.session_state["tab"] == "Results"
    assert at.query_params["experiment"] == exp.id
    assert at.button(key="experiments.submit").disabled
    assert len(ex.list_experiments(app_env)) == 1 and len(app_env.list_runs()) == 4
    at.number_input(key="experiments.seeds").set_value(3).run()  # the form changed
    assert not at.button(key="experiments.submit").disabled


def test_a_link_opens_the_experiment_it_names(app_env, no_workers):
    _queue_experiment(app_env)
    _queue_experiment(app_env)  # a fresh session: the form is new again
    older, newer = sorted(ex.list_experiments(app_env), key=lambda e: e.created_at)
    at = AppTest.from_file(EXPERIMENTS, default_timeout=TIMEOUT_S)
    at.query_params["experiment"] = older.id
    at.query_params["tab"] = "Results"
    at.run()
    assert at.selectbox(key="experiment").value == older.id != newer.id


def test_verdict_mid_experiment_and_rerunning_cancelled_runs(app_env, no_workers):
    """Issue 11.8: with 2 seeds configured and one finished per recipe, the verdict does not
    ask for "at least 2 seeds"; when the rest were cancelled, a button re-runs them and the
    experiment reaches its verdict."""
    at = _queue_experiment(app_env)
    [exp] = ex.list_experiments(app_env)
    groups = [sorted(app_env.list_runs(group=r.group), key=lambda r: r.config.seed)
              for r in exp.recipes]
    _finish(app_env, groups[0][0], 0.9)
    _finish(app_env, groups[1][0], 0.7)
    at.run()
    body = texts(at)
    assert "run at least 2 seeds" not in body
    assert "once a second of the 2 seeds per recipe has finished" in body
    _finish(app_env, groups[0][1], 0, "cancelled")
    _finish(app_env, groups[1][1], 0, "cancelled")
    at.run()
    assert "re-run the missing ones" in texts(at)
    at.button(key=f"experiments.rerun.{exp.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(app_env.list_runs(statuses=("queued",))) == 2
    for recipe, acc in zip(exp.recipes, (0.92, 0.71)):
        [again] = app_env.list_runs(group=recipe.group, statuses=("queued",))
        assert again.config.seed == 1
        _finish(app_env, again, acc)
    at.run()
    assert any(s.value.startswith("Two-stage beat All at once by") for s in at.success)
    assert "2 of 2" in at.dataframe[0].value.to_string()


def test_a_data_root_with_train_and_test_is_listed_by_its_root(tmp_path, monkeypatch, tiny_folder):
    """Issue 11.2: a data root that is itself a train/ + test/ data set is offered once, by
    its root, never as its `test` half (which sorted first and was pre-selected)."""
    from core.engine.datasets import list_datasets

    assert [d.path for d in list_datasets([tiny_folder])] == [tiny_folder]
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tiny_folder))
    at = run_page(EXPERIMENTS)
    options = at.selectbox(key="experiments.data").options
    assert options[0] == f"colors  ({tiny_folder})"
    assert not any(o.startswith(("test ", "train ")) for o in options)


def test_experiments_carry_a_note_and_tags_edited_on_the_page_and_filter_the_picker(
        app_env, no_workers):
    """Issue 11 (notes and tags): on experiments too, kept in the record, filterable."""

    _queue_experiment(app_env)
    at = _queue_experiment(app_env)  # a second one: the newest is picked
    older, newer = sorted(ex.list_experiments(app_env), key=lambda e: e.created_at)
    assert at.selectbox(key="experiment").value == newer.id
    at.text_area(key=f"experiments.note.{newer.id}").input("does two-stage help here?")
    at.multiselect(key=f"experiments.tags.{newer.id}").select("colors").select("pilot")
    at.button(key=f"FormSubmitter:experiments.annotate.{newer.id}-Save note and tags").click().run()
    assert not at.exception, [e.value for e in at.exception]
    saved = ex.load_experiment(app_env, newer.id)
    assert saved.note == "does two-stage help here?" and saved.tags == ("colors", "pilot")
    # The other one has none (records from before notes and tags: tests/test_experiments.py).
    assert ex.load_experiment(app_env, older.id).tags == ()
    # The picker lists only the tagged one when the filter is set.
    at = run_page(EXPERIMENTS)
    at.selectbox(key="experiments.tag").set_value("pilot").run()
    assert at.selectbox(key="experiment").options == [
        f"{newer.name} — 2 recipes × 2 seeds ({newer.id})"]


# ---------------------------------------------------------------- issue 20


def test_an_offline_experiment_is_checked_before_queuing_and_failures_say_why(
        app_env, no_workers, tiny_folder):
    """Issue 20.1: with ImageNet weights left as the starting weights and none cached (the
    tests' TORCH_HOME is empty), the form says every run would download them and queues
    nothing until the user says the machine is online or picks other weights; a data folder
    that does not exist is New run's preflight error, before anything is queued. A failed
    run's reason shows under the table, where its result would be, and the re-run button
    is held by the same checks."""
    at = run_page(EXPERIMENTS)
    assert at.selectbox(key="experiments.weights").value == "imagenet"
    assert any("would download the ImageNet weights" in w.value for w in at.warning)
    assert at.button(key="experiments.submit").disabled
    at.checkbox(key="experiments.online").check().run()
    assert not at.button(key="experiments.submit").disabled  # the user's call: online
    at.checkbox(key="experiments.online").uncheck().run()
    at.selectbox(key="experiments.weights").set_value("random")
    at.selectbox(key="experiments.data").set_value("Another folder…").run()
    at.text_input(key="experiments.path").set_value(str(tiny_folder.parent / "gone")).run()
    assert at.button(key="experiments.submit").disabled
    assert any("does not exist" in e.value for e in at.error), [e.value for e in at.error]
    assert app_env.list_runs() == []

    at = _queue_experiment(app_env)  # random weights: nothing to download
    [exp] = ex.list_experiments(app_env)
    reason = "ImageNet weights for ResNet-18 are unavailable (download failed: no network)"
    for recipe in exp.recipes:
        for run in app_env.list_runs(group=recipe.group):
            app_env.claim_run_now(run.id, os.getpid())
            app_env.finish_run(run.id, "failed", error=reason)
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    # (names and the reason shown as text: markdown-escaped)
    where = "Two-stage seed 0, Two-stage seed 1, All at once seed 0, All at once seed 1"
    assert f"Failed ({md(where)}): {md(reason)}" in errors
    per_seed = list(at.dataframe[0].value["val acc per seed (%)"])
    assert per_seed == ["seed 0 failed, seed 1 failed"] * 2
    assert not at.button(key=f"experiments.rerun.{exp.id}").disabled  # random: no download
