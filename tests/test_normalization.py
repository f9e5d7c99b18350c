"""Normalisation comes from the starting weights (issue 11.12): a backbone trained with
other statistics is fed its own mean and std; ImageNet and random weights keep ImageNet's."""

import os

import torch

from core.engine.checkpoints import Checkpoint, read_checkpoint, save_checkpoint
from core.engine.data import IMAGENET_MEAN, IMAGENET_STD
from core.engine.model import Normalization, build_model, build_resnet18
from tests.conftest import tiny_config

torch.set_num_threads(1)
OWN_MEAN, OWN_STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.15)


def _donor_checkpoint(path, classes=("blue", "green", "red")):
    torch.manual_seed(0)
    save_checkpoint(path, Checkpoint.of_model(
        build_resnet18(len(classes)), {"data_source": "folder"}, list(classes),
        {"resolution": 32, "mean": list(OWN_MEAN), "std": list(OWN_STD)}, 1, 1, {}))
    return path


def test_weights_carry_their_own_statistics(tmp_path):
    ckpt = _donor_checkpoint(tmp_path / "donor.pt")
    by_run = build_model(3, "run", run_checkpoint=ckpt)
    assert (by_run.normalization.mean, by_run.normalization.std) == (OWN_MEAN, OWN_STD)
    assert "normalised with" in by_run.description
    # A plain weights file that says which statistics it was trained with.
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": build_resnet18(3).state_dict(), "mean": list(OWN_MEAN),
                "std": list(OWN_STD)}, plain)
    by_file = build_model(3, "file", str(plain))
    assert (by_file.normalization.mean, by_file.normalization.std) == (OWN_MEAN, OWN_STD)
    # A file that says nothing, and random weights, keep ImageNet's.
    silent = tmp_path / "silent.pth"
    torch.save(build_resnet18(3).state_dict(), silent)
    assert build_model(3, "file", str(silent)).normalization == Normalization()
    assert build_model(3, "random").normalization == Normalization()
    assert (Normalization().mean, Normalization().std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_run_from_another_runs_checkpoint_trains_with_its_statistics(store, tiny_folder):
    from core.runs.worker import execute_run

    donor = store.create_run(tiny_config(tiny_folder), name="donor")
    best = _donor_checkpoint(store.files(donor.id).best)
    store.set_best(donor.id, 0.5, 1, 1, best)
    cfg = tiny_config(tiny_folder, weights="run", weights_run=donor.id)
    run = store.create_run(cfg, name="from donor")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished"
    done = store.get_run(run.id)
    for ckpt in (read_checkpoint(done.best_checkpoint), read_checkpoint(store.files(run.id).last)):
        assert tuple(ckpt.preprocess["mean"]) == OWN_MEAN
        assert tuple(ckpt.preprocess["std"]) == OWN_STD
    assert "normalised with" in done.results.weights
