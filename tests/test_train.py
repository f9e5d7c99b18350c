"""The stage loop: freezing, BN policy, optimizer contents, schedules, determinism."""

import math
from dataclasses import replace

import pytest
import torch

from core import config as cfgmod
from core.engine.checkpoints import read_checkpoint
from core.engine.data import Preprocess, load_splits
from core.engine.model import GROUP_MODULES, build_resnet18, group_parameters, set_trainable
from core.engine.train import (
    Runtime,
    TrainHooks,
    evaluate,
    lr_factor,
    make_optimizer,
    run_stages,
    train_one_epoch,
)
from tests.conftest import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(tiny_folder):
    return load_splits("folder", str(tiny_folder), Preprocess(32), val_fraction=0.25, seed=0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _group_of(key):
    top = key.split(".")[0]
    return next(g for g, mods in GROUP_MODULES.items() if top in mods)


def _one_epoch(model, splits, stage):
    set_trainable(model, stage.groups)
    opt = make_optimizer(model, stage)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_one_epoch(model, splits.train, Preprocess(32), Runtime(), opt, sched, stage.groups,
                           stage.bn_policy, 8, True, torch.Generator().manual_seed(0),
                           lambda *a: None, lambda: False)


@pytest.mark.parametrize("bn_policy", ["eval", "train"])
def test_frozen_groups_and_their_bn_stats_do_not_move(splits, bn_policy):
    torch.manual_seed(0)
    model = build_resnet18(len(splits.classes))
    before = _snapshot(model)
    stage = cfgmod.StageConfig(groups=("layer4", "fc"), lr=0.05, bn_policy=bn_policy)
    metrics = _one_epoch(model, splits, stage)
    assert metrics.images == len(splits.train)
    after = model.state_dict()
    for key, old in before.items():
        group = _group_of(key)
        changed = not torch.equal(old, after[key])
        is_bn_stat = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        if group in stage.groups:
            if not key.endswith("num_batches_tracked"):
                assert changed, f"trainable {key} did not change"
        elif is_bn_stat and bn_policy == "train":
            # The classic pitfall, allowed on purpose by the "train" policy.
            if key.startswith("layer3") and key.endswith("running_mean"):
                assert changed, f"{key} should drift under bn_policy=train"
        else:
            assert not changed, f"frozen {key} changed (bn_policy={bn_policy})"


def test_optimizer_holds_only_the_stage_parameters():
    model = build_resnet18(3)
    stage = cfgmod.StageConfig(groups=("layer3", "layer4", "fc"), lr=0.1, group_lr_mult=0.5)
    opt = make_optimizer(model, stage)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    expected = {id(p) for g in stage.groups for p in group_parameters(model, g)}
    assert in_opt == expected
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["fc"] == pytest.approx(0.1)
    assert lrs["layer4"] == pytest.approx(0.05)
    assert lrs["layer3"] == pytest.approx(0.025)
    # No weight decay on BN/bias parameters.
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["name"].endswith("no_decay"))


def test_schedules():
    assert lr_factor("constant", 50, 100, 0) == 1.0
    assert lr_factor("cosine", 0, 100, 0) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, 0) == pytest.approx(0.0)
    assert lr_factor("cosine", 0, 100, 10) == pytest.approx(0.1)  # warm-up starts low
    assert lr_factor("step", 80, 100, 0) == pytest.approx(0.01)
    peak = max(lr_factor("onecycle", s, 100, 0) for s in range(100))
    assert lr_factor("onecycle", 0, 100, 0) < 0.1 and peak == pytest.approx(1.0, abs=0.02)


def _run(cfg, splits, on_metrics=None, on_epoch_end=None):
    torch.manual_seed(cfg.seed)
    model = build_resnet18(len(splits.classes))
    rows = []
    hooks = TrainHooks(on_metrics=rows.extend, on_epoch_end=on_epoch_end or (lambda e: None))
    result = run_stages(model, cfg, splits, Preprocess(32), Runtime(), hooks)
    return result, rows, model


def test_same_seed_same_metrics_on_cpu(splits, tiny_folder):
    cfg = tiny_config(tiny_folder)
    timing = ("epoch_s", "images_per_s")  # wall-clock rows differ by nature
    learned = lambda rows: [r for r in rows if r[3] not in timing]  # noqa: E731
    _, rows_a, _ = _run(cfg, splits)
    _, rows_b, _ = _run(cfg, splits)
    assert learned(rows_a) == learned(rows_b)
    _, rows_c, _ = _run(replace(cfg, seed=1), splits)
    assert learned(rows_a) != learned(rows_c)


def test_metric_rows_cover_both_stages_on_a_global_epoch_axis(splits, tiny_folder):
    cfg = cfgmod.with_stage(tiny_config(tiny_folder), 1, epochs=2)
    result, rows, _ = _run(cfg, splits)
    val = [(s, e) for s, e, _, k, _ in rows if k == "val/acc"]
    assert val == [(1, 1.0), (2, 2.0), (2, 3.0)]
    assert result.epochs_run == 3 and result.best_stage in (1, 2)
    step_rows = [e for s, e, _, k, _ in rows if k == "train/step_loss"]
    assert step_rows == sorted(step_rows) and any(e % 1 for e in step_rows)


def test_feature_cache_trains_only_the_suffix(splits, tiny_folder):
    cfg = replace(tiny_config(tiny_folder), stages=(
        cfgmod.StageConfig(groups=("fc",), epochs=2, lr=0.05, feature_cache=True),))
    torch.manual_seed(cfg.seed)  # the weights _run starts from
    before = _snapshot(build_resnet18(len(splits.classes)))
    epochs = []
    _, _, model = _run(cfg, splits, on_epoch_end=lambda e: epochs.append(e.train.loss))
    assert len(epochs) == 2 and all(math.isfinite(loss) for loss in epochs)
    after = model.state_dict()
    moved = {k for k, old in before.items() if not torch.equal(old, after[k])}
    # The head trained; nothing in the cached prefix moved, BN statistics included.
    assert moved == {"fc.weight", "fc.bias"}


def test_best_checkpoint_reproduces_its_validation_accuracy(finished_run, tiny_folder):
    store, run = finished_run
    ckpt = read_checkpoint(run.best_checkpoint)
    cfg = cfgmod.from_dict(ckpt.config)
    pre = Preprocess.from_dict(ckpt.preprocess)
    splits = load_splits(cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction,
                         cfg.test_fraction, cfg.max_train_images, cfg.seed)
    assert ckpt.classes == splits.classes
    _, val_acc, _ = evaluate(ckpt.build_model(), splits.val, pre, Runtime())
    assert val_acc == pytest.approx(run.best_val_acc)
    assert ckpt.metrics["val_acc"] == pytest.approx(run.best_val_acc)
    assert (ckpt.stage, ckpt.epoch) == (run.best_stage, run.best_epoch)


def test_finished_run_records_results_and_weight_change(finished_run):
    store, run = finished_run
    r = run.results
    assert r.classes == ["blue", "green", "red"]
    assert len(r.confusion) == 3 and sum(map(sum, r.confusion)) == r.sizes.test
    assert len(r.per_class_acc) == 3
    changes = {w.stage: w.groups for w in r.weight_change}
    assert set(changes) == {1, 2}
    assert changes[1]["layer4"] > 0 and changes[1]["layer3"] == 0 and changes[1]["conv1"] == 0
    assert changes[2]["layer3"] > 0
    assert store.files(run.id).stage_end(1).exists()


def test_logged_learning_rate_is_the_one_each_step_used(splits, tiny_folder):
    cfg = tiny_config(tiny_folder)  # cosine in both stages
    _, rows, _ = _run(cfg, splits)
    lr_rows = [(s, v) for s, _, _, k, v in rows if k == "lr"]
    last_of_stage = {s: v for s, v in lr_rows}
    # Cosine reaches 0 only after the last step: every step that ran had a positive LR.
    assert all(v > 0 for _, v in lr_rows)
    assert last_of_stage[2] < cfg.stages[1].lr
