"""Export of the best model: TorchScript and ONNX give the checkpoint's top-1 on the run's
test images; README, classes, metrics CSV and zip are written."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
import torch

from core.analysis import export
from core.config import RunConfig
from core.engine.checkpoints import read_checkpoint
from core.engine.data import Preprocess, load_splits

# torch.jit.load is deprecated in favour of torch.export, but TorchScript is the format
# the export promises plain-PyTorch users.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def exported(finished_run):
    store, run = finished_run
    torch.set_num_threads(1)
    return store, run, export.export_run(store, run)


def _test_images(run):
    cfg = run.config
    ckpt = read_checkpoint(run.best_checkpoint)
    pre = Preprocess.from_dict(ckpt.preprocess)
    splits = load_splits("folder", cfg.data_path, pre, val_fraction=cfg.val_fraction,
                         seed=cfg.seed)
    return ckpt, pre, splits.test.images


def test_torchscript_gives_checkpoint_top1_on_test_images(exported):
    store, run, result = exported
    ckpt, pre, images = _test_images(run)
    x = pre.normalize(images)
    with torch.inference_mode():
        expected = ckpt.build_model()(x).argmax(1)
        scripted = torch.jit.load(str(result.folder / export.TORCHSCRIPT_NAME)).eval()
        assert torch.equal(scripted(x).argmax(1), expected)


def test_onnx_gives_checkpoint_top1_on_test_images(exported):
    ort = pytest.importorskip("onnxruntime")
    store, run, result = exported
    assert result.onnx, result.notes
    ckpt, pre, images = _test_images(run)
    x = pre.normalize(images)
    with torch.inference_mode():
        expected = ckpt.build_model()(x)
    sess = ort.InferenceSession(str(result.folder / export.ONNX_NAME), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    assert export.predictions_agree(expected, torch.from_numpy(got))
    assert (torch.from_numpy(got).argmax(1) == expected.argmax(1)).all()


def test_export_folder_readme_metrics_and_zip(exported):
    store, run, result = exported
    names = set(result.files)
    assert {export.TORCHSCRIPT_NAME, "README.md", "metrics.csv", "classes.json",
            "preprocess.json", "config.json"} <= names
    assert json.loads((result.folder / "classes.json").read_text()) == run.results.classes
    readme = (result.folder / "README.md").read_text()
    assert "torch.jit.load" in readme and "N x 3 x 32 x 32" in readme
    assert "[0.485, 0.456, 0.406]" in readme and "onnxruntime" in readme
    rows = list(csv.DictReader(io.StringIO((result.folder / "metrics.csv").read_text())))
    assert len(rows) == len(store.metrics(run.id))
    assert {"val/acc", "train/loss", "test/acc"} <= {r["key"] for r in rows}
    with zipfile.ZipFile(result.zip_path) as z:
        assert sorted(n.split("/", 1)[1] for n in z.namelist()) == sorted(result.files)
    assert not [p for p in result.folder.parent.iterdir() if p.name.startswith(".export")]


def test_export_without_checkpoint_fails_plainly(store):
    run = store.create_run(RunConfig(stages=()), name="empty")
    with pytest.raises(export.ExportError, match="no best checkpoint"):
        export.export_run(store, run)


def test_predictions_agree_tolerates_rounding_not_changes():
    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert export.predictions_agree(a, a + 1e-5)
    assert not export.predictions_agree(a, torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 1.0]]))
    assert not export.predictions_agree(a, a[:, :2])


def test_export_csv_is_the_runs_page_csv(exported):
    from core.views.tables import metrics_csv

    store, run, result = exported
    assert (result.folder / "metrics.csv").read_bytes() == metrics_csv(store.metrics(run.id))


def test_a_failing_onnx_exporter_becomes_a_note(finished_run, monkeypatch):
    store, run = finished_run

    def broken(model, example, path):
        raise RuntimeError("onnxscript: unsupported op aten::foo\nlong traceback text…")

    monkeypatch.setattr(export, "onnx_available", lambda: (True, ""))
    monkeypatch.setattr(export, "_export_onnx", broken)
    result = export.export_run(store, run)
    assert not result.onnx
    assert export.ONNX_NAME not in result.files
    assert export.TORCHSCRIPT_NAME in result.files
    assert len(result.notes) == 1
    note = result.notes[0]
    assert "ONNX" in note and "RuntimeError: onnxscript: unsupported op aten::foo" in note
    assert "Traceback" not in note and "\n" not in note
    assert "No ONNX file: The ONNX file was left out" in (result.folder / "README.md").read_text()


# ---------------------------------------------------------------- the job


def _ended(store, run_id):
    from core.runs import jobs

    jobs.reconcile(store)
    return store.get_run(run_id).status in ("finished", "failed", "cancelled")


def test_export_runs_as_a_job_in_a_worker_process(finished_run):
    import os

    from core.runs import jobs
    from tests.conftest import wait_for

    store, run = finished_run
    job = export.submit(store, run, include_onnx=False)
    assert job.kind == "export" and export.request_of(store, job.id) == export.ExportRequest(run.id, False)
    wait_for(lambda: _ended(store, job.id), 300, "the export job to end")
    done = store.get_run(job.id)
    assert done.status == "finished", (done.error, jobs.log_tail(store, job.id))
    assert done.pid != os.getpid()  # a worker process ran it, not this one
    outcome = export.outcome_of(store, job.id)
    assert outcome.zip_path == str(store.files(run.id).export_zip) and not outcome.onnx
    assert export.TORCHSCRIPT_NAME in outcome.files and outcome.checked_images == 8
    with zipfile.ZipFile(outcome.zip_path) as z:
        assert f"{run.id}/{export.TORCHSCRIPT_NAME}" in z.namelist()
    assert export.latest_job(store, run.id).id == job.id
    assert done.progress.phase == "exporting"


def test_an_export_job_cancelled_mid_way_leaves_no_files(finished_run, no_workers):
    """Cancel is honoured between the export's steps; its build folder goes with it."""
    import os

    from core.runs import supervisor
    from core.runs.worker import execute_run
    from tests.conftest import wait_for

    store, run = finished_run
    # The store is shared with the export job above: its queue supervisor must be gone, or
    # it would hand this queued job to a worker of its own.
    wait_for(lambda: not supervisor.is_running(store), 120, "the supervisor to exit")
    job = export.submit(store, run)
    assert store.get_run(job.id).status == "queued"  # no worker: this process runs it
    assert store.claim_run_now(job.id, os.getpid())
    steps = []

    def on_progress(p):
        steps.append(p.message)
        if p.message.startswith("Writing and checking the TorchScript"):
            store.request_cancel(job.id)

    assert execute_run(store, job.id, on_progress=on_progress) == "cancelled"
    assert not any(m.startswith("Writing the zip") for m in steps)
    assert export.outcome_of(store, job.id) is None
    assert not list(store.files(run.id).folder.glob(store.files(run.id).EXPORT_BUILD_PREFIX + "*"))


def test_export_of_a_run_without_a_checkpoint_is_refused_before_queuing(store, tiny_folder):
    from tests.conftest import tiny_config

    run = store.create_run(tiny_config(tiny_folder))
    with pytest.raises(export.ExportError, match="no best checkpoint"):
        export.submit(store, run)
    assert [r.id for r in store.list_runs()] == [run.id]


def test_insights_page_exports_as_a_job_with_cancel_then_offers_the_zip(
        app_env, no_workers, tiny_folder):
    import os

    from core.runs.worker import execute_run
    from tests.conftest import tiny_config
    from tests.test_app_pages import open_page

    run = app_env.create_run(tiny_config(tiny_folder), name="to export")
    assert app_env.claim_run_now(run.id, os.getpid())
    assert execute_run(app_env, run.id) == "finished"
    at = open_page("app_pages/insights.py")
    assert at.selectbox(key="insights.run").value == run.id
    key = f"insights.export.{run.id}"
    at.button(key=key).click().run()
    assert not at.exception and not at.warning, [e.value for e in (*at.exception, *at.warning)]
    job = export.latest_job(app_env, run.id)
    assert job.status == "queued" and at.button(key=key).disabled
    assert "Waiting in the queue" in at.get("progress")[0].proto.text
    # Tools' records stay out of the run picker.
    assert at.selectbox(key="insights.run").options == [at.selectbox(key="insights.run").format_func(run.id)]
    at.button(key=f"{key}.cancel").click().run()
    assert app_env.get_run(job.id).status == "cancelled"
    at.run()
    assert any("cancelled" in w.value for w in at.warning)
    # Again, and this time its worker (here, this process) finishes it.
    at.button(key=key).click().run()
    job = export.latest_job(app_env, run.id)
    assert app_env.claim_run_now(job.id, os.getpid())
    assert execute_run(app_env, job.id) == "finished", app_env.get_run(job.id).error
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [download] = at.get("download_button")
    assert download.proto.label == "Download the export (zip)"
