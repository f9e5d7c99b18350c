"""A whole run above 32 px, and everything that reads its model after: the form offers 32 to
224 px, but every other test trains at 32, where layer4's map is 1x1. At 64 px it is 2x2, and
validation failed there (fc fed the flattened map without pooling) until it was found by
the GPU benchmark at 224 px. Tiny data, random weights, CPU."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from PIL import Image

from core.analysis import export, insights
from core.analysis.inference import Predictor
from core.runs.store import RunStore
from core.runs.worker import execute_run
from tests.conftest import tiny_config

# (images are shown only from data under the data roots: the tests' data is in temp folders)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("data_in_temp_roots")]


@pytest.fixture(scope="module", params=[(64, False), (64, True)],
                ids=["64px", "64px-feature-cache"])
def run_above_32(request, tmp_path_factory, tiny_folder):
    """(store, run): a two-stage run trained to the end at 64 px, with and without the
    frozen-feature cache (which trains stage 1's suffix on the prefix's cached outputs)."""
    resolution, cache = request.param
    store = RunStore(tmp_path_factory.mktemp(f"res{resolution}") / "runs")
    cfg = tiny_config(tiny_folder)
    stage1 = replace(cfg.stages[0], feature_cache=cache)
    cfg = replace(cfg, resolution=resolution, stages=(stage1, *cfg.stages[1:]))
    run = store.create_run(cfg, name=f"{resolution} px")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished", store.get_run(run.id).error
    return store, store.get_run(run.id)


def test_a_run_above_32_px_trains_validates_and_tests(run_above_32):
    store, run = run_above_32
    assert {m.stage for m in store.metrics(run.id, keys=["val/acc"])} == {1, 2}
    assert run.test_acc is not None and run.best_checkpoint


def test_its_model_classifies_explains_and_ranks_mistakes(run_above_32, tiny_folder):
    store, run = run_above_32
    predictor = Predictor.load(run.best_checkpoint)
    assert predictor.resolution == 64
    picture = Image.open(next((tiny_folder / "train").rglob("*.png"))).convert("RGB")
    top = predictor.predict(picture, 3)
    assert len(top) == 3 and all(0 <= p.probability <= 1 for p in top)
    assert sum(p.probability for p in top) == pytest.approx(1.0, abs=1e-4)  # 3 classes
    shown = predictor.explanation(picture, top[0].index)
    if shown.available:  # layer4's grid at 64 px is 2x2: occlusion, or a plain "none"
        assert shown.heatmap.shape == (64, 64)
    else:
        assert shown.method == "none" and shown.meaning
    for mistake in insights.top_losses(store, run, k=3):
        assert mistake.image.shape == (64, 64, 3) and 0 <= mistake.confidence <= 1


def test_its_model_exports_and_the_export_agrees(run_above_32):
    store, run = run_above_32
    onnx, _ = export.onnx_available()
    result = export.export_run(store, run, include_onnx=onnx)
    assert result.zip_path.is_file() and result.onnx == onnx
    assert result.checked_images > 0  # exported and checkpoint top-1 agree on real inputs
