"""The stage loop. Knows nothing of the store or the UI: progress, metrics and checkpoints
leave through the `TrainHooks` callbacks, and functions return their results.

Epoch axis: metric rows carry a *global* epoch position. Stage 1 with 2 epochs covers
(0, 2], stage 2 starts after 2. Step-level rows sit at fractional positions (1.25 = a
quarter into the 2nd epoch), so curves from different stages share one x axis.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LAYER_GROUPS, RunConfig, StageConfig
from .data import DataSplits, ImageSet, Preprocess, augment_batch, batch_indices, steps_per_epoch
from .model import (count_parameters, forward_prefix, forward_suffix, frozen_prefix,
                    group_parameters, set_train_mode, set_trainable)

MetricTuple = tuple[int, float, int, str, float]  # (stage, global epoch, step, key, value)
LOG_POINTS_PER_EPOCH = 10  # step-level train-loss rows per epoch, for live curves
EVAL_BATCH = 512  # evaluation batch size: no gradients, so larger than training's


class Cancelled(Exception):
    """Training stopped because cancellation was requested."""


@dataclass
class TrainHooks:
    """How training talks to the outside. Every hook is optional."""

    on_metrics: Callable[[list[MetricTuple]], None] = lambda rows: None
    on_progress: Callable[[dict[str, Any]], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False
    # Called after every epoch with the epoch's summary; the worker saves checkpoints here.
    on_epoch_end: Callable[["EpochEnd"], None] = lambda end: None


@dataclass
class EpochMetrics:
    loss: float
    acc: float
    images: int
    seconds: float


@dataclass
class EpochEnd:
    model: nn.Module
    stage: int  # 1-based
    epoch: int  # 1-based within the stage
    global_epoch: int  # 1-based across the run
    step: int  # global optimizer steps so far
    train: EpochMetrics
    val_loss: float
    val_acc: float
    is_best: bool
    training_state: dict[str, Any]  # optimizer, scheduler, RNG: enough to resume after this epoch


@dataclass
class TrainingResult:
    best_val_acc: float
    best_stage: int
    best_epoch: int
    epochs_run: int
    seconds: float
    per_stage: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ResumeState:
    """Where a resumed run picks up: after `global_epoch` completed epochs."""

    model_state: dict[str, torch.Tensor]
    global_epoch: int
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor  # data-order generator state
    best_val_acc: float
    best_stage: int
    best_epoch: int


# ---------------------------------------------------------------- optimizer and schedule


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """One optimizer param group per trainable layer group. With group_lr_mult < 1 a group
    k steps closer to the input than fc gets lr * mult**k (deeper-in layers move less)."""
    groups = []
    order = [g for g in reversed(LAYER_GROUPS) if g in stage.groups]  # fc first
    for g in order:
        k = LAYER_GROUPS.index("fc") - LAYER_GROUPS.index(g)
        lr = stage.lr * stage.group_lr_mult ** k
        params = group_parameters(model, g)
        # No weight decay on BatchNorm and bias parameters (standard practice: decaying
        # them only fights normalisation).
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "name": g})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{g}/no_decay"})
    return groups


def make_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, stage)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=stage.lr)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of a stage."""
    if schedule == "onecycle":
        # One-cycle: ramp from lr/25 up to lr over the first 30 % (or the warm-up), then
        # cosine down to lr/1e4 (Smith & Topin's defaults).
        up = warmup_steps or max(1, int(0.3 * total_steps))
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * step / up
        t = (step - up) / max(1, total_steps - up)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))  # x0.1 at half and three quarters
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig,
                   steps_in_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = stage.epochs * steps_in_epoch
    warmup = int(round(stage.warmup_epochs * steps_in_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(stage.schedule, s, total, warmup))


# ---------------------------------------------------------------- runtime settings


@dataclass(frozen=True)
class Runtime:
    """How tensors run on the device; chosen per machine, not part of the experiment."""

    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast, or None for fp32

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
        x = pre.normalize(x.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def default_runtime(device: torch.device) -> Runtime:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        bf16 = torch.cuda.is_bf16_supported()
        # AMP on CUDA: tensor cores, half the memory traffic; bf16 needs no loss scaling.
        return Runtime(device, channels_last=True,
                       autocast_dtype=torch.bfloat16 if bf16 else None)
    return Runtime(device)


# ---------------------------------------------------------------- epochs


def evaluate(model: nn.Module, data: ImageSet, pre: Preprocess, runtime: Runtime,
             batch_size: int = EVAL_BATCH) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predicted labels) over `data`, batched, no autograd."""
    model.eval()
    total_loss, preds = 0.0, []
    with torch.inference_mode(), runtime.autocast():
        for idx in batch_indices(len(data), batch_size, None, shuffle=False):
            x = runtime.prepare(data.images[idx], pre)
            y = data.labels[idx].to(runtime.device)
            logits = model(x).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
    n = max(1, len(data))
    return total_loss / n, (pred == data.labels).float().mean().item() if len(data) else 0.0, pred


def compute_features(model: nn.Module, data: ImageSet, prefix: Sequence[str], pre: Preprocess,
                     runtime: Runtime) -> torch.Tensor:
    """The frozen prefix's output for every image (no augmentation), for the feature cache."""
    model.eval()
    out = []
    with torch.inference_mode(), runtime.autocast():
        for idx in batch_indices(len(data), EVAL_BATCH, None, shuffle=False):
            out.append(forward_prefix(model, runtime.prepare(data.images[idx], pre), prefix).float())
    return torch.cat(out)


def train_one_epoch(model: nn.Module, data: ImageSet, pre: Preprocess, runtime: Runtime,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainable: Sequence[str],
                    bn_policy: str, batch_size: int, augment: bool, generator: torch.Generator,
                    on_step: Callable[[int, float, float], None], should_stop: Callable[[], bool],
                    features: torch.Tensor | None = None) -> EpochMetrics:
    """One pass over `data`. Returns the epoch's mean train loss and accuracy.

    `on_step(batch_index, batch_loss, lr)` after every optimizer step; `should_stop` is
    checked before every batch and raises Cancelled. With `features`, the frozen prefix's
    cached outputs are the inputs and only the suffix runs.
    """
    start = time.perf_counter()
    set_train_mode(model, trainable, bn_policy)
    prefix = frozen_prefix(trainable)
    n = len(data)
    # Drop a last batch of 1: BatchNorm in train mode cannot normalise a single sample.
    batches = batch_indices(n, batch_size, generator, shuffle=True,
                            drop_last=n % batch_size == 1)
    loss_sum, correct, seen = 0.0, 0, 0
    for i, idx in enumerate(batches):
        if should_stop():
            raise Cancelled()
        y = data.labels[idx].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            if features is not None:
                logits = forward_suffix(model, features[idx].to(runtime.device), prefix)
            else:
                xb = data.images[idx]
                if augment:
                    xb = augment_batch(xb, generator)
                x = runtime.prepare(xb, pre)
                if prefix:
                    # The frozen prefix needs no autograd graph: a plain forward, no saved
                    # activations, no backward through it.
                    with torch.no_grad():
                        x = forward_prefix(model, x, prefix)
                logits = forward_suffix(model, x, prefix)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        batch_loss = loss.item()
        loss_sum += batch_loss * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        on_step(i, batch_loss, optimizer.param_groups[0]["lr"])
    return EpochMetrics(loss_sum / max(1, seen), correct / max(1, seen), seen,
                        time.perf_counter() - start)


def _resolve_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_stages(model: nn.Module, cfg: RunConfig, splits: DataSplits, pre: Preprocess,
               runtime: Runtime, hooks: TrainHooks, resume: ResumeState | None = None,
               ) -> TrainingResult:
    """Train every stage of `cfg` in order on one model. Raises Cancelled when stopped."""
    start = time.perf_counter()
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = _resolve_generator(cfg.seed)
    spe = steps_per_epoch(len(splits.train) - (1 if len(splits.train) % cfg.batch_size == 1 else 0),
                          cfg.batch_size)
    total_epochs = cfg.total_epochs
    best = (-1.0, 0, 0)
    step, global_epoch = 0, 0
    per_stage: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume.model_state)
        generator.set_state(resume.rng)
        step, best = resume.step, (resume.best_val_acc, resume.best_stage, resume.best_epoch)
    epoch_seconds: list[float] = []
    for s_idx, stage in enumerate(cfg.stages, 1):
        first_epoch_global = global_epoch
        global_epoch += stage.epochs
        if resume is not None and global_epoch <= resume.global_epoch:
            continue  # stage already completed before the interruption
        set_trainable(model, stage.groups)
        optimizer = make_optimizer(model, stage)
        scheduler = make_scheduler(optimizer, stage, spe)
        done_in_stage = 0
        if resume is not None and first_epoch_global < resume.global_epoch:
            done_in_stage = resume.global_epoch - first_epoch_global
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
        prefix = frozen_prefix(stage.groups)
        features = val_features = None
        if stage.feature_cache and prefix and not _prefix_bn_trains(stage):
            hooks.on_progress({"phase": "caching features", "stage": s_idx, "stages": len(cfg.stages),
                               "fraction": (first_epoch_global) / total_epochs})
            features = compute_features(model, splits.train, prefix, pre, runtime)
        hooks.on_metrics([(s_idx, float(first_epoch_global), step, "trainable_params",
                           float(count_parameters(model, stage.groups)))])
        stage_best = -1.0
        for epoch in range(done_in_stage + 1, stage.epochs + 1):
            g_epoch = first_epoch_global + epoch  # 1-based global epoch
            log_every = max(1, spe // LOG_POINTS_PER_EPOCH)
            window: list[float] = []

            def on_step(i: int, batch_loss: float, lr: float) -> None:
                nonlocal step
                step += 1
                window.append(batch_loss)
                if (i + 1) % log_every == 0 or i + 1 == spe:
                    pos = g_epoch - 1 + (i + 1) / spe
                    hooks.on_metrics([(s_idx, pos, step, "train/step_loss", sum(window) / len(window)),
                                      (s_idx, pos, step, "lr", lr)])
                    window.clear()
                    per_epoch = (sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else None
                    frac_epoch = (i + 1) / spe
                    remaining_epochs = total_epochs - (g_epoch - 1) - frac_epoch
                    hooks.on_progress({
                        "phase": "training", "stage": s_idx, "stages": len(cfg.stages),
                        "epoch": epoch, "epochs": stage.epochs, "global_epoch": g_epoch,
                        "total_epochs": total_epochs, "step": i + 1, "steps_per_epoch": spe,
                        "fraction": (g_epoch - 1 + frac_epoch) / total_epochs,
                        "eta_s": per_epoch * remaining_epochs if per_epoch else None,
                    })

            train_metrics = train_one_epoch(
                model, splits.train, pre, runtime, optimizer, scheduler, stage.groups,
                stage.bn_policy, cfg.batch_size, cfg.augment and features is None, generator,
                on_step, hooks.should_stop, features)
            hooks.on_progress({"phase": "validating", "stage": s_idx, "stages": len(cfg.stages),
                               "epoch": epoch, "epochs": stage.epochs, "global_epoch": g_epoch,
                               "total_epochs": total_epochs, "fraction": g_epoch / total_epochs})
            val_loss, val_acc, _ = evaluate(model, splits.val, pre, runtime)
            epoch_seconds.append(train_metrics.seconds)
            is_best = val_acc > best[0]
            if is_best:
                best = (val_acc, s_idx, epoch)
            stage_best = max(stage_best, val_acc)
            hooks.on_metrics([
                (s_idx, float(g_epoch), step, "train/loss", train_metrics.loss),
                (s_idx, float(g_epoch), step, "train/acc", train_metrics.acc),
                (s_idx, float(g_epoch), step, "val/loss", val_loss),
                (s_idx, float(g_epoch), step, "val/acc", val_acc),
                (s_idx, float(g_epoch), step, "epoch_s", train_metrics.seconds),
                (s_idx, float(g_epoch), step, "images_per_s",
                 train_metrics.images / max(1e-9, train_metrics.seconds)),
            ])
            hooks.on_epoch_end(EpochEnd(
                model=model, stage=s_idx, epoch=epoch, global_epoch=g_epoch, step=step,
                train=train_metrics, val_loss=val_loss, val_acc=val_acc, is_best=is_best,
                training_state={
                    "global_epoch": g_epoch, "step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": generator.get_state(),
                    "best_val_acc": best[0], "best_stage": best[1], "best_epoch": best[2],
                }))
        per_stage.append({"stage": s_idx, "groups": list(stage.groups), "best_val_acc": stage_best})
    return TrainingResult(best_val_acc=best[0], best_stage=best[1], best_epoch=best[2],
                          epochs_run=global_epoch, seconds=time.perf_counter() - start,
                          per_stage=per_stage)


def _prefix_bn_trains(stage: StageConfig) -> bool:
    """With BN policy "train", the frozen prefix's BN statistics change every batch, so its
    outputs cannot be cached."""
    return stage.bn_policy == "train"


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> list[list[int]]:
    cm = torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2)
    return cm.view(num_classes, num_classes).tolist()
