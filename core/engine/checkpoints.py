"""Self-describing checkpoints, written atomically and read with weights_only=True.

A checkpoint holds everything needed to rebuild and use the model alone: the state dict,
the run config, class names, the preprocessing (resolution, mean, std), where in training
it was taken (stage, epoch) and its metrics. "Last" checkpoints also hold optimizer,
scheduler and RNG state so a run can resume.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.atomic import atomic_write
from core.engine.arch import build_resnet18
from core.engine.model_info import load_refusal
from core.faults import fault_point

if TYPE_CHECKING:
    from core.engine.train import PlateauState

FORMAT = "finetune-lab/checkpoint"
FORMAT_VERSION = 1
ARCH = "resnet18"


class CheckpointError(ValueError):
    """Not a checkpoint of ours, or one we cannot use; the message says why."""


# Less free space than this after a failed torch.save means the disk filled up, bytes.
NEARLY_FULL_BYTES = 64 * 1024**2


class DiskFullError(OSError):
    """A file could not be written because its filesystem is full (errno ENOSPC)."""

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save that a reader (or a crash) never sees half-written. A full disk raises
    DiskFullError (torch reports it as a RuntimeError "file write failed"); the temp file
    is removed either way."""
    name = Path(path).name

    def write(tmp: Path) -> None:
        full = False
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            # torch's zip writer reports a short write in its own words ("file write
            # failed", "unexpected pos ..."): judge by the space left, with the temp in place.
            if shutil.disk_usage(tmp.parent).free >= NEARLY_FULL_BYTES:
                raise
            full = True
        if full:
            # Raised outside the except block: torch's traceback holds the open temp file,
            # and a deleted file's space only comes back once it is closed.
            gc.collect()
            raise DiskFullError(path)
        fault_point(f"write:{name}")  # killed here: the temp file is whole, `path` untouched

    try:
        atomic_write(path, write)
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path) from exc
        raise


@dataclass
class TrainingState:
    """What a "last" checkpoint adds so a run can resume after its epoch."""

    global_epoch: int  # completed epochs across the run
    step: int  # global optimizer steps so far
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor  # data-order generator state
    best_val_acc: float
    best_stage: int
    best_epoch: int
    # The plateau stops' counters (core.engine.train.PlateauState): a resumed run ends its
    # stages where an uninterrupted one would. Defaults: checkpoints written before them.
    stage_best_val_acc: float = -1.0
    stage_stale_epochs: int = 0
    run_stale_epochs: int = 0
    stage_end: int = 0  # a core.engine.stage_ends.StageEnd code: this epoch ended its stage
    # torch threads the current stage trains with (core.engine.train.stage_threads), so a
    # resume part-way through it uses the same and stays exact; 0: not chosen by the run.
    threads: int = 0

    @classmethod
    def capture(cls, global_epoch: int, step: int, optimizer: torch.optim.Optimizer,
                scheduler: Any, generator: torch.Generator, best: tuple[float, int, int],
                plateau: PlateauState, threads: int = 0) -> TrainingState:
        """The state after `global_epoch` completed epochs: the optimizer's, the scheduler's
        and the data order's, the best so far as (val_acc, stage, epoch) and the plateau's."""
        return cls(global_epoch=global_epoch, step=step, optimizer=optimizer.state_dict(),
                   scheduler=scheduler.state_dict(), rng=generator.get_state(),
                   best_val_acc=best[0], best_stage=best[1], best_epoch=best[2],
                   stage_best_val_acc=plateau.stage_best_val_acc,
                   stage_stale_epochs=plateau.stage_stale_epochs,
                   run_stale_epochs=plateau.run_stale_epochs, stage_end=int(plateau.stage_end),
                   threads=threads)


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # the run's config as core.config.to_dict wrote it
    classes: list[str]
    preprocess: dict[str, Any]
    stage: int  # 1-based
    epoch: int  # 1-based, within the stage
    metrics: dict[str, float] = field(default_factory=dict)
    arch: str = ARCH
    training_state: TrainingState | None = None  # last.pt only: optimizer/scheduler/RNG

    @classmethod
    def of_model(cls, model: nn.Module, config: dict[str, Any], classes: list[str],
                 preprocess: dict[str, Any], stage: int, epoch: int,
                 metrics: dict[str, float], training_state: TrainingState | None = None,
                 ) -> Checkpoint:
        """A checkpoint of `model` now: its weights copied to the CPU."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(state_dict=state, config=config, classes=list(classes), preprocess=preprocess,
                   stage=stage, epoch=epoch, metrics={k: float(v) for k, v in metrics.items()},
                   training_state=training_state)

    def build_model(self) -> nn.Module:
        model = build_resnet18(len(self.classes))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit ResNet-18 with "
                                  f"{len(self.classes)} classes: {exc}") from None
        return model.eval()


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    """Write `checkpoint` atomically; read_checkpoint(path) gives it back."""
    ts = checkpoint.training_state
    atomic_torch_save({
        "format": FORMAT, "version": FORMAT_VERSION, "arch": checkpoint.arch,
        "state_dict": checkpoint.state_dict, "config": checkpoint.config,
        "classes": list(checkpoint.classes), "preprocess": checkpoint.preprocess,
        "stage": checkpoint.stage, "epoch": checkpoint.epoch, "metrics": checkpoint.metrics,
        "training_state": dataclasses.asdict(ts) if ts is not None else None,
    }, path)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint save_checkpoint wrote, checked to be ours and loaded safely."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p.name} is not a checkpoint that can be loaded safely "
                              f"({load_refusal(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{p.name} is not a Fine-Tuning Lab checkpoint")
    if obj.get("arch") != ARCH:
        raise CheckpointError(f"{p.name} is for architecture {obj.get('arch')!r}, not {ARCH}")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{p.name} was written by a newer version of this app; update it")
    ts = obj.get("training_state")
    return Checkpoint(
        state_dict=obj["state_dict"], config=obj["config"], classes=list(obj["classes"]),
        preprocess=obj["preprocess"], stage=int(obj["stage"]), epoch=int(obj["epoch"]),
        metrics=dict(obj.get("metrics") or {}), arch=obj["arch"],
        training_state=TrainingState(**ts) if isinstance(ts, dict) else None,
    )
