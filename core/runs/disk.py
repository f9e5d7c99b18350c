"""Will a run fit on the disk, and its feature cache in memory? Checked before it starts
(core.runs.preflight), so a run is refused with the figures instead of failing with a full
disk, or being killed for memory, halfway. No torch import here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.config import RunConfig, cached_prefix
from core.engine.model_info import group_output_values

# A ResNet-18 checkpoint file (weights + config + classes), bytes; last.pt adds optimizer
# state, which this rough figure leaves out.
CHECKPOINT_BYTES = 45 * 1024**2
MB = 1024**2
GB = 1024**3


def checkpoint_files(cfg: RunConfig) -> int:
    """Checkpoint files a run keeps (best, last, and the first stage's end when there are
    several stages: core.runs.recorder.CheckpointPolicy) plus one temp file being written."""
    return 2 + (1 if len(cfg.stages) > 1 else 0) + 1


def bytes_needed(cfg: RunConfig, images: int) -> int:
    """Decoded-image cache (uint8, 3 x resolution^2 per image; image folders only: CIFAR-10
    is read from torchvision's files) plus checkpoints."""
    decode = images * 3 * cfg.resolution ** 2 if cfg.data_source == "folder" else 0
    return decode + checkpoint_files(cfg) * CHECKPOINT_BYTES


def space_problem(cfg: RunConfig, images: int, data_dir: Path) -> str | None:
    """Why the run cannot fit in the free space under `data_dir` (the run store), or None."""
    probe = Path(data_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = bytes_needed(cfg, images)
    if need <= free:
        return None
    return (f"the run needs about {need / MB:,.0f} MB ({images:,} decoded images at "
            f"{cfg.resolution} px and {checkpoint_files(cfg)} checkpoints of ~45 MB) but "
            f"{data_dir} has {free / MB:,.0f} MB free; free space, cap the images or lower the "
            f"resolution")


# Bytes per cached value: bf16 on CPUs with native bf16 and on GPUs, fp32 elsewhere. Which
# one the worker's runtime picks is known only there (it imports torch): the smaller is
# the least a cache can take.
CACHE_BYTES_PER_VALUE = (2, 4)


def feature_cache_bytes(cfg: RunConfig, cached: int) -> list[tuple[int, int, int]]:
    """(stage number, least bytes, most bytes) of each stage's feature cache of `cached`
    training images; one at a time is held (a stage's cache is dropped when the next stage
    starts)."""
    out = []
    for number, stage in enumerate(cfg.stages, 1):
        if prefix := cached_prefix(stage):
            values = cached * group_output_values(prefix[-1], cfg.resolution)
            out.append((number, values * CACHE_BYTES_PER_VALUE[0],
                        values * CACHE_BYTES_PER_VALUE[1]))
    return out


def memory_problem(cfg: RunConfig, cached: int, available: int) -> tuple[str | None, str | None]:
    """(why the run's feature cache of `cached` training images cannot fit in `available`
    bytes of memory, or None; a caution when it may not, or None)."""
    caches = feature_cache_bytes(cfg, cached)
    if not caches:
        return None, None
    stage, least, most = max(caches, key=lambda c: c[1])
    what = (f"Stage {stage}'s feature cache holds {cached:,} images' "
            f"frozen-layer outputs at {cfg.resolution} px")
    fixes = ("turn the feature cache off for that stage, lower the resolution, or cap the "
             "training images")
    if least > available:
        return (f"{what}: at least {least / GB:,.1f} GB, but {available / GB:,.1f} GB of "
                f"memory is available. To start it, {fixes}."), None
    if most > available // 2:
        return None, (f"{what}: {least / GB:,.1f}-{most / GB:,.1f} GB, more than half of the "
                      f"{available / GB:,.1f} GB of memory available now. If the run is killed "
                      f"for memory, {fixes}.")
    return None, None
