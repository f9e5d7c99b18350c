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
minimum's LR / 10, is given too, for reference.) Only a curve with a clear fall gets one:
the smoothed loss must drop by MIN_FALL of its starting value and by NOISE_MULTIPLE times
the batch-to-batch noise, and the steepest fall must not sit at the bottom of the range
searched (the best rate may then lie below it). A flat, noisy curve (typical from a stage-2
checkpoint) gets no suggestion and the reason in words (`suggest`); a suggestion always lies
inside the range searched.

Starting weights: stage 1 starts from the run's starting weights. A later stage starts from
the model at the end of the previous stage, which does not exist before the run; pass a
checkpoint of it (e.g. a finished run's `stage1.pt`) as `start_checkpoint`, or the test
measures from the run's starting weights and says so in `LrFinding.start`.

A background job (`submit`): a run of kind "lr_finder" whose config is the config tested and
whose request (stage, start checkpoint, steps) is a file in its folder; the ordinary worker
(core.runs.worker) executes it through the job queue, locally or on Ray, with progress, time
left and cancel, never in the dashboard's process. Its metric rows are the curve (keys
LR_KEY, LOSS_KEY, SMOOTHED_KEY at step i) plus one SUGGESTED_KEY row; it has no checkpoint,
so nothing offers it as a model. The command line runs the same test in its own process
(`find_lr`, then `record`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from core import config as cfgmod
from core.config import RunConfig, StageConfig
from core.runs import jobs
from core.runs.entities import RunProgress
from core.runs.preflight import donor_checkpoint, preflight

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.engine.data import ImageSet, Preprocess
    from core.engine.train import Runtime
    from core.runs.entities import Run
    from core.runs.recorder import Heartbeat
    from core.runs.store import RunStore

log = logging.getLogger("finetune_lab.lr_finder")
START_LR, END_LR = 1e-7, 10.0
STEPS = 100
SMOOTHING = 0.98  # weight of the moving average (fastai's beta)
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss is 4x its minimum
SKIP_START = 5  # the first smoothed points are dominated by the bias correction
# The slope is taken over this many steps (about half a decade of LR at 100 steps over
# 1e-7..10): a step-to-step slope follows batch noise and picks spurious early dips.
SLOPE_WINDOW = 5
# A suggestion needs a clear fall: the smoothed loss must drop by this share of its value at
# SKIP_START, and by this many times its own noise (the batch noise, median |loss -
# smoothed|, scaled by the moving average's sqrt((1 - beta) / (1 + beta)) for white noise).
MIN_FALL = 0.10
NOISE_MULTIPLE = 3.0
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
    def suggestion(self) -> Suggestion:
        return suggest(self.lrs, self.losses, self.smoothed)

    @property
    def suggested_lr(self) -> float | None:
        return self.suggestion.lr

    @property
    def min_loss_lr_over_10(self) -> float | None:
        if len(self.smoothed) <= SKIP_START:
            return None
        i = min(range(SKIP_START, len(self.smoothed)), key=self.smoothed.__getitem__)
        return self.lrs[i] / 10


@dataclass(frozen=True)
class Suggestion:
    lr: float | None  # None: the curve shows no rate worth taking
    why: str  # in words, for the user: what the curve shows


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


def suggest(lrs: Sequence[float], losses: Sequence[float],
            smoothed: Sequence[float]) -> Suggestion:
    """The learning rate to use, if the curve clearly shows one: steepest descent, when the
    smoothed loss falls clearly (MIN_FALL, NOISE_MULTIPLE) and not fastest at the bottom of
    the range searched; always inside that range. Otherwise None and why."""
    n = len(smoothed)
    if n < SKIP_START + 3:
        return Suggestion(None, f"The test stopped after {n} steps, too few to read a curve "
                                f"from: no suggestion. Run it with more steps.")
    searched = f"{lrs[0]:.0e} to {lrs[-1]:.0e}"  # as far as it went
    lo = min(range(SKIP_START, n), key=smoothed.__getitem__)
    start = smoothed[SKIP_START]
    fall = start - smoothed[lo]
    batch_noise = statistics.median(abs(a - b) for a, b in zip(losses[SKIP_START:],
                                                               smoothed[SKIP_START:]))
    noise = batch_noise * math.sqrt((1 - SMOOTHING) / (1 + SMOOTHING))
    if fall <= MIN_FALL * abs(start) or fall <= NOISE_MULTIPLE * noise:
        return Suggestion(None, (
            f"No clear minimum: from {searched} the smoothed loss fell by "
            f"{max(0.0, fall) / abs(start) if start else 0.0:.0%} at most, within its noise, "
            f"so no learning rate stands out (a checkpoint that has already learned often "
            f"gives such a flat curve). Keep the preset's rate."))
    lr = steepest_descent_lr(lrs, smoothed)
    if lr is None:
        return Suggestion(None, f"The loss never fell from {searched}: no suggestion.")
    if lr <= math.sqrt(lrs[SKIP_START] * lrs[min(SKIP_START + SLOPE_WINDOW, lo)]):
        return Suggestion(None, (
            f"The loss fell fastest at the bottom of the range searched ({searched}): the "
            f"best rate may lie below it, so none is suggested. Keep the preset's rate."))
    lr = min(max(lr, lrs[0]), lrs[-1])  # inside the range searched
    return Suggestion(lr, f"The loss fell fastest at {lr:.2g} (range searched: {searched}).")


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
            steps: int = STEPS, on_progress: Callable[[RunProgress], None] = lambda p: None,
            should_stop: Callable[[], bool] = lambda: False) -> LrFinding:
    """The range test of stage `stage` (1-based) of `cfg` on the run's training split (the
    same split, normalisation and starting weights a run of `cfg` would use). Runs in a
    worker process or the command line's, never the dashboard's; raises Cancelled when
    `should_stop` says so (checked before every batch and while decoding)."""
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

    if not 1 <= stage <= len(cfg.stages):
        raise ValueError(f"stage {stage}: the config has stages 1 to {len(cfg.stages)}")
    stage_cfg = cfg.stages[stage - 1]
    donor = donor_checkpoint(store, cfg)
    # The run's normalisation and data split; the data come first: they size the head.
    norm = starting_normalization(cfg.weights, cfg.weights_path, donor)
    pre = Preprocess(resolution=cfg.resolution, mean=norm.mean, std=norm.std)
    splits = load_splits(cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction,
                         cfg.test_fraction, cfg.max_train_images, cfg.seed,
                         cache_dir=store.layout.cache, should_stop=should_stop,
                         on_progress=lambda msg, f: on_progress(RunProgress(
                             phase="loading data", message=msg, data_fraction=f, fraction=0.0)))
    # The new head's initialisation as a run of cfg has it, from a private generator state:
    # the process's global one is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
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
    began = time.monotonic()

    def on_step(i: int, n: int) -> None:
        done = i + 1
        per_step = (time.monotonic() - began) / done  # seconds
        on_progress(RunProgress(phase="range test", message=f"Range test: step {done}/{n}",
                                fraction=done / n, step=done, steps_per_epoch=n,
                                eta_s=per_step * (n - done)))

    curve = range_test(model, stage_cfg, splits.train, pre, runtime, cfg.batch_size,
                       cfg.augment, generator, steps=steps, should_stop=should_stop,
                       on_step=on_step)
    return LrFinding(stage, stage_cfg.trains, curve, start_text)


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class LrFinderRequest:
    """What an LR finder's job tests (its run's config is the config)."""

    stage: int  # 1-based
    start_checkpoint: str | None = None  # stands in for the previous stage's result
    steps: int = STEPS


def check_request(cfg: RunConfig, request: LrFinderRequest) -> list[str]:
    """Every problem with testing `request` on `cfg`, in words."""
    errors = [f"config: {e}" for e in cfgmod.validate(cfg)]
    if not 1 <= request.stage <= len(cfg.stages):
        errors.append(f"stage: the config has stages 1 to {len(cfg.stages)}, not {request.stage}")
    if request.steps < SKIP_START + 3:
        errors.append(f"steps: use at least {SKIP_START + 3}")
    if request.start_checkpoint and not Path(request.start_checkpoint).is_file():
        errors.append(f"start checkpoint {request.start_checkpoint} does not exist")
    return errors


def submit(store: RunStore, cfg: RunConfig, request: LrFinderRequest) -> Run:
    """Queue the range test as a background job (a run of kind "lr_finder"), under the job
    queue's limit like any run. Raises ConfigError for a bad request, PreflightError when the
    executor cannot take it."""
    if errors := check_request(cfg, request):
        raise cfgmod.ConfigError(errors)
    # The test decodes the run's data and starts from its weights: the run's checks apply.
    report = preflight(cfg, store)
    jobs.check_executor(store, cfg, report.memory_bytes)
    trains = cfg.stages[request.stage - 1].trains
    run = store.create_run(cfg, name=run_name(request.stage, trains), kind="lr_finder",
                           job_request=asdict(request))
    jobs.dispatch(store)
    return store.get_run(run.id) or run


def request_of(store: RunStore, run_id: str) -> LrFinderRequest | None:
    """The request an LR finder's run was queued with; None when it has none (a test the
    command line recorded, or one from before jobs)."""
    try:
        data = json.loads(store.files(run_id).job_request.read_text(encoding="utf-8"))
        return LrFinderRequest(stage=int(data["stage"]),
                               start_checkpoint=data.get("start_checkpoint") or None,
                               steps=int(data.get("steps", STEPS)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_job(store: RunStore, cfg: RunConfig, stage: int) -> Run | None:
    """The newest LR finder job for stage `stage` of exactly this config, if any."""
    for run in store.list_runs(kinds=("lr_finder",)):
        if run.config == cfg and (req := request_of(store, run.id)) and req.stage == stage:
            return run
    return None


def run_job(store: RunStore, run: Run, heartbeat: Heartbeat) -> None:
    """The worker's part (core.runs.worker, kind "lr_finder"): run the requested test in
    this process with the heartbeat's progress and cancel, and record the curve."""
    cfg = cfgmod.check(run.config) if not run.config_error else None
    if cfg is None:
        raise cfgmod.ConfigError([run.config_error or "unreadable config"])
    request = request_of(store, run.id)
    if request is None:
        raise cfgmod.ConfigError([f"the job's request ({store.files(run.id).job_request.name}) "
                                  f"is missing or unreadable: start the LR finder again"])
    if errors := check_request(cfg, request):
        raise cfgmod.ConfigError(errors)
    log.info("range test of stage %d (%s), %d steps", request.stage,
             cfg.stages[request.stage - 1].trains, request.steps)
    heartbeat.set_progress(RunProgress(phase="loading data"))
    finding = find_lr(store, cfg, request.stage, request.start_checkpoint, request.steps,
                      on_progress=heartbeat.set_progress, should_stop=heartbeat.should_stop)
    record_curve(store, run, finding)
    log.info("%d steps%s; %s", len(finding.curve.lrs),
             " (stopped: the loss diverged)" if finding.curve.diverged else "",
             finding.curve.suggestion.why)


def record_curve(store: RunStore, run: Run, finding: LrFinding) -> None:
    """The curve as `run`'s metric rows, its suggestion, and where the test started."""
    c = finding.curve
    rows = []
    for i, (lr, loss, smooth) in enumerate(zip(c.lrs, c.losses, c.smoothed), 1):
        rows += [(finding.stage, 0.0, i, LR_KEY, lr), (finding.stage, 0.0, i, LOSS_KEY, loss),
                 (finding.stage, 0.0, i, SMOOTHED_KEY, smooth)]
    if c.suggested_lr is not None:
        rows.append((finding.stage, 0.0, len(c.lrs), SUGGESTED_KEY, c.suggested_lr))
    rows.append((finding.stage, 0.0, len(c.lrs), DIVERGED_KEY, float(c.diverged)))
    store.truncate_metrics(run.id, -1)  # a resumed job writes its curve afresh
    store.log_metrics(run.id, rows)
    store.set_results(run.id, replace(run.results, weights=finding.start))


def record(store: RunStore, cfg: RunConfig, finding: LrFinding, name: str = "") -> Run:
    """Record a range test run in this process (the command line's) as a finished run of
    kind "lr_finder": its config, the curve as metric rows and the suggestion."""
    run = store.create_run(cfg, name=run_name(finding.stage, finding.trains, name),
                           kind="lr_finder")
    if not store.claim_run_now(run.id, os.getpid()):  # a worker took it first: not ours
        store.request_cancel(run.id)
        raise RuntimeError(f"run {run.id} was claimed by a worker before it was recorded")
    record_curve(store, run, finding)
    store.finish_run(run.id, "finished")
    return store.get_run(run.id)  # type: ignore[return-value]


def run_name(stage: int, trains: str, name: str = "") -> str:
    return (f"{RUN_NAME_PREFIX} · stage {stage} ({trains})"
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
