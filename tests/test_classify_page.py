"""The Classify page in AppTest: empty store, a real finished run, five classes for a test
image, uploads good and bad (the page stays usable), camera, run choice, broken checkpoint,
one-stage runs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import config as cfgmod
from core.analysis.inference import MAX_UPLOAD_BYTES
from core.engine.checkpoints import Checkpoint, save_checkpoint
from core.engine.data import Preprocess
from core.engine.model import build_resnet18
from core.runs.store import RunStore
from tests.conftest import make_image_folder, tiny_config

# Examples are shown only from data under the data roots: the tests' data is in temp folders.
pytestmark = pytest.mark.usefixtures("data_in_temp_roots")

torch.set_num_threads(1)
PAGE = str(Path(__file__).resolve().parent.parent / "app_pages" / "classify.py")
FIVE = ("red", "green", "blue", "cyan", "magenta")
TIMEOUT_S = 120  # first run imports torch and loads a model on a busy 2-core machine


def png_bytes(colour=(200, 40, 40), size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def add_model_run(store: RunStore, config: cfgmod.RunConfig, name: str, val_acc: float,
                  seed: int = 0):
    """A finished run with random-weight checkpoints (best, last and, for multi-stage runs,
    stage1): what the worker leaves behind, without spending time training."""
    run = store.create_run(config, name=name)
    assert store.claim_run_now(run.id, os.getpid())
    files = store.files(run.id)
    pre = Preprocess(resolution=config.resolution).to_dict()
    n_stages = len(config.stages)
    for path, stage in ((files.best, n_stages), (files.last, n_stages), (files.stage_end(1), 1)):
        if path == files.stage_end(1) and n_stages < 2:
            continue
        torch.manual_seed(seed + stage)
        save_checkpoint(path, Checkpoint.of_model(build_resnet18(len(FIVE)), cfgmod.to_dict(config),
                                                  list(FIVE), pre, stage, 1, {"val_acc": val_acc}))
    store.set_best(run.id, val_acc, n_stages, 1, files.best)
    store.finish_run(run.id, "finished")
    return store.get_run(run.id)


@pytest.fixture(scope="module")
def five_class_store(tmp_path_factory):
    """(store root, {name: run}) with a two-stage and a one-stage run on 5 colour classes."""
    root = tmp_path_factory.mktemp("classify")
    data = make_image_folder(root / "colors5", per_class=6, classes=FIVE)
    store = RunStore(root / "runs")
    two = tiny_config(data, classes=FIVE)
    one = cfgmod.preset_config("Head only", data_source="folder", data_path=str(data),
                               weights="random", classes=FIVE, device="cpu")
    runs = {
        "two-stage": add_model_run(store, two, "two-stage", 0.80),
        "one-stage": add_model_run(store, one, "one-stage", 0.60, seed=10),
    }
    return store.root, runs


def app(monkeypatch, store_root, session: dict | None = None) -> AppTest:
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(store_root))
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT_S)
    for k, v in (session or {}).items():
        at.session_state[k] = v
    return at.run()


def texts(at: AppTest) -> str:
    parts = [e.value for kind in (at.header, at.markdown, at.caption, at.error, at.info) for e in kind]
    return "\n".join(str(p) for p in parts)


def chart_classes(at: AppTest) -> list[str]:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)["data"][0]["y"]


def best_guess(at: AppTest) -> str:
    line = next(m.value for m in at.markdown if m.value.startswith("Best guess: **"))
    return line.split("**")[1]


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ---------------------------------------------------------------- rendering


def test_empty_store_points_to_new_run(monkeypatch, tmp_path):
    at = app(monkeypatch, tmp_path / "empty")
    assert_ok(at)
    assert at.info[0].value == "No trained model yet — start a run on New run"
    assert not at.get("file_uploader")


def test_real_finished_run_classifies_an_example(monkeypatch, finished_run):
    store, run = finished_run
    at = app(monkeypatch, store.root)
    assert_ok(at)
    assert at.selectbox(key="classify.run").value == run.id
    at.radio(key="classify.source").set_value("Pick an example").run()
    assert_ok(at)
    assert best_guess(at) in run.results.classes
    assert at.header[0].value.startswith(("Pretty sure this is", "Not sure"))
    assert "This example really is:" in texts(at)
    assert len(chart_classes(at)) == 3  # three classes: top-5 shows all three


def test_five_classes_for_a_test_image(monkeypatch, five_class_store):
    root, runs = five_class_store
    at = app(monkeypatch, root)
    assert at.selectbox(key="classify.run").value == runs["two-stage"].id  # best val acc
    at.radio(key="classify.source").set_value("Pick an example").run()
    assert_ok(at)
    assert sorted(chart_classes(at)) == sorted(FIVE)
    table = at.dataframe[0].value
    assert sorted(table["class"]) == sorted(FIVE) and table["probability"].is_monotonic_decreasing
    assert best_guess(at) == table["class"].iloc[0]
    # Before and after: both models answered.
    assert {"**After stage 1**", "**The model above (stage 2, epoch 1: the best)**"} <= {
        m.value for m in at.markdown}
    # Another example: the page follows the click.
    at.button(key="classify.try.5").click().run()
    assert_ok(at)
    assert "This example really is: blue — the model got it" in texts(at)


def test_upload_png_shows_top_class_as_text(monkeypatch, five_class_store):
    root, _ = five_class_store
    at = app(monkeypatch, root)
    at.file_uploader(key="classify.upload").set_value(("mine.png", png_bytes(), "image/png")).run()
    assert_ok(at)
    assert best_guess(at) in FIVE
    assert at.header[0].value.startswith(("Pretty sure this is", "Not sure"))
    assert not at.error


def test_camera_photo(monkeypatch, five_class_store):
    root, _ = five_class_store
    at = app(monkeypatch, root)
    at.radio(key="classify.source").set_value("Take a photo").run()
    at.camera_input(key="classify.camera").set_value(
        ("shot.jpg", png_bytes(size=(64, 48), fmt="JPEG"), "image/jpeg")).run()
    assert_ok(at)
    assert best_guess(at) in FIVE


BAD_UPLOADS = {
    "empty.jpg": (b"", "is empty"),
    "notes.jpg": (b"just some text, not a picture\n" * 10, "isn't a picture"),
    "cut.jpg": (png_bytes(size=(64, 64), fmt="JPEG")[:300], "damaged or incomplete"),
    "huge.png": (png_bytes() + b"\0" * MAX_UPLOAD_BYTES, "too big"),
}


def test_bad_uploads_give_a_message_and_the_page_stays_usable(monkeypatch, five_class_store):
    root, _ = five_class_store
    at = app(monkeypatch, root)
    uploader = at.file_uploader(key="classify.upload")
    for name, (data, message) in BAD_UPLOADS.items():
        uploader.set_value((name, data, "application/octet-stream")).run()
        assert_ok(at)
        assert len(at.error) == 1 and message in at.error[0].value, (name, texts(at))
        assert not at.header  # no verdict for a file we could not read
        uploader = at.file_uploader(key="classify.upload")  # still there
    uploader.set_value(("fine.png", png_bytes(), "image/png")).run()
    assert_ok(at)
    assert not at.error and best_guess(at) in FIVE


# ---------------------------------------------------------------- choices and failures


def test_selected_run_is_honoured_and_one_stage_says_so(monkeypatch, five_class_store):
    root, runs = five_class_store
    at = app(monkeypatch, root, {"selected_run_id": runs["one-stage"].id})
    assert at.selectbox(key="classify.run").value == runs["one-stage"].id
    at.radio(key="classify.source").set_value("Pick an example").run()
    assert_ok(at)
    assert "only one stage" in texts(at)
    # Unknown ids fall back to the best run.
    other = app(monkeypatch, root, {"selected_run_id": "no-such-run"})
    assert other.selectbox(key="classify.run").value == runs["two-stage"].id


def test_threshold_changes_the_verdict(monkeypatch, five_class_store):
    root, _ = five_class_store
    at = app(monkeypatch, root)
    at.radio(key="classify.source").set_value("Pick an example").run()
    at.slider(key="classify.threshold").set_value(95).run()
    assert at.header[0].value.startswith("Not sure")  # random weights are never 95 % sure
    at.slider(key="classify.threshold").set_value(10).run()
    assert at.header[0].value.startswith("Pretty sure this is")  # top of 5 is >= 20 %


def test_broken_checkpoint_is_a_clear_error_and_other_runs_still_work(monkeypatch, tmp_path,
                                                                      five_class_store):
    _, runs = five_class_store
    store = RunStore(tmp_path / "runs")
    good = add_model_run(store, runs["two-stage"].config, "good", 0.50)
    broken = add_model_run(store, runs["two-stage"].config, "broken", 0.90)
    Path(broken.best_checkpoint).write_bytes(b"definitely not a checkpoint")
    at = app(monkeypatch, store.root)
    assert_ok(at)
    assert at.selectbox(key="classify.run").value == broken.id
    assert "This model can't be used" in at.error[0].value
    at.selectbox(key="classify.run").set_value(good.id).run()
    at.radio(key="classify.source").set_value("Pick an example").run()
    assert_ok(at)
    assert not at.error and best_guess(at) in FIVE
    assert at.session_state["selected_run_id"] == good.id  # shared with other pages


def test_the_page_names_the_models_classes_and_the_checkpoint_behind_the_verdict(
        monkeypatch, five_class_store):
    """Issue 11.1: the classes the model knows and the checkpoint that answers are on the
    page itself (not under Details), before any picture is chosen."""
    root, runs = five_class_store
    at = app(monkeypatch, root)
    assert_ok(at)
    shown = texts(at)
    assert "This model knows **5 classes**" in shown
    assert all(c in shown.split("This model knows")[1] for c in FIVE)
    assert "`best.pt`" in shown and runs["two-stage"].id[-6:] in shown


def test_one_figure_per_concept_and_one_model_behind_both_panels(monkeypatch, tmp_path):
    """Issue 20.5: the model picker names the run's test accuracy, as Runs does (it said
    "64 % right on held-out pictures": validation, beside a test figure of 69 %); and
    "Before and after"'s right panel is the verdict's own model (best.pt, its
    preprocessing), so for one photo it gives the same figures as the headline, even when
    the last epoch's weights (last.pt) differ from the best."""
    data = make_image_folder(tmp_path / "colors5", per_class=4, classes=FIVE)
    store = RunStore(tmp_path / "runs")
    run = add_model_run(store, tiny_config(data, classes=FIVE), "two-stage", 0.64)
    store.set_results(run.id, store.get_run(run.id).results, test_acc=0.69)
    torch.manual_seed(99)  # the last epoch's weights: not the best ones
    save_checkpoint(store.files(run.id).last,
                    Checkpoint.of_model(build_resnet18(len(FIVE)), cfgmod.to_dict(run.config),
                                        list(FIVE), Preprocess(resolution=32).to_dict(), 2, 1,
                                        {"val_acc": 0.5}))
    at = app(monkeypatch, store.root)
    assert_ok(at)
    label = at.selectbox(key="classify.run").options[0]
    assert "test accuracy 69.0 %" in label and "64.0 %" not in label
    at.file_uploader(key="classify.upload").set_value(("mine.png", png_bytes(), "image/png")).run()
    assert_ok(at)
    line = next(m.value for m in at.markdown if m.value.startswith("Best guess: **"))
    top, sure = line.split("**")[1], line.split("(")[1].removesuffix(" sure)")
    panels = [c.value for c in at.caption if " · " in c.value and "%" in c.value]
    assert len(panels) == 2, panels  # after stage 1, and the model above
    assert panels[1].split(" · ")[0] == f"{top} {sure}", (line, panels)
