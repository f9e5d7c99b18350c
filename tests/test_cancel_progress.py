"""Cancel is honoured in every phase (decoding, training between batches, validating,
testing), and every phase reports what it is doing without a false time-left promise."""

from __future__ import annotations

import os

import pytest

from core.runs import recorder as recorder_mod
from core.runs.entities import RunProgress
from core.runs.worker import execute_run
from core.views import tables
from tests.conftest import tiny_config

ORDER = ["loading data", "training", "validating", "saving checkpoint", "testing"]


def cancel_during(store, folder, phase: str) -> tuple[str, list[RunProgress]]:
    """Run in this process and request a cancel (through the store, as the page does) the
    first time the worker reports `phase`. Returns the final status and the reports."""
    run = store.create_run(tiny_config(folder))
    assert store.claim_run_now(run.id, os.getpid())
    seen: list[RunProgress] = []

    def on_progress(p: RunProgress) -> None:
        seen.append(p)
        if p.phase == phase and not store.get_run(run.id).cancel_requested:
            store.request_cancel(run.id)

    return execute_run(store, run.id, on_progress=on_progress), seen


@pytest.mark.parametrize("phase", ["loading data", "training", "validating", "testing"])
def test_cancel_is_honoured_in_the_phase_it_was_requested_in(store, tiny_folder, phase,
                                                             monkeypatch):
    monkeypatch.setattr(recorder_mod, "CANCEL_POLL_S", 0.0)  # every check asks the store
    status, seen = cancel_during(store, tiny_folder, phase)
    assert status == "cancelled"
    first = next(i for i, p in enumerate(seen) if p.phase == phase)
    later = {p.phase for p in seen[first:]}
    # Nothing after the cancelled phase started (a training run's next phases never come).
    assert later <= {phase}, (phase, later)
    if phase == "loading data":
        assert store.list_runs()[0].results.sizes is None  # data never finished loading


def test_every_phase_says_what_it_does_and_promises_no_eta_outside_training():
    def text(**progress):
        from tests.test_charts import make_run

        return tables.progress_text(make_run(status="running", progress=RunProgress(**progress)))

    validating = text(phase="validating", stage=1, stages=2, epoch=1, epochs=2,
                      message="Validating: 512/1,000 images", data_fraction=0.512)
    assert "Validating: 512/1,000 images" in validating and "time left" not in validating
    testing = text(phase="testing", message="Testing the best checkpoint: 0/40 images")
    assert "Testing the best checkpoint" in testing and "time left" not in testing
    saving = text(phase="saving checkpoint", stage=1, stages=2, epoch=2, epochs=2,
                  message="Saving last.pt (last)")
    assert "Saving last.pt" in saving and "time left" not in saving
    first = text(phase="training", stage=1, stages=1, epoch=1, epochs=1, step=1, steps_per_epoch=4)
    assert "time left known after the first epoch" in first


def test_a_run_reports_each_phase_with_its_own_progress(store, tiny_folder):
    run = store.create_run(tiny_config(tiny_folder))
    assert store.claim_run_now(run.id, os.getpid())
    seen: list[RunProgress] = []
    assert execute_run(store, run.id, on_progress=seen.append) == "finished"
    phases = [p.phase for p in seen]
    assert set(ORDER) <= set(phases), phases
    for p in seen:
        if p.phase in ("validating", "testing"):
            assert p.data_fraction is not None and p.message, p
        if p.phase == "saving checkpoint":
            assert p.message.startswith("Saving ") and 0 < p.fraction <= 1, p


def test_a_worker_keeps_its_launchers_cpu_priority(tiny_folder):
    """Not niced: at nice 10 one ordinary busy process made training 17x slower (the
    worker's comment has the figures)."""
    import subprocess
    import sys

    code = ("import os; from core.runs.worker import prepare_process; "
            "from tests.conftest import tiny_config; from pathlib import Path; "
            f"prepare_process(tiny_config(Path({str(tiny_folder)!r}))); print(os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout.split()[-1]) == os.nice(0)


def test_only_the_images_a_run_uses_are_decoded(tmp_path):
    """A cap decodes the capped training images and the test part, not the whole folder."""
    import re

    from core.engine.data import Preprocess, load_splits
    from tests.conftest import make_image_folder

    for split in (True, False):
        folder = make_image_folder(tmp_path / f"split-{split}", per_class=30, split=split)
        messages: list[str] = []
        splits = load_splits("folder", str(folder), Preprocess(32), max_train_images=12, seed=0,
                             test_fraction=0.2, on_progress=lambda m, f: messages.append(m))
        decoded = sum(int(re.search(r"/(\d+)$", m).group(1)) for m in messages
                      if m.startswith("Decoding") and re.search(r": (\d+)/\1$", m))
        assert len(splits.train) + len(splits.val) <= 13
        assert decoded == len(splits.train) + len(splits.val) + len(splits.test), (split, messages[-3:])
        assert decoded < (90 + 30 if split else 90)


def test_an_epoch_estimate_says_how_sure_it_is(tmp_path):
    from core import config as cfgmod
    from core.analysis.speed import epoch_estimate, model_epoch_seconds
    from core.runs.store import RunStore

    store = RunStore(tmp_path / "runs")
    rough = epoch_estimate(("layer4", "fc"), 5000, 32, store=store)
    assert rough.basis == "model" and "rough: no runs on this machine yet" in rough.describe()
    assert rough.seconds == model_epoch_seconds(("layer4", "fc"), 5000, 32)
    # One run of another recipe, timed at 1/20 of the cost model's speed: the estimate for
    # this recipe is scaled by the same factor.
    cfg = cfgmod.preset_config("All at once", epochs=1)
    run = store.create_run(cfg)
    model_ips = 1 / model_epoch_seconds(cfg.stages[0].groups, 1, cfg.resolution)
    store.log_metrics(run.id, [(1, 1.0, 10, "images_per_s", model_ips / 20)])
    scaled = epoch_estimate(("layer4", "fc"), 5000, 32, store=store)
    assert scaled.basis == "scaled" and "scaled" in scaled.describe()
    assert abs(scaled.seconds - 20 * rough.seconds) < 1e-6 * scaled.seconds
