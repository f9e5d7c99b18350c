"""Why a run did what it did: per-stage attribution, weight movement per layer group, the
most confused class pairs, and the test images it got wrong most confidently.

Reading attribution and confusion needs only the store (no torch at import); top losses
and weight-change computation import torch lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import LAYER_GROUPS
from core.engine.paths import shown_outside_roots
from core.runs.store import Run, RunResults, RunStore


class InsightError(ValueError):
    """An insight cannot be computed for this run; the message says why."""


# ---------------------------------------------------------------- per-stage attribution


@dataclass(frozen=True)
class StageGain:
    stage: int  # 1-based
    trains: str  # "layer4+fc"
    first_epoch: int  # global epoch range of the stage, 1-based inclusive
    last_epoch: int
    # Validation accuracy (fraction 0..1) before the stage and at its last epoch. Before
    # stage 1 the head is untrained, so "before" is chance level: 1 / number of classes.
    val_before: float | None
    val_after: float | None
    best_in_stage: float | None

    @property
    def gain(self) -> float | None:
        if self.val_before is None or self.val_after is None:
            return None
        return self.val_after - self.val_before


def stage_attribution(store: RunStore, run: Run) -> list[StageGain]:
    """How much each stage added to validation accuracy: val/acc at the end of the stage
    minus at the end of the previous one (chance level before stage 1). A stage that did
    not complete (cancelled, failed) has val_after None, or its last completed epoch."""
    stages = run.config.stages
    rows = store.metrics(run.id, keys=("val/acc",))
    by_epoch: dict[int, float] = {}
    for r in rows:  # integer global epochs; a resumed run may rewrite one, keep the latest
        by_epoch[int(round(r.epoch))] = r.value
    classes = run.results.classes or run.config.classes
    chance = 1.0 / len(classes) if classes else None
    out: list[StageGain] = []
    start = 0
    before = chance
    for i, stage in enumerate(stages, 1):
        epochs = stage.epochs
        span = range(start + 1, start + epochs + 1)
        seen = [by_epoch[e] for e in span if e in by_epoch]
        after = seen[-1] if seen else None
        out.append(StageGain(stage=i, trains=stage.trains,
                             first_epoch=span.start, last_epoch=span.stop - 1,
                             val_before=before, val_after=after,
                             best_in_stage=max(seen) if seen else None))
        before = after
        start += epochs
    return out


def attribution_words(gains: Sequence[StageGain]) -> str:
    """The gains in one sentence: "stage 1 (layer4+fc) added +40.0 points over chance
    level; stage 2 (...) added +2.1 points over stage 1." Empty when no stage has a gain."""
    parts = []
    for g in gains:
        if g.gain is not None:
            base = "chance level" if g.stage == 1 else f"stage {g.stage - 1}"
            parts.append(f"stage {g.stage} ({g.trains}) added {100 * g.gain:+.1f} points over {base}")
    return "; ".join(parts) + "." if parts else ""


# ---------------------------------------------------------------- weight change


@dataclass(frozen=True)
class WeightChange:
    stage: int
    group: str
    relative_change: float  # ||W_end - W_start|| / ||W_start|| over the group's parameters
    trained: bool  # whether the group was unfrozen in this stage


def weight_changes(run: Run) -> list[WeightChange]:
    """Rows from run.results.weight_change (written by the worker at each stage end),
    every layer group of every stage, in LAYER_GROUPS order. Empty when the run predates
    weight-change tracking."""
    stages = run.config.stages
    out = []
    for entry in run.results.weight_change:
        s, groups = entry.stage, entry.groups
        trained = set(stages[s - 1].groups) if 0 < s <= len(stages) else set()
        for g in LAYER_GROUPS:
            if g in groups and groups[g] is not None and math.isfinite(float(groups[g])):
                out.append(WeightChange(s, g, float(groups[g]), g in trained))
    return out


def moved_groups_words(changes: Sequence[WeightChange]) -> str:
    """Per stage, the trained groups by how far they moved: "stage 1: layer4 3.2 %, fc 9.1 %"."""
    notes = []
    for s in sorted({c.stage for c in changes}):
        moved = sorted((c for c in changes if c.stage == s and c.trained),
                       key=lambda c: -c.relative_change)
        if moved:
            notes.append(f"stage {s}: " + ", ".join(f"{c.group} {100 * c.relative_change:.1f} %"
                                                    for c in moved))
    return "; ".join(notes)


# ---------------------------------------------------------------- confusion


@dataclass(frozen=True)
class ConfusedPair:
    true: str
    predicted: str
    count: int
    rate: float  # fraction of the true class's test images predicted as `predicted`


def confused_pairs(results: RunResults, k: int = 5) -> list[ConfusedPair]:
    """The k largest off-diagonal cells of the test confusion matrix (rows = true class,
    columns = predicted), like fastai's most_confused. Empty when nothing was confused."""
    cm = results.confusion
    classes = results.classes or [str(i) for i in range(len(cm))]
    pairs = []
    for i, row in enumerate(cm):
        total = sum(row)
        for j, n in enumerate(row):
            if i != j and n > 0:
                pairs.append(ConfusedPair(classes[i], classes[j], int(n), n / total if total else 0.0))
    pairs.sort(key=lambda p: (-p.count, -p.rate, p.true, p.predicted))
    return pairs[:k]


# ---------------------------------------------------------------- top losses


@dataclass(frozen=True)
class TopLoss:
    index: int  # position in the run's test set
    image: Any  # uint8 numpy array H x W x 3 at the checkpoint's resolution
    true: str
    predicted: str
    confidence: float  # softmax probability of the (wrong) prediction
    loss: float  # cross-entropy of the true class


def top_losses(store: RunStore, run: Run, k: int = 12, checkpoint: str | Path | None = None
               ) -> list[TopLoss]:
    """The k test images the best checkpoint got wrong with the highest confidence. The
    test set is rebuilt exactly as the worker built it (same config, seed and preprocessing).
    Runs in the caller's process with torch's thread setting as it is (the dashboard's
    server shares it across sessions: it is never changed here); batches of 256 bound memory."""
    import torch
    import torch.nn.functional as F

    from core.engine.checkpoints import read_checkpoint
    from core.engine.data import DataError, Preprocess, load_splits

    path = checkpoint or run.best_checkpoint
    if not path or not Path(path).is_file():
        raise InsightError("this run has no best checkpoint (it has not finished an epoch)")
    ckpt = read_checkpoint(path)
    cfg = run.config
    if outside := shown_outside_roots(cfg.data_source, cfg.data_path):
        raise InsightError(outside)
    pre = Preprocess.from_dict(ckpt.preprocess)
    try:
        splits = load_splits(cfg.data_source, cfg.data_path, pre, cfg.classes,
                             cfg.val_fraction, cfg.test_fraction, cfg.max_train_images,
                             cfg.seed, cache_dir=store.layout.cache)
    except DataError as exc:
        raise InsightError(f"the run's test images cannot be loaded: {exc}") from None
    if splits.classes != ckpt.classes:
        raise InsightError("the data set's classes changed since this run was trained")
    model = ckpt.build_model()
    probs, losses = [], []
    with torch.inference_mode():
        for start in range(0, len(splits.test), 256):
            x = pre.normalize(splits.test.images[start:start + 256])
            y = splits.test.labels[start:start + 256]
            logits = model(x).float()
            probs.append(logits.softmax(1))
            losses.append(F.cross_entropy(logits, y, reduction="none"))
    p = torch.cat(probs)
    loss = torch.cat(losses)
    conf, pred = p.max(1)
    wrong = torch.nonzero(pred != splits.test.labels).flatten()
    order = wrong[torch.argsort(conf[wrong], descending=True)][:k]
    return [TopLoss(index=int(i), image=splits.test.images[i].permute(1, 2, 0).numpy().copy(),
                    true=ckpt.classes[int(splits.test.labels[i])],
                    predicted=ckpt.classes[int(pred[i])], confidence=float(conf[i]),
                    loss=float(loss[i]))
            for i in order.tolist()]


def stage_attribution_table(gains: Sequence[StageGain]) -> list[dict[str, Any]]:
    """Rows for display, accuracies in percent."""
    def pct(x: float | None) -> float | None:
        return None if x is None else round(100.0 * x, 2)

    return [{"stage": g.stage, "trains": g.trains,
             "epochs": f"{g.first_epoch}-{g.last_epoch}" if g.last_epoch > g.first_epoch else str(g.first_epoch),
             "val acc before (%)": pct(g.val_before), "val acc after (%)": pct(g.val_after),
             "added (points)": pct(g.gain), "best in stage (%)": pct(g.best_in_stage)}
            for g in gains]
