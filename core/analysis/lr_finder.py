"""LR finder per stage: a short learning-rate range test (Smith, 2015; fastai's `lr_find`)
on exactly the layer groups one stage trains.

The stage's other groups stay frozen and its BatchNorm policy holds, as in training. The LR
rises exponentially from `start_lr` to `end_lr` over `steps` optimizer steps (each group at
its own share, as `group_lr_mult` gives it in training); the loss is smoothed with a
bias-corrected moving average and the test stops when it diverges (the smoothed loss above
DIVERGENCE_FACTOR times its minimum, or not finite). The stage's schedule and warm-up do
not apply: the range test replaces them.

Suggested LR: the point of *steepest descent* of the smoothed loss against log10(LR),
before the loss minimum: where the loss falls fastest. (The common alternative, the
minimum's LR / 10, is given too, for reference.)

Starting weights: stage 1 starts from the run's starting weights. A later stage starts from
the model at the end of the previous stage, which does not exist before the run; pass a
checkpoint of it (e.g. a finished run's `stage1.pt`) as `start_checkpoint`, or the test
measures from the run's starting weights and says so in `LrFinding.start`.

Recording: the store has no run kind, so a range test is recorded as an ordinary finished
run named "LR finder · stage N · …" whose metric rows are the curve (keys LR_KEY, LOSS_KEY,
SMOOTHED_KEY at step i) plus one SUGGESTED_KEY row; it has no checkpoint, so nothing offers
it as a model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import RunConfig, StageConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.engine.data import ImageSet, Preprocess
    from core.engine.train import Runtime
    from core.runs.entities import Run
    from core.runs.store import RunStore

START_LR, END_LR = 1e-7, 10.0
STEPS = 100
SMOOTHING = 0.98  # weight of the moving average (fastai's beta)
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss is 4x its minimum
SKIP_START = 5  # the first smoothed points are dominated by the bias correction
# The slope is taken over this many steps (about half a decade of LR at 100 steps over
# 1e-7..10): a step-to-step slope follows batch noise and picks spurious early dips.
SLOPE_WINDOW = 5
RUN_NAME_PREFIX = "LR finder"
LR_KEY, LOSS_KEY, SMOOTHED_KEY = "lr_find/lr", "lr_find/loss", "lr_find/smoothed_loss"
SUGGESTED_KEY = "lr_find/suggested_lr"
DIVERGED_KEY = "lr_find/diverged"  # 1.0: the test stopped early because the loss blew up


@dataclass(frozen=True)
class LrCurve:
    lrs: tuple[float, ...]  # the stage's `lr` (the head group's) at each step
    losses: tuple[float, ...]  # each step's batch loss
    smoothed: tuple[float, ...]  # bias-corrected moving average of the losses
    diverged: bool  # stopped before the last step because the loss blew up

    @property
    def suggested_lr(self) -> float | None:
        return steepest_descent_lr(self.lrs, self.smoothed)

    @property
    def min_loss_lr_over_10(self) -> float | None:
        if len(self.smoothed) <= SKIP_START:
            return None
        i = min(range(SKIP_START, len(self.smoothed)), key=self.smoothed.__getitem__)
        return self.lrs[i] / 10


@dataclass(frozen=True)
class LrFinding:
    stage: int  # 1-based
    trains: str  # "layer4+fc"
    curve: LrCurve
    start: str  # the weights the test started from, in words (with any caveat)


def lr_at(step: int, steps: int, start_lr: float = START_LR, end_lr: float = END_LR) -> float:
    """The exponentially rising LR at `step` (0-based) of `steps`."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))


def steepest_descent_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> float | None:
    """The LR where the smoothed loss falls fastest against log10(LR), looking only before
    the loss minimum (past it the loss is already turning up). None for a curve too short
    to tell or one that never falls."""
    if len(smoothed) < SKIP_START + 3:
        return None
    lo = min(range(SKIP_START, len(smoothed)), key=smoothed.__getitem__)
    best, best_slope = None, 0.0
    for i in range(SKIP_START, lo):
        j = min(i + SLOPE_WINDOW, lo)
        slope = (smoothed[j] - smoothed[i]) / (math.log10(lrs[j]) - math.log10(lrs[i]))
        if slope < best_slope:  # the LR in the middle of the steepest window
            best, best_slope = math.sqrt(lrs[i] * lrs[j]), slope
    return best


def range_test(model: nn.Module, stage: StageConfig, data: ImageSet, pre: Preprocess,
               runtime: Runtime, batch_size: int, augment: bool, generator: torch.Generator,
               steps: int = STEPS, start_lr: float = START_LR, end_lr: float = END_LR,
               should_stop: Callable[[], bool] = lambda: False,
               on_step: Callable[[int, int], None] = lambda i, n: None) -> LrCurve:
    """Run the range test on `model` (changed in place: pass a copy you can lose). Only
    `stage.groups` train, with the stage's optimizer, weight decay and per-group LR
    multiplier; frozen groups' BatchNorm follows `stage.bn_policy`."""
    import torch.nn.functional as F

    from core.engine.data import augment_batch, training_batches
    from core.engine.model import set_train_mode, set_trainable
    from core.engine.train import Cancelled, make_optimizer

    model.to(runtime.device)
    set_trainable(model, stage.groups)
    set_train_mode(model, stage.groups, stage.bn_policy)
    optimizer = make_optimizer(model, stage)
    shares = [g["lr"] / stage.lr for g in optimizer.param_groups]  # group_lr_mult ** k
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    batches: list[torch.Tensor] = []
    for i in range(steps):
        if should_stop():
            raise Cancelled()
        if not batches:  # as many epochs as the steps need
            batches = list(training_batches(len(data), batch_size, generator))
        idx = batches.pop(0)
        xb = data.images[idx]
        if augment:
            xb = augment_batch(xb, generator)
        x = runtime.prepare(xb, pre)
        y = data.labels[idx].to(runtime.device)
        lr = lr_at(i, steps, start_lr, end_lr)
        for group, share in zip(optimizer.param_groups, shares):
            group["lr"] = lr * share
        with runtime.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        on_step(i, steps)
        if not math.isfinite(value):
            diverged = True
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * value
        smooth = avg / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if i > SKIP_START and smooth > DIVERGENCE_FACTOR * best:
            diverged = True
            break
    return LrCurve(tuple(lrs), tuple(losses), tuple(smoothed), diverged)


def find_lr(store: RunStore, cfg: RunConfig, stage: int, start_checkpoint: str | None = None,
            steps: int = STEPS, on_progress: Callable[[str, float], None] = lambda m, f: None,
            ) -> LrFinding:
    """The range test of stage `stage` (1-based) of `cfg` on the run's training split (the
    same split, normalisation and starting weights a run of `cfg` would use)."""
    import torch

    from core.engine.checkpoints import read_checkpoint
    from core.engine.data import Preprocess, load_splits
    from core.engine.model import (
        apply_backbone,
        build_model,
        resolve_device,
        starting_normalization,
    )
    from core.engine.train import default_runtime
    from core.runs.worker import donor_checkpoint

    if not 1 <= stage <= len(cfg.stages):
        raise ValueError(f"stage {stage}: the config has stages 1 to {len(cfg.stages)}")
    stage_cfg = cfg.stages[stage - 1]
    # cfg.threads is not applied here: the dashboard's process is shared by every session
    # (the command line sets it for its own process).
    torch.manual_seed(cfg.seed)  # the new head's initialisation, as a run of cfg has it
    splits_progress = lambda msg, f: on_progress(msg, 0.5 * f)  # noqa: E731
    donor = donor_checkpoint(store, cfg)
    # The run's normalisation and data split; the data come first: they size the head.
    norm = starting_normalization(cfg.weights, cfg.weights_path, donor)
    pre = Preprocess(resolution=cfg.resolution, mean=norm.mean, std=norm.std)
    splits = load_splits(cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction,
                         cfg.test_fraction, cfg.max_train_images, cfg.seed,
                         cache_dir=store.layout.cache, on_progress=splits_progress)
    start = build_model(len(splits.classes), cfg.weights, cfg.weights_path, donor)
    model, start_text = start.model, start.description
    if start_checkpoint:
        ckpt = read_checkpoint(start_checkpoint)
        apply_backbone(model, ckpt.state_dict)
        start_text = f"checkpoint {Path(start_checkpoint).name} (stage {ckpt.stage} epoch {ckpt.epoch})"
    elif stage > 1:
        start_text += (f" — stage {stage} will start from stage {stage - 1}'s result, which "
                       f"does not exist yet: this curve is measured from the starting weights")
    runtime = default_runtime(resolve_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    curve = range_test(model, stage_cfg, splits.train, pre, runtime, cfg.batch_size,
                       cfg.augment, generator, steps=steps,
                       on_step=lambda i, n: on_progress("range test", 0.5 + 0.5 * (i + 1) / n))
    return LrFinding(stage, stage_cfg.trains, curve, start_text)


def record(store: RunStore, cfg: RunConfig, finding: LrFinding, name: str = "") -> Run:
    """Record a range test as an ordinary, finished run: its config, the curve as metric
    rows and the suggestion, under a name that says what it is."""
    run = store.create_run(cfg, name=run_name(finding, name), kind="lr_finder")
    if not store.claim_run_now(run.id, os.getpid()):  # a worker took it first: not ours
        store.request_cancel(run.id)
        raise RuntimeError(f"run {run.id} was claimed by a worker before it was recorded")
    c = finding.curve
    rows = []
    for i, (lr, loss, smooth) in enumerate(zip(c.lrs, c.losses, c.smoothed), 1):
        rows += [(finding.stage, 0.0, i, LR_KEY, lr), (finding.stage, 0.0, i, LOSS_KEY, loss),
                 (finding.stage, 0.0, i, SMOOTHED_KEY, smooth)]
    if c.suggested_lr is not None:
        rows.append((finding.stage, 0.0, len(c.lrs), SUGGESTED_KEY, c.suggested_lr))
    rows.append((finding.stage, 0.0, len(c.lrs), DIVERGED_KEY, float(c.diverged)))
    store.log_metrics(run.id, rows)
    from dataclasses import replace

    store.set_results(run.id, replace(run.results, weights=finding.start))
    store.finish_run(run.id, "finished")
    return store.get_run(run.id)  # type: ignore[return-value]


def run_name(finding: LrFinding, name: str = "") -> str:
    return (f"{RUN_NAME_PREFIX} · stage {finding.stage} ({finding.trains})"
            f"{' · ' + name if name else ''} · {time.strftime('%m-%d %H:%M')}")


def is_lr_find_run(run: Run) -> bool:
    return run.kind == "lr_finder"


def curve_of(store: RunStore, run_id: str) -> LrCurve:
    """A recorded range test's curve, read back from its metric rows."""
    by_key: dict[str, list[float]] = {LR_KEY: [], LOSS_KEY: [], SMOOTHED_KEY: [], DIVERGED_KEY: []}
    for r in store.metrics(run_id, keys=tuple(by_key)):
        by_key[r.key].append(r.value)
    return LrCurve(tuple(by_key[LR_KEY]), tuple(by_key[LOSS_KEY]), tuple(by_key[SMOOTHED_KEY]),
                   diverged=bool(by_key[DIVERGED_KEY] and by_key[DIVERGED_KEY][-1]))


