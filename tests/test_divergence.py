"""A loss that goes NaN or infinite ends the run with a plain message (never a database
error from writing NaN), keeping the best checkpoint of the sound epochs before; a weights
file holding non-finite values is refused at submit."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from core import config as cfgmod
from core.engine.checkpoints import read_checkpoint
from core.engine.model import build_resnet18
from core.runs.preflight import PreflightError, preflight
from core.runs.worker import execute_run
from tests.conftest import tiny_config

# All groups at LR 10 with weight decay 1.0 and no schedule: the weights blow up within the
# first epoch on any data (the attack run's recipe).
EXPLODING = cfgmod.StageConfig(groups=cfgmod.LAYER_GROUPS, epochs=2, lr=10.0, weight_decay=1.0,
                               schedule="constant")


def test_a_diverging_stage_fails_the_run_plainly_and_keeps_the_best_checkpoint(store, tiny_folder):
    sound = cfgmod.StageConfig(groups=("fc",), epochs=1, lr=0.01)
    cfg = replace(tiny_config(tiny_folder), stages=(sound, EXPLODING))
    run = store.create_run(cfg, name="diverges")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "failed"
    done = store.get_run(run.id)
    assert done.error.startswith("training diverged at stage 2, epoch 1 (")
    assert done.error.endswith("): lower the learning rate")
    assert "NaN" in done.error or "inf" in done.error
    assert "IntegrityError" not in done.error and "SQL" not in done.error
    best = read_checkpoint(store.files(run.id).best)
    assert (best.stage, best.epoch) == (1, 1)  # the sound stage's, not a NaN one
    assert all(torch.isfinite(v).all() for v in best.state_dict.values() if v.is_floating_point())
    assert all(math.isfinite(m.value) for m in store.metrics(run.id))
    assert {m.stage for m in store.metrics(run.id, keys=("val/loss",))} == {1}


def test_a_run_diverging_in_its_first_epoch_says_so(store, tiny_folder):
    cfg = replace(tiny_config(tiny_folder), stages=(EXPLODING,))
    run = store.create_run(cfg, name="diverges at once")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "failed"
    assert store.get_run(run.id).error.startswith("training diverged at stage 1, epoch 1 (")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weights_file_with_non_finite_values_is_refused_at_submit(tmp_path, tiny_folder, bad):
    state = build_resnet18(10).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(PreflightError) as refused:
        preflight(tiny_config(tiny_folder, weights="file", weights_path=str(path)))
    message = "; ".join(refused.value.errors)
    assert "non-finite values" in message and "conv1.weight" in message, message
