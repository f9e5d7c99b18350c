"""New run's arithmetic on its own: split sizes, class counts, trainable parameters, time
estimates, seeds and the merged error list (core.analysis.planning)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from core import config as cfgmod
from core.analysis import planning
from core.analysis.planning import FolderScan, plan_run
from core.analysis.speed import estimate_epoch_seconds, model_epoch_seconds
from core.engine.model_info import resnet18_parameters
from core.runs.store import RunStore
from tests.conftest import tiny_config


class Estimates:
    """A stand-in clock that records what it was asked (the real estimate is tested in
    test_plan_with_the_real_estimate_and_store)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, groups, n_images, resolution, feature_cache, device):
        self.calls.append((groups, n_images, resolution, feature_cache, device))
        return n_images / 100.0


def test_cifar10_default_run():
    cfg = cfgmod.preset_config("Two-stage")
    clock = Estimates()
    plan = plan_run(cfg, None, [], 1, clock)
    assert plan.num_classes == 10
    assert (plan.train_images, plan.val_images, plan.test_images) == (45_000, 5_000, 10_000)
    assert [s.trains for s in plan.stages] == ["layer4+fc", "layer3+layer4+fc"]
    assert plan.stages[0].trainable_parameters == resnet18_parameters(("layer4", "fc"), 10)
    assert plan.stages[0].total_parameters == resnet18_parameters(cfgmod.LAYER_GROUPS, 10)
    assert [s.lr for s in plan.stages] == [0.01, 0.001]
    assert clock.calls[0] == (("layer4", "fc"), 45_000, 32, False, None)  # "auto": any device
    assert plan.stages[1].stage_seconds == 450.0 * cfg.stages[1].epochs
    assert plan.errors == () and plan.seeds == (0,)


def test_classes_subset_cap_and_val_fraction_shape_the_split():
    cfg = replace(cfgmod.preset_config("Head only"), classes=("cat", "dog", "ship"),
                  val_fraction=0.25, device="cpu")
    clock = Estimates()
    plan = plan_run(cfg, None, [], 1, clock)
    assert plan.num_classes == 3
    assert (plan.train_images, plan.val_images, plan.test_images) == (11_250, 3_750, 3_000)
    assert plan.stages[0].trainable_parameters == resnet18_parameters(("fc",), 3) == 512 * 3 + 3
    assert clock.calls[0][4] == "cpu"
    capped = plan_run(replace(cfg, max_train_images=1000), None, [], 1, clock)
    assert (capped.train_images, capped.val_images) == (750, 250)


def test_folder_with_train_and_test_parts():
    scan = FolderScan(("a", "b", "c"), {"a": 40, "b": 30, "c": 30}, has_test_split=True)
    cfg = replace(cfgmod.preset_config("Two-stage"), data_source="folder", data_path="/d")
    plan = plan_run(cfg, scan, [], 1, Estimates())
    assert plan.num_classes == 3
    assert (plan.train_images, plan.val_images, plan.test_images) == (90, 10, None)
    subset = plan_run(replace(cfg, classes=("a", "b")), scan, [], 1, Estimates())
    assert subset.num_classes == 2 and subset.train_images + subset.val_images == 70


def test_one_class_tree_holds_out_the_test_fraction():
    scan = FolderScan(("a", "b"), {"a": 50, "b": 50}, has_test_split=False)
    cfg = replace(cfgmod.preset_config("Two-stage"), data_source="folder", data_path="/d",
                  test_fraction=0.2, val_fraction=0.1)
    plan = plan_run(cfg, scan, [], 1, Estimates())
    assert (plan.train_images, plan.val_images, plan.test_images) == (72, 8, 20)


def test_missing_folder_is_an_error_and_nothing_is_estimated(tmp_path):
    scan = planning.scan_image_folder(tmp_path / "nope")
    assert scan.error and scan.classes == ()
    cfg = replace(cfgmod.preset_config("Two-stage"), data_source="folder",
                  data_path=str(tmp_path / "nope"))
    clock = Estimates()
    plan = plan_run(cfg, scan, [], 1, clock)
    assert plan.errors == (f"data folder: {scan.error}",)
    assert plan.train_images == 0 and clock.calls == []
    assert all(s.epoch_seconds is None and s.stage_seconds is None for s in plan.stages)
    assert plan.num_classes == 10  # nothing known yet: the parameter counts assume 10


def test_path_errors_come_first_and_replace_the_empty_path_error():
    cfg = replace(cfgmod.preset_config("Two-stage"), data_source="folder", data_path="",
                  batch_size=1)
    refused = ["data folder: /etc is outside the allowed data folders"]
    plan = plan_run(cfg, None, refused, 1, Estimates())
    assert plan.errors[0] == refused[0]
    assert not any(e.startswith("data_path") for e in plan.errors)
    assert any(e.startswith("batch_size") for e in plan.errors)
    alone = plan_run(cfg, None, [], 1, Estimates())
    assert any(e.startswith("data_path") for e in alone.errors)


def test_a_stage_that_trains_nothing_is_reported_and_not_estimated():
    cfg = cfgmod.with_stage(cfgmod.preset_config("Two-stage"), 0, groups=())
    clock = Estimates()
    plan = plan_run(cfg, None, [], 1, clock)
    assert plan.stages[0].trains == "nothing" and plan.stages[0].epoch_seconds is None
    assert "stage 1: trains nothing; pick at least one layer group" in plan.errors
    assert len(clock.calls) == 1


def test_repeat_with_seeds():
    cfg = replace(cfgmod.preset_config("Two-stage"), seed=7)
    assert plan_run(cfg, None, [], 3, Estimates()).seeds == (7, 8, 9)


def test_plan_with_the_real_scan_estimate_and_store(tiny_folder: Path, tmp_path):
    scan = planning.scan_image_folder(tiny_folder)
    assert sorted(scan.classes) == ["blue", "green", "red"]
    assert set(scan.train_images.values()) == {12} and scan.total_train_images == 36
    assert scan.has_test_split and not scan.error
    assert planning.class_options("folder", scan) == scan.classes
    assert planning.class_options("cifar10", scan) == planning.CIFAR10_CLASSES
    cfg = tiny_config(tiny_folder)
    store = RunStore(tmp_path / "runs")  # no measured runs: the cost model answers

    def clock(groups, n_images, resolution, feature_cache, device):
        return estimate_epoch_seconds(groups, n_images, resolution, feature_cache, store=store,
                                      device=device)

    plan = plan_run(cfg, scan, [], 1, clock)
    assert (plan.train_images, plan.val_images) == (27, 9)  # 36 images, a quarter held out
    assert plan.stages[0].epoch_seconds == model_epoch_seconds(("layer4", "fc"), 27, 32)
    assert plan.errors == ()


def test_new_runs_plan_refuses_a_feature_cache_that_cannot_fit_and_cautions_near_it():
    """The form says it before Start (the same check as the submit's preflight)."""
    cfg = cfgmod.preset_config("Fast transfer", resolution=224)  # CIFAR-10: 45,000 cached
    least = 45_000 * 200_704 * 2
    refused = plan_run(cfg, None, [], 1, Estimates(), available_memory=least // 2)
    assert any(e.startswith("memory: Stage 1's feature cache") for e in refused.errors)
    near = plan_run(cfg, None, [], 1, Estimates(), available_memory=least + 1)
    assert not near.errors and "more than half" in near.cautions[0]
    assert plan_run(cfg, None, [], 1, Estimates()).cautions == ()  # not asked: not checked
