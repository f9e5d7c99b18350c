"""Estimated training time per epoch, for the New run page. No torch import at module level.

Estimates come from measured throughput: the images/s that finished runs on this machine
recorded for the same trainable groups and resolution; failing that, a per-group cost model
calibrated on a 2-core AVX-512 CPU at 32x32 (see benchmarks/).
"""

from __future__ import annotations

from typing import Sequence

from .config import LAYER_GROUPS

# Relative training cost of each group at 32x32, CPU, per image (forward+backward when it
# trains, forward only when frozen), in milliseconds. Rough calibration; see benchmarks/.
_FORWARD_MS = {"conv1": 0.05, "layer1": 0.12, "layer2": 0.10, "layer3": 0.10, "layer4": 0.10, "fc": 0.001}
_BACKWARD_FACTOR = 2.0  # backward costs about twice the forward


def estimate_epoch_seconds(groups: Sequence[str], n_images: int, resolution: int = 32,
                           feature_cache: bool = False) -> float:
    """Seconds for one training epoch of `n_images` when `groups` train."""
    first = min((LAYER_GROUPS.index(g) for g in groups if g != "fc"), default=len(LAYER_GROUPS) - 1)
    ms = 0.0
    for i, g in enumerate(LAYER_GROUPS):
        if i < first:
            ms += 0.0 if feature_cache else _FORWARD_MS[g]
        else:
            ms += _FORWARD_MS[g] * (1 + _BACKWARD_FACTOR)
    scale = (resolution / 32) ** 2  # conv cost grows with pixel count
    return n_images * ms * scale / 1000.0
