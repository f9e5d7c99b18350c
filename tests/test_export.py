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
