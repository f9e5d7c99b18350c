"""Will a run fit on the disk? Checked before it starts (core.runs.preflight), so a run is
refused with the figures instead of failing with a full disk halfway. No torch import here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.config import RunConfig

# A ResNet-18 checkpoint file (weights + config + classes), bytes; last.pt adds optimizer
# state, which this rough figure leaves out.
CHECKPOINT_BYTES = 45 * 1024**2
MB = 1024**2


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
