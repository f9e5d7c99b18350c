"""core.analysis.inference: loading checkpoints safely, top-k predictions through THE preprocessing,
plain-language verdicts, run choice, before/after checkpoints, example gallery."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.analysis import inference
from core.analysis.inference import Prediction, Predictor
from core.config import RunConfig, StageConfig
from core.engine.checkpoints import Checkpoint, CheckpointError, atomic_torch_save, save_checkpoint
from core.engine.data import Preprocess
from core.engine.model import build_resnet18
from core.settings import RunFiles
from tests.conftest import make_image_folder, tiny_config

# Examples are shown only from data under the data roots: the tests' data is in temp folders.
pytestmark = pytest.mark.usefixtures("data_in_temp_roots")

torch.set_num_threads(1)
FIVE = ("red", "green", "blue", "cyan", "magenta")


def write_checkpoint(path: Path, classes=FIVE, resolution: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_resnet18(len(classes))
    save_checkpoint(path, Checkpoint.of_model(
        model, {"data_source": "folder"}, list(classes), Preprocess(resolution=resolution).to_dict(),
        stage=2, epoch=1, metrics={"val_acc": 0.5}))
    return path


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", resolution=40))


# ---------------------------------------------------------------- predictions


def test_predict_top5_sorted_named_and_probabilities(predictor):
    img = Image.new("RGB", (70, 50), (30, 200, 90))
    preds = predictor.predict(img, k=5)
    assert len(preds) == 5
    assert sorted(p.label for p in preds) == sorted(FIVE)
    probs = [p.probability for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # 5 of 5 classes
    assert all(FIVE[p.index] == p.label for p in preds)
    # Same numbers as the model's softmax on THE preprocessing's output.
    pre = Preprocess(resolution=40)
    with torch.no_grad():
        expected = torch.softmax(predictor.model(pre.normalize(pre.to_uint8(img)[None])), 1)[0]
    assert probs[0] == pytest.approx(float(expected.max()), abs=1e-6)


def test_k_is_capped_by_the_number_of_classes(tmp_path):
    p = Predictor.load(write_checkpoint(tmp_path / "three.pt", classes=("a", "b", "c")))
    preds = p.predict(Image.new("RGB", (32, 32)), k=5)
    assert len(preds) == 3 and sum(x.probability for x in preds) == pytest.approx(1.0, abs=1e-5)


def test_model_view_is_the_stored_preprocessing(predictor):
    img = Image.new("RGB", (120, 60), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 60))  # red strip at the far left is cropped away
    view = predictor.model_view(img)
    assert view.size == (40, 40) and view.mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(view)).permute(2, 0, 1),
                       Preprocess(resolution=40).to_uint8(img))
    assert view.getpixel((0, 20))[2] > 200  # centre crop: blue, not the red edge
    assert predictor.resolution == 40 and predictor.stage == 2


def test_explain_returns_an_input_sized_map(predictor):
    cam = predictor.explain(Image.new("RGB", (40, 40), (100, 100, 100)))
    assert cam.heatmap.shape == (40, 40)
    assert 0.0 <= cam.heatmap.min() and cam.heatmap.max() <= 1.0


def test_explanations_hook_the_shared_model_only_under_the_predictor_lock(predictor, monkeypatch):
    """Grad-CAM registers hooks on a model every session shares (st.cache_resource): two
    sessions explaining at once would read each other's activations. Both ways to explain
    must run while the predictor's lock is held."""
    from core.analysis import explain as explain_mod

    held: list[bool] = []

    def spying(real):
        def call(*args, **kwargs):
            held.append(predictor._lock.locked())
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(explain_mod, "grad_cam", spying(explain_mod.grad_cam))
    monkeypatch.setattr(explain_mod, "explain", spying(explain_mod.explain))
    img = Image.new("RGB", (40, 40), (100, 100, 100))
    predictor.explain(img)
    predictor.explanation(img)
    assert len(held) >= 2 and all(held)  # explain() may call grad_cam() inside
    assert not predictor._lock.locked()  # and released afterwards


# ---------------------------------------------------------------- words


def test_verdict_sure_and_not_sure():
    sure = [Prediction("cat", 0.91, 3), Prediction("dog", 0.05, 5)]
    assert inference.verdict(sure, threshold=0.6) == "Pretty sure this is a cat"
    unsure = [Prediction("airplane", 0.41, 0), Prediction("bird", 0.30, 2)]
    assert inference.verdict(unsure, threshold=0.6) == "Not sure — maybe an airplane or a bird"
    assert inference.verdict(unsure, threshold=0.4).startswith("Pretty sure this is an airplane")
    assert inference.verdict([Prediction("sports_car", 0.3, 0)]) == "Not sure — maybe a sports car"


def test_percent_never_rounds_a_possibility_to_zero():
    assert inference.percent(0.873) == "87 %"
    assert inference.percent(0.001) == "<1 %"
    assert inference.percent(0.0) == "0 %"


# ---------------------------------------------------------------- checkpoints that are not ours


def test_missing_file_and_garbage_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Predictor.load(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a Fine-Tuning Lab checkpoint"):
        Predictor.load(plain)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(str(tmp_path / "proof"))))  # plain pickle does run it
    assert (tmp_path / "proof").exists()
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "finetune-lab/checkpoint", "payload": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError):
        Predictor.load(evil)
    assert not marker.exists()  # weights_only=True refused to build the object


def test_other_architecture_is_a_clear_error(tmp_path):
    path = write_checkpoint(tmp_path / "ok.pt")
    obj = torch.load(path, weights_only=True)
    atomic_torch_save({**obj, "arch": "vgg16"}, tmp_path / "vgg.pt")
    with pytest.raises(CheckpointError, match="architecture 'vgg16'"):
        Predictor.load(tmp_path / "vgg.pt")
    # Says resnet18 but holds other tensors (e.g. a different network's state dict).
    atomic_torch_save({**obj, "state_dict": {"features.0.weight": torch.zeros(4, 3, 3, 3)}},
                      tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="do not fit ResNet-18"):
        Predictor.load(tmp_path / "wrong.pt")
    # Class list disagreeing with the head.
    atomic_torch_save({**obj, "classes": ["a", "b"]}, tmp_path / "head.pt")
    with pytest.raises(CheckpointError, match="2 classes"):
        Predictor.load(tmp_path / "head.pt")


# ---------------------------------------------------------------- which run


def _make_run(store, status: str, val_acc: float | None, with_checkpoint: bool = True, name: str = ""):
    run = store.create_run(RunConfig(stages=(StageConfig(), StageConfig())), name=name or status)
    if status != "queued":
        assert store.claim_run_now(run.id, os.getpid())
    if with_checkpoint:
        path = write_checkpoint(store.run_dir(run.id) / "best.pt")
        store.set_best(run.id, val_acc, 1, 1, str(path))
    if status in ("finished", "failed", "cancelled"):
        store.finish_run(run.id, status)
    return store.get_run(run.id)


def test_classifiable_runs_and_default_choice(store):
    finished_low = _make_run(store, "finished", 0.40, name="low")
    finished_high = _make_run(store, "finished", 0.80, name="high")
    cancelled = _make_run(store, "cancelled", 0.60, name="stopped")
    _make_run(store, "cancelled", None, with_checkpoint=False)
    _make_run(store, "failed", 0.95)
    _make_run(store, "running", 0.99)
    gone = _make_run(store, "finished", 0.99, name="file deleted")
    Path(gone.best_checkpoint).unlink()

    runs = inference.classifiable_runs(store)
    assert {r.id for r in runs} == {finished_low.id, finished_high.id, cancelled.id}
    assert inference.default_run(runs).id == finished_high.id
    assert inference.default_run(runs, selected_id=cancelled.id).id == cancelled.id
    assert inference.default_run(runs, selected_id="not-a-run").id == finished_high.id
    assert inference.default_run([]) is None


# ---------------------------------------------------------------- before and after


def test_stage_checkpoints(tmp_path):
    files = RunFiles(tmp_path, "r")
    one = inference.stage_checkpoints(files, n_stages=1)
    assert one.stage1 is None and "only one stage" in one.note
    write_checkpoint(tmp_path / "last.pt")
    early = inference.stage_checkpoints(files, n_stages=2)
    assert early.stage1 is None and "before stage 1 ended" in early.note
    assert early.final == tmp_path / "last.pt"
    write_checkpoint(tmp_path / "stage1.pt")
    both = inference.stage_checkpoints(files, n_stages=2)
    assert (both.stage1, both.final, both.note) == (tmp_path / "stage1.pt", tmp_path / "last.pt", None)
    write_checkpoint(tmp_path / "best.pt")  # the model every verdict uses: it, not last.pt
    assert inference.stage_checkpoints(files, n_stages=2).final == tmp_path / "best.pt"


def test_before_and_after_on_a_real_two_stage_run(finished_run):
    store, run = finished_run
    models = inference.stage_checkpoints(store.files(run.id), len(run.config.stages))
    assert models.note is None
    before, after = Predictor.load(models.stage1), Predictor.load(models.final)
    assert before.stage == 1 and after.stage == 2
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    # Stage 2 trained layer3 too: the two models must not be the same function.
    assert not torch.allclose(before.probabilities(img), after.probabilities(img))
    assert [p.label for p in after.predict(img)] != [] and after.classes == run.results.classes


# ---------------------------------------------------------------- gallery


def test_gallery_from_test_folder_is_stable(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=9, classes=FIVE)
    cfg = tiny_config(root)
    items, note = inference.gallery(cfg.data_source, cfg.data_path, list(FIVE), per_class=2)
    assert note is None
    assert len(items) == 10
    assert [i.true_label for i in items] == [c for c in FIVE for _ in range(2)]
    assert all(i.path.parent.parent == root / "test" for i in items)  # never training images
    assert items[0].open().mode == "RGB"
    again, _ = inference.gallery(cfg.data_source, cfg.data_path, list(FIVE), per_class=2)
    assert [i.path for i in again] == [i.path for i in items]
    # Only the model's classes.
    some, _ = inference.gallery(cfg.data_source, cfg.data_path, ["blue"], per_class=3)
    assert {i.true_label for i in some} == {"blue"} and len(some) == 3


def test_gallery_notes(tmp_path):
    flat = make_image_folder(tmp_path / "flat", per_class=3, split=False)
    items, note = inference.gallery("folder", str(flat), ["red"])
    assert len(items) == 2 and "may be pictures the model trained on" in note
    items, note = inference.gallery("folder", str(tmp_path / "gone"), ["red"])
    assert items == [] and "no longer there" in note
    items, note = inference.gallery("cifar10", str(tmp_path / "none"), ["cat"])
    assert items == [] and "CIFAR-10" in note


def test_gallery_item_that_went_bad_is_a_plain_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(inference.ImageRejected, match="can't be opened"):
        inference.GalleryItem("red", "red 1", path=bad).open()


def test_gallery_lists_a_class_folder_as_training_does(tmp_path):
    """One listing rule: images in a nested folder of a class (photos/2024/…) are examples
    too, as they are training images; other files and hidden files are not."""
    from core.engine.data import scan_folder

    root = make_image_folder(tmp_path / "data", per_class=3, classes=("red", "blue"))
    nested = root / "test" / "red" / "2024" / "june"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(nested / "deep.png")
    (root / "test" / "red" / "notes.txt").write_text("not a picture")
    (root / "test" / "red" / ".hidden.png").write_bytes(b"")
    items, _ = inference.gallery("folder", str(root), ["red"], per_class=50)
    listed = sorted(i.path for i in items)
    names, trained_on, _ = scan_folder(root / "test")
    assert listed == sorted(trained_on[names.index("red")])
    assert nested / "deep.png" in listed and len(listed) == 3


def test_default_model_prefers_a_real_validation_set_then_the_last_data_set_then_test_accuracy(store):
    """Issue 11.1: a 3-class toy run scored on 6 validation images (67 %) must not beat the
    10-class model scored on 5,000; among real ones, the data set the user last worked on
    wins, then test accuracy."""
    from core.runs.store import RunResults, SplitSizes

    def scored(name, val_acc, test_acc, n_val, n_classes, data_path):
        run = store.create_run(RunConfig(data_source="folder", data_path=data_path,
                                         stages=(StageConfig(),)), name=name)
        assert store.claim_run_now(run.id, os.getpid())
        path = write_checkpoint(store.run_dir(run.id) / "best.pt")
        store.set_best(run.id, val_acc, 1, 1, str(path))
        store.set_results(run.id, RunResults(classes=[f"c{i}" for i in range(n_classes)],
                                             sizes=SplitSizes(train=100, val=n_val, test=100)),
                          test_acc=test_acc)
        store.finish_run(run.id, "finished")
        return store.get_run(run.id)

    big = scored("cifar", 0.55, 0.54, 5000, 10, "/data/cifar")
    other = scored("other data", 0.60, 0.70, 500, 5, "/data/flowers")
    toy = scored("toy", 0.667, 0.9, 6, 3, "/data/toy")
    runs = inference.classifiable_runs(store)
    assert inference.default_run(runs).id == other.id  # best test accuracy among real ones
    assert inference.default_run(runs, preferred_data=("folder", "/data/cifar")).id == big.id
    assert inference.rank_models(runs)[-1].id == toy.id
    assert not inference.has_real_validation(toy) and inference.has_real_validation(big)
