"""The stage loop. Knows nothing of the store or the UI: progress, metrics and checkpoints
leave through the `TrainHooks` callbacks, and functions return their results.

Epoch axis: metric rows carry a *global* epoch position. Stage 1 with 2 epochs covers
(0, 2], stage 2 starts after 2. Step-level rows sit at fractional positions (1.25 = a
quarter into the 2nd epoch), so curves from different stages share one x axis.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import LAYER_GROUPS, RunConfig, StageConfig, cached_prefix
from core.engine.checkpoints import TrainingState
from core.engine.data import (  # noqa: F401 (Cancelled: re-exported, raised here too)
    Cancelled,
    DataSplits,
    ImageSet,
    Preprocess,
    apply_crop_flip,
    batch_indices,
    crop_pad,
    draw_crop_flip,
    steps_per_epoch,
    training_batches,
)
from core.engine.model import (
    FoldedPrefix,
    count_parameters,
    forward_prefix,
    forward_suffix,
    frozen_prefix,
    group_parameters,
    set_train_mode,
    set_trainable,
)
from core.engine.stage_ends import STAGE_END_KEY, StageEnd
from core.process import physical_cores

MetricTuple = tuple[int, float, int, str, float]  # (stage, global epoch, step, key, value)
LOG_POINTS_PER_EPOCH = 10  # step-level train-loss rows per epoch, for live curves
EVAL_BATCH = 512  # evaluation batch size on CPU: no gradients, so larger than training's
# On a GPU a 32x32 batch of 512 is a few microseconds of arithmetic per kernel: evaluation is
# launch-bound there, so small images go in larger batches, at most this many; the batch
# shrinks with the image area (conv1's output for 2048 images of 32 px is 134 MB in fp32)
# and is never below EVAL_BATCH.
CUDA_EVAL_BATCH = 2048


class Diverged(RuntimeError):
    """A loss went NaN or infinite: the weights are ruined, so the run ends here (the best
    checkpoint of the epochs before stays). Never written as a metric row: the store keeps
    only finite values."""

    def __init__(self, stage: int, epoch: int, what: str, loss: float):
        shown = "NaN" if math.isnan(loss) else ("inf" if loss > 0 else "-inf")
        super().__init__(f"training diverged at stage {stage}, epoch {epoch} ({what} {shown}): "
                         f"lower the learning rate")
        self.stage, self.epoch = stage, epoch


def check_finite(place: EpochPlace, what: str, loss: float) -> None:
    """Raises Diverged when `loss` (a float already on the host) is not finite."""
    if not math.isfinite(loss):
        raise Diverged(place.stage, place.epoch, what, loss)


@dataclass
class TrainHooks:
    """How training talks to the outside. Every hook is optional."""

    on_metrics: Callable[[list[MetricTuple]], None] = lambda rows: None
    on_progress: Callable[[dict[str, Any]], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False
    # Called after every epoch with the epoch's summary; the worker saves checkpoints here.
    on_epoch_end: Callable[[EpochEnd], None] = lambda end: None


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
    training_state: TrainingState  # optimizer, scheduler, RNG: enough to resume after this epoch
    stage_end: StageEnd = StageEnd.NONE  # this epoch ended its stage, and why

    @property
    def stage_ended(self) -> bool:
        return self.stage_end is not StageEnd.NONE


@dataclass
class TrainingResult:
    best_val_acc: float
    best_stage: int
    best_epoch: int
    epochs_run: int
    seconds: float


@dataclass
class ResumeState:
    """Where a resumed run picks up: a last checkpoint's weights and training state (after
    `training.global_epoch` completed epochs)."""

    model_state: dict[str, torch.Tensor]
    training: TrainingState

    @property
    def plateau(self) -> PlateauState:
        return PlateauState.of(self.training)


@dataclass
class PlateauState:
    """Epochs without a new best validation accuracy, which the plateau stops count. Saved
    with every last checkpoint, so a resumed run ends its stages where an uninterrupted
    one would."""

    stage_best_val_acc: float = -1.0  # best validation accuracy within the current stage
    stage_stale_epochs: int = 0  # epochs since the stage's best
    run_stale_epochs: int = 0  # epochs since the run's best
    stage_end: StageEnd = StageEnd.NONE  # how the latest epoch ended its stage, if it did

    @classmethod
    def of(cls, state: TrainingState) -> PlateauState:
        """The counters a last checkpoint's training state saved."""
        return cls(state.stage_best_val_acc, state.stage_stale_epochs, state.run_stale_epochs,
                   StageEnd(state.stage_end))

    def after_epoch(self, val_acc: float, run_improved: bool, stage: StageConfig,
                    epoch: int, last_stage: bool, early_stop_patience: int) -> PlateauState:
        """The state after an epoch (1-based within `stage`) reached `val_acc`."""
        stage_improved = val_acc > self.stage_best_val_acc
        stage_best = val_acc if stage_improved else self.stage_best_val_acc
        stage_stale = 0 if stage_improved else self.stage_stale_epochs + 1
        run_stale = 0 if run_improved else self.run_stale_epochs + 1
        at_cap = epoch >= stage.epochs
        if early_stop_patience and run_stale >= early_stop_patience and not (at_cap and last_stage):
            end = StageEnd.EARLY_STOP  # cuts this stage or skips later ones
        elif at_cap:
            end = StageEnd.COMPLETED
        elif stage.plateau_patience and stage_stale >= stage.plateau_patience:
            end = StageEnd.PLATEAU
        else:
            end = StageEnd.NONE
        return PlateauState(stage_best, stage_stale, run_stale, end)

    def next_stage(self) -> PlateauState:
        """A new stage starts: its own best and patience start afresh; the run's go on."""
        return PlateauState(run_stale_epochs=self.run_stale_epochs)


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


def make_optimizer(model: nn.Module, stage: StageConfig, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: one kernel per step over all parameters (same update, fewer memory passes;
    on CPU it cut layer4's SGD step by about a third)."""
    groups = param_groups(model, stage)
    extra = {"fused": True} if fused else {}
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=0.9, **extra)
    return torch.optim.AdamW(groups, lr=stage.lr, **extra)


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
    """How tensors run on the device; chosen per machine, not part of the experiment.

    The trainable part uses `autocast_dtype` and `channels_last`; evaluation uses
    `eval_dtype` (fp32 on CPU, so a checkpoint reproduces its recorded accuracy exactly in
    any runtime). The frozen prefix (no gradients flow through it) and the feature cache use
    `frozen_dtype` and `frozen_channels_last`, and an eval-mode prefix runs with its
    BatchNorm folded into the convolutions.
    """

    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast, or None for fp32
    frozen_dtype: torch.dtype | None = None  # autocast for the frozen prefix; None = fp32
    frozen_channels_last: bool = False
    eval_dtype: torch.dtype | None = None  # autocast for evaluation; None = fp32
    fused_optimizer: bool = False  # one fused kernel per optimizer step (fewer memory passes)
    data_on_device: bool = False  # keep the uint8 data set on the accelerator when it fits
    eval_batch_size: int = EVAL_BATCH  # images per evaluation / feature-caching batch at 32 px
    cuda_graphs: bool = False  # replay full training steps as CUDA graphs (see StepGraph)
    # torch threads for each CPU stage: None leaves the process's setting alone (library
    # callers, tests, the dashboard's shared process); 0 chooses them from the CPU free
    # when the stage starts (stage_threads); N > 0 uses N. A worker process sets this.
    cpu_threads: int | None = None

    def eval_batch(self, resolution: int) -> int:
        """Evaluation batch at `resolution` px: eval_batch_size at 32 px, scaled down with
        the image area (same activation memory), never below EVAL_BATCH."""
        return max(EVAL_BATCH, min(self.eval_batch_size, self.eval_batch_size * 32 ** 2 // resolution ** 2))

    def autocast(self, cache: bool = True):
        """`cache=False` inside a CUDA graph capture: autocast's cache of cast weights
        would hold tensors from the capture's memory pool past it (same values either way)."""
        return _autocast(self.device, self.autocast_dtype, cache)

    def frozen_autocast(self):
        return _autocast(self.device, self.frozen_dtype)

    def eval_autocast(self):
        return _autocast(self.device, self.eval_dtype)

    def prepare(self, x: torch.Tensor, pre: Preprocess, channels_last: bool | None = None
                ) -> torch.Tensor:
        x = pre.normalize(x.to(self.device, non_blocking=True))
        if self.channels_last if channels_last is None else channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


# ---------------------------------------------------------------- threads


THREADS_KEY = "threads"  # metric row at a stage's start: the torch threads it trains with
FREE_CPU_SAMPLE_S = 0.3  # how long a stage start watches the CPU to see what is free


def busy_cpus_elsewhere(sample_s: float = FREE_CPU_SAMPLE_S) -> float:
    """CPUs' worth of work that other processes did over the next `sample_s` seconds
    (whole-machine busy time from the OS, less this process's own CPU time)."""
    import psutil

    me = psutil.Process()
    own0 = sum(me.cpu_times()[:2])
    psutil.cpu_percent(None)
    t0 = time.perf_counter()
    time.sleep(sample_s)  # the measurement window itself: nothing to poll for
    busy = psutil.cpu_percent(None) / 100 * (psutil.cpu_count() or 1)
    own = (sum(me.cpu_times()[:2]) - own0) / max(1e-3, time.perf_counter() - t0)
    return max(0.0, busy - own)


def threads_for_free_cpu(cores: int, busy_elsewhere: float) -> int:
    """One torch thread per core that other processes leave free, at least one: a thread on
    a core another process keeps busy gets a slice of it, and at every parallel region its
    partners wait for it (measured by benchmarks/contention.py; benchmarks/README.md,
    "Training beside other work"). Rounded, so a core half taken still counts as free."""
    return max(1, min(cores, math.floor(cores - busy_elsewhere + 0.5)))


def stage_threads(runtime: Runtime, recorded: int = 0) -> int | None:
    """Torch threads for a CPU stage starting now (None: leave them as they are). A stage
    resumed part-way uses the threads it `recorded` when it started: the thread count
    changes how reductions split (a ResNet-18 backward here: gradients 4e-6 apart with 1
    and 2 threads, identical with the same count), so the same count keeps a resume exact."""
    if runtime.device.type != "cpu" or runtime.cpu_threads is None:
        return None
    if recorded > 0:
        return recorded
    if runtime.cpu_threads > 0:
        return runtime.cpu_threads
    return threads_for_free_cpu(physical_cores(), busy_cpus_elsewhere())


# Overrides bf16 detection on CPU: "0" forces the fp32 runtime (e.g. to measure what a CPU
# without bf16 gets, on one that has it), "1" forces bf16. Unset or empty: detect.
CPU_BF16_ENV = "FINETUNE_LAB_CPU_BF16"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo reports (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates bf16 and it is slower than fp32, so it must be detected, not assumed.
    $FINETUNE_LAB_CPU_BF16 ("0"/"1") overrides the detection; this is the one place it is
    read."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ValueError(f"${CPU_BF16_ENV} must be 0, 1 or unset, not {override!r}")
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# "0" turns the CUDA-graph training step off (every step eager, e.g. to measure what the
# graphs bring or to rule them out when something looks wrong); unset, empty or "1": on.
CUDA_GRAPHS_ENV = "FINETUNE_LAB_CUDA_GRAPHS"


def cuda_graphs_enabled() -> bool:
    """Whether $FINETUNE_LAB_CUDA_GRAPHS lets CUDA runs replay their training step as a
    graph (the one place it is read)."""
    value = os.environ.get(CUDA_GRAPHS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"${CUDA_GRAPHS_ENV} must be 0, 1 or unset, not {value!r}")
    return value != "0"


def default_runtime(device: torch.device) -> Runtime:
    """The measured-fastest settings for `device` (see benchmarks/throughput.py)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return cuda_runtime(device, torch.cuda.is_bf16_supported(), cuda_graphs_enabled())
    if device.type == "cpu":
        return cpu_runtime(cpu_has_native_bf16())
    return Runtime(device)


def cuda_runtime(device: torch.device, bf16_supported: bool, graphs: bool = True) -> Runtime:
    """AMP on CUDA: tensor cores, half the memory traffic; bf16 needs no loss scaling (a GPU
    without bf16 trains in fp32 rather than fp16 with a loss scaler). channels_last for
    the tensor cores' layout, the uint8 data set on the GPU (augmentation runs there too:
    its random numbers are drawn per epoch and copied once, then `apply_crop_flip` indexes
    on the data's device), larger evaluation batches, and the training step replayed as a
    CUDA graph (`graphs`): at 32 px a step is hundreds of tiny kernels, bound by their
    launches, not by the GPU."""
    dtype = torch.bfloat16 if bf16_supported else None
    return Runtime(device, channels_last=True, autocast_dtype=dtype, frozen_dtype=dtype,
                   frozen_channels_last=True, eval_dtype=dtype, fused_optimizer=True,
                   data_on_device=True, eval_batch_size=CUDA_EVAL_BATCH, cuda_graphs=graphs)


def cpu_runtime(native_bf16: bool) -> Runtime:
    """Measured on a 2-core AVX512-BF16 CPU at 32x32 (benchmarks/README.md): the frozen
    prefix runs ~1.8x faster in bf16 + channels_last; bf16 autocast for the trained layers
    gave +12 % (stage 1), +32 % (stage 2), +38 % (all layers) with the same accuracy in
    short runs; channels_last for trained layers was slower in stages 1-2. Without hardware
    bf16 oneDNN emulates it, slower than fp32: then fp32 throughout (the prefix stays
    channels_last: measured faster in fp32 too, benchmarks/cpu_levers.py)."""
    bf16 = torch.bfloat16 if native_bf16 else None
    return Runtime(torch.device("cpu"), channels_last=False, autocast_dtype=bf16,
                   frozen_dtype=bf16, frozen_channels_last=True, eval_dtype=None,
                   fused_optimizer=True)


# ---------------------------------------------------------------- data on the device


def _device_set(data: ImageSet, runtime: Runtime) -> ImageSet:
    """`data` where the trainer reads it from: on CUDA the whole uint8 set on the GPU when
    it fits comfortably (no per-batch copies at all), else in pinned memory so batches copy
    asynchronously. On CPU, as it is."""
    if runtime.device.type != "cuda" or data.images.is_cuda:
        return data
    if runtime.data_on_device:
        free, _ = torch.cuda.mem_get_info(runtime.device)
        if data.images.numel() < free // 4:  # uint8: bytes; leave 3/4 for the model
            return ImageSet(data.images.to(runtime.device), data.labels.to(runtime.device),
                            data.classes, data.skipped)
    return ImageSet(data.images.pin_memory(), data.labels.pin_memory(), data.classes, data.skipped)


# ---------------------------------------------------------------- the frozen prefix


class PrefixRunner:
    """Runs a stage's frozen prefix without autograd: BN-folded convolutions when its
    BatchNorm is in eval mode, in the runtime's frozen precision and memory format."""

    def __init__(self, model: nn.Module, prefix: Sequence[str], bn_policy: str, runtime: Runtime,
                 pre: Preprocess):
        self.model, self.prefix, self.runtime, self.pre = model, list(prefix), runtime, pre
        self.folded: FoldedPrefix | None = None
        if self.prefix and bn_policy == "eval":
            self.folded = FoldedPrefix(model, self.prefix)
            if runtime.frozen_channels_last:
                self.folded.to(memory_format=torch.channels_last)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> prefix output in the frozen precision (bf16 stays bf16)."""
        rt = self.runtime
        if self.folded is None:  # BN policy "train": the prefix's BN statistics keep moving
            with torch.no_grad():
                return forward_prefix(self.model, rt.prepare(x, self.pre), self.prefix)
        x = rt.prepare(x, self.pre, channels_last=rt.frozen_channels_last)
        with torch.no_grad(), rt.frozen_autocast():
            return self.folded(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch (already augmented) -> the suffix's float input."""
        if not self.prefix:
            return self.runtime.prepare(x, self.pre)
        out = self.raw(x)
        return out if self.runtime.autocast_dtype is not None else out.float()


# ---------------------------------------------------------------- epochs


def evaluate(model: nn.Module, data: ImageSet, pre: Preprocess, runtime: Runtime,
             batch_size: int | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predicted labels) over `data`, batched, no autograd. The body
    runs BN-folded (eval-mode BN is a per-channel affine map) in `runtime.eval_dtype`.
    `on_batch(images_done, images_total)` before every batch: progress, and a cancel (it
    may raise Cancelled)."""
    model.eval()
    body = FoldedPrefix(model, LAYER_GROUPS[:-1])
    if runtime.channels_last or runtime.frozen_channels_last:
        body.to(memory_format=torch.channels_last)
    data = _device_set(data, runtime)
    total_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    preds = []
    with torch.inference_mode(), runtime.eval_autocast():
        batch_size = batch_size or runtime.eval_batch(pre.resolution)
        for b, idx in enumerate(batch_indices(len(data), batch_size, None, shuffle=False)):
            if on_batch is not None:
                on_batch(b * batch_size, len(data))
            idx = idx.to(data.images.device)
            x = runtime.prepare(data.images[idx], pre,
                                channels_last=runtime.channels_last or runtime.frozen_channels_last)
            y = data.labels[idx].to(runtime.device)
            logits = model.fc(torch.flatten(model.avgpool(body(x)), 1)).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").double()
            preds.append(logits.argmax(1))
    pred = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)
    labels = data.labels.cpu()
    n = max(1, len(data))
    return total_loss.item() / n, (pred == labels).float().mean().item() if len(data) else 0.0, pred


def compute_features(model: nn.Module, data: ImageSet, prefix: Sequence[str], pre: Preprocess,
                     runtime: Runtime) -> torch.Tensor:
    """The frozen prefix's output for every image (no augmentation), for the feature cache.
    Kept in the precision the prefix computes in (bf16 halves the memory) and on the device."""
    model.eval()
    runner = PrefixRunner(model, prefix, "eval", runtime, pre)
    data = _device_set(data, runtime)
    out = [runner.raw(data.images[idx.to(data.images.device)]).contiguous()
           for idx in batch_indices(len(data), runtime.eval_batch(pre.resolution), None,
                                    shuffle=False)]
    return torch.cat(out)


# ---------------------------------------------------------------- the training step as a CUDA graph

# Eager steps a StepGraph runs before it captures: cudnn's algorithm search, the fused
# optimizer's momentum buffers and the allocator's blocks all settle in the first steps,
# and a capture must find them settled. They are real training steps, not extra ones.
GRAPH_WARMUP_STEPS = 3


def graph_step_applies(runtime: Runtime, inputs_on_device: bool, batch_len: int,
                       batch_size: int) -> bool:
    """Whether a training step may run as the stage's CUDA graph: only on CUDA with graphs
    on (`Runtime.cuda_graphs`, $FINETUNE_LAB_CUDA_GRAPHS), only when the images (or cached
    features) and labels already sit on the GPU (a graph cannot hold a host-side gather or
    a copy from pinned memory), and only for a full batch (the graph's shapes are fixed: a
    ragged last batch runs eagerly)."""
    return (runtime.cuda_graphs and runtime.device.type == "cuda" and inputs_on_device
            and batch_len == batch_size)


class StepGraph:
    """One stage's training step (frozen prefix, forward, loss, backward and the epoch's
    running sums) captured once as a CUDA graph and replayed for every full batch after:
    one launch instead of hundreds. The fused optimizer step and the LR schedule stay
    eager (the schedule changes the LR every step). Make one per stage (one optimizer)
    and pass it to each of the stage's `train_one_epoch` calls; it starts over by itself
    when called with another model, optimizer or step shape.

    Replays compute exactly what the eager step computes: the same kernels on the same
    inputs (the graph reads the weights and BatchNorm statistics in place, writes the
    gradients the optimizer reads, and updates the running statistics in place)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runner: PrefixRunner | None = None  # the prefix the graph runs (frozen: a snapshot is right)
        self.x = self.y = self.crops = self.loss = None  # the graph's static inputs and output
        self.loss_sum = self.correct = None  # the graph's running sums, zeroed per epoch
        self.grads: list[torch.Tensor | None] = []  # where the graph writes the gradients

    def use(self, key: tuple) -> None:
        """Starts over unless the step is the one captured (same model, optimizer, shapes)."""
        if self.key != key:
            self.__init__()
            self.key = key

    def capture(self, step: Callable[..., torch.Tensor], runner: PrefixRunner,
                optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                crops: torch.Tensor | None, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """Records `step(runner, x, y, crops, loss_sum, correct)` with these tensors as the
        graph's static inputs and sums. Records only: `replay` then runs it."""
        self.runner, self.x, self.y, self.crops = runner, x, y, crops
        self.loss_sum, self.correct = loss_sum, correct
        optimizer.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a worker's helpers) must not abort it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss = step(runner, x, y, crops, loss_sum, correct, cache_casts=False)
        self.grads = [p.grad for p in _optimized_params(optimizer)]
        self.graph = graph

    def replay(self, inputs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
               crops: torch.Tensor | None) -> torch.Tensor:
        """One full batch through the graph: the batch is gathered into the static inputs
        (2-3 launches), then the graph runs. Returns the batch's loss (a copy: the static
        output is overwritten by the next replay)."""
        torch.index_select(inputs, 0, idx, out=self.x)
        torch.index_select(labels, 0, idx, out=self.y)
        if crops is not None:
            self.crops.copy_(crops)
        self.graph.replay()
        return self.loss.clone()

    def restore_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """After an eager step (which makes new gradient tensors), point the parameters at
        the graph's gradient tensors again, for the optimizer steps after later replays."""
        for p, g in zip(_optimized_params(optimizer), self.grads):
            p.grad = g


def _optimized_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _step_body(model: nn.Module, prefix: Sequence[str], runtime: Runtime, cached: bool, pad: int,
               runner: PrefixRunner, x: torch.Tensor, y: torch.Tensor, crops: torch.Tensor | None,
               loss_sum: torch.Tensor, correct: torch.Tensor, cache_casts: bool = True) -> torch.Tensor:
    """One step up to the gradients, device work only (no host sync, so a CUDA graph can
    hold it): augmentation (`crops` given), the frozen prefix without autograd, the
    suffix under autocast, loss, backward, and the epoch's running sums. `x` is the uint8
    batch, or the cached features (`cached`). Returns the batch loss (0-d)."""
    if cached:
        if runtime.autocast_dtype is None:
            x = x.float()
    else:
        if crops is not None:
            x = apply_crop_flip(x, crops, pad)
        x = runner(x)  # the frozen prefix needs no autograd graph: no saved activations
    if runtime.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast(cache=cache_casts):
        logits = forward_suffix(model, x, prefix)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    batch_loss = loss.detach()
    loss_sum += batch_loss.double() * len(y)
    correct += (logits.detach().argmax(1) == y).sum()
    return batch_loss


@contextmanager
def _side_stream(on: bool):
    """Runs the block on a side CUDA stream (the warm-up before a capture, as PyTorch's
    CUDA-graph notes prescribe), ordered after and before the current stream's work."""
    if not on:
        yield
        return
    side, current = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def train_one_epoch(model: nn.Module, data: ImageSet, pre: Preprocess, runtime: Runtime,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainable: Sequence[str],
                    bn_policy: str, batch_size: int, augment: bool, generator: torch.Generator,
                    on_step: Callable[[int, Any, float], None], should_stop: Callable[[], bool],
                    features: torch.Tensor | None = None,
                    step_graph: StepGraph | None = None) -> EpochMetrics:
    """One pass over `data`. Returns the epoch's mean train loss and accuracy.

    `on_step(batch_index, batch_loss, lr)` after every optimizer step (`batch_loss` is a
    0-d tensor: converting it waits for the device, so callers do it only when they log);
    `should_stop` is checked before every batch and raises Cancelled. With `features`, the
    frozen prefix's cached outputs are the inputs and only the suffix runs. On CUDA with
    graphs on, full batches replay `step_graph`'s captured step (pass the stage's one so
    it captures once per stage; without it, once per call).
    """
    start = time.perf_counter()
    set_train_mode(model, trainable, bn_policy)
    prefix = frozen_prefix(trainable)
    runner = PrefixRunner(model, prefix, bn_policy, runtime, pre)
    data = _device_set(data, runtime)
    dev = runtime.device
    cached = features is not None
    inputs = features if features is not None else data.images
    batches = training_batches(len(data), batch_size, generator)
    # The whole epoch's data order and augmentation draws (in the generator's per-batch
    # order) go to the device once: no per-step host-to-device copy that waits for the GPU.
    pad = crop_pad(data.images.shape[-2])
    crops = None
    if augment and not cached and batches:
        crops = torch.cat([draw_crop_flip(len(b), pad, generator) for b in batches], 1).to(
            inputs.device, non_blocking=True)
    order = torch.cat(batches).to(inputs.device, non_blocking=True) if batches else None
    labels = data.labels.to(inputs.device, non_blocking=True)
    on_device = inputs.is_cuda and labels.is_cuda
    graphs = step_graph if step_graph is not None else StepGraph()
    graphs.use((model, optimizer, tuple(trainable), bn_policy, batch_size, crops is not None,
                cached, tuple(inputs.shape[1:]), inputs.dtype, runtime, pre))
    if graphs.graph is not None:
        loss_sum, correct = graphs.loss_sum.zero_(), graphs.correct.zero_()
    else:  # running sums stay on the device: no host sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)

    def step(run: PrefixRunner, x, y, c, s, k, cache_casts=True):
        return _step_body(model, prefix, runtime, cached, pad, run, x, y, c, s, k, cache_casts)

    seen = 0
    for i, b in enumerate(batches):
        if should_stop():
            raise Cancelled()
        idx = order[seen:seen + len(b)]
        c = crops[:, seen:seen + len(b)] if crops is not None else None
        graphed = graph_step_applies(runtime, on_device, len(b), batch_size)
        if graphed and graphs.graph is not None:
            batch_loss = graphs.replay(inputs, labels, idx, c)
        elif graphed and graphs.eager_steps >= GRAPH_WARMUP_STEPS:
            graphs.capture(step, runner, optimizer, inputs[idx], labels[idx].to(dev),
                           None if c is None else c.clone(), loss_sum, correct)
            batch_loss = graphs.replay(inputs, labels, idx, c)
        else:
            with _side_stream(graphed):  # warm-up before a capture
                optimizer.zero_grad(set_to_none=True)
                batch_loss = step(runner, inputs[idx].to(dev, non_blocking=True),
                                  labels[idx].to(dev, non_blocking=True), c, loss_sum, correct)
            graphs.eager_steps += graphed
        lr = optimizer.param_groups[0]["lr"]  # the LR this step used (scheduler.step moves it on)
        optimizer.step()
        if not graphed and graphs.graph is not None:
            graphs.restore_grads(optimizer)
        scheduler.step()
        seen += len(b)
        on_step(i, batch_loss, lr)
    return EpochMetrics(loss_sum.item() / max(1, seen), correct.item() / max(1, seen), seen,
                        time.perf_counter() - start)


def _resolve_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class EpochClock:
    """Wall seconds of each whole epoch (training + validation), for the time-left estimate."""

    total_epochs: int
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_start: float = 0.0  # time.perf_counter() when the current epoch started

    def start_epoch(self) -> None:
        self.epoch_start = time.perf_counter()

    def end_epoch(self) -> None:
        self.epoch_seconds.append(time.perf_counter() - self.epoch_start)

    def pace(self, epoch_fraction: float) -> float:
        """Seconds per epoch at the current epoch's pace so far (training only)."""
        return (time.perf_counter() - self.epoch_start) / epoch_fraction

    def time_left(self, epochs_done: float, pace: float | None = None) -> float | None:
        """Seconds left after `epochs_done` (fractional) of the run: from the timed epochs,
        else from `pace` (seconds per epoch measured so far in the first one), else None."""
        seconds = self.epoch_seconds
        per_epoch = sum(seconds) / len(seconds) if seconds else pace
        return per_epoch * (self.total_epochs - epochs_done) if per_epoch else None


@dataclass(frozen=True)
class EpochPlace:
    """Where an epoch sits in the run."""

    stage: int  # 1-based
    stages: int
    epoch: int  # 1-based within the stage
    epochs: int  # the stage's
    global_epoch: int  # 1-based across the run
    total_epochs: int

    def progress(self, phase: str, fraction: float, eta_s: float | None,
                 **extra: Any) -> dict[str, Any]:
        """A progress report during this epoch (the fields of core.runs.entities.RunProgress)."""
        return {"phase": phase, "stage": self.stage, "stages": self.stages, "epoch": self.epoch,
                "epochs": self.epochs, "global_epoch": self.global_epoch,
                "total_epochs": self.total_epochs, "fraction": fraction, "eta_s": eta_s, **extra}


class EpochReporter:
    """What one epoch tells the hooks while it runs: `on_step` counts the run's optimizer
    steps and, LOG_POINTS_PER_EPOCH times an epoch, logs the mean train loss and the LR and
    reports progress; `on_val_batch` reports validation progress and checks for a stop."""

    def __init__(self, place: EpochPlace, step: int, steps_in_epoch: int, clock: EpochClock,
                 hooks: TrainHooks):
        self.place, self.step, self.steps_in_epoch = place, step, steps_in_epoch
        self.clock, self.hooks = clock, hooks
        self.log_every = max(1, steps_in_epoch // LOG_POINTS_PER_EPOCH)
        self.window: list[Any] = []  # this log interval's batch losses (0-d tensors)

    def on_step(self, i: int, batch_loss: Any, lr: float) -> None:
        self.step += 1
        self.window.append(batch_loss)
        if (i + 1) % self.log_every != 0 and i + 1 != self.steps_in_epoch:
            return
        place, frac_epoch = self.place, (i + 1) / self.steps_in_epoch
        pos = place.global_epoch - 1 + frac_epoch
        mean_loss = sum(float(v) for v in self.window) / len(self.window)  # one device sync
        check_finite(place, "loss", mean_loss)
        self.hooks.on_metrics([(place.stage, pos, self.step, "train/step_loss", mean_loss),
                               (place.stage, pos, self.step, "lr", lr)])
        self.window.clear()
        # Before any epoch is timed, this epoch's pace so far (training only).
        pace = self.clock.pace(frac_epoch)
        self.hooks.on_progress(place.progress(
            "training", pos / place.total_epochs, self.clock.time_left(pos, pace),
            step=i + 1, steps_per_epoch=self.steps_in_epoch))

    def on_val_batch(self, done: int, total: int) -> None:
        place = self.place
        self.hooks.on_progress(place.progress(
            "validating", place.global_epoch / place.total_epochs,
            self.clock.time_left(place.global_epoch),
            message=f"Validating: {done:,}/{total:,} images", data_fraction=done / max(1, total)))
        if self.hooks.should_stop():
            raise Cancelled()


def epoch_rows(place: EpochPlace, step: int, train: EpochMetrics, val_loss: float,
               val_acc: float, stage_end: StageEnd) -> list[MetricTuple]:
    """The metric rows of a finished epoch, at its global position."""
    at = (place.stage, float(place.global_epoch), step)
    rows = [(*at, "train/loss", train.loss), (*at, "train/acc", train.acc),
            (*at, "val/loss", val_loss), (*at, "val/acc", val_acc),
            (*at, "epoch_s", train.seconds),
            (*at, "images_per_s", train.images / max(1e-9, train.seconds))]
    if stage_end is not StageEnd.NONE:  # where and why the stage ended, for the charts
        rows.append((*at, STAGE_END_KEY, float(stage_end)))
    return rows


def _onto_device(model: nn.Module, splits: DataSplits, runtime: Runtime) -> DataSplits:
    """Moves `model` to the runtime's device and layout; returns `splits` with the train and
    validation data where the trainer reads them (the GPU, when there is one)."""
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return DataSplits(_device_set(splits.train, runtime), _device_set(splits.val, runtime),
                      splits.test, splits.classes, splits.skipped, splits.source)


def _stage_features(model: nn.Module, stage: StageConfig, data: ImageSet, pre: Preprocess,
                    runtime: Runtime, report: Callable[[], None]) -> torch.Tensor | None:
    """The frozen prefix's cached outputs when the stage caches them (`report` first)."""
    prefix = cached_prefix(stage)
    if not prefix:
        return None
    report()
    return compute_features(model, data, prefix, pre, runtime)


def _stage_optimizer(model: nn.Module, stage: StageConfig, steps_in_epoch: int, runtime: Runtime,
                     resumed: TrainingState | None) -> tuple[torch.optim.Optimizer, Any]:
    """Makes the stage's layer groups trainable; returns its optimizer and LR scheduler,
    continued from `resumed`'s saved state when the stage resumes mid-way."""
    set_trainable(model, stage.groups)
    optimizer = make_optimizer(model, stage, fused=runtime.fused_optimizer)
    scheduler = make_scheduler(optimizer, stage, steps_in_epoch)
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
    return optimizer, scheduler


def _starting_point(model: nn.Module, generator: torch.Generator, resume: ResumeState | None,
                    ) -> tuple[tuple[float, int, int], int, PlateauState, int]:
    """(best (val_acc, stage, epoch), optimizer steps, plateau counters, global epochs done)
    where the run starts: from scratch, or after `resume`'s saved epoch (its weights and
    data order are loaded here)."""
    if resume is None:
        return (-1.0, 0, 0), 0, PlateauState(), 0
    state = resume.training
    model.load_state_dict(resume.model_state)
    generator.set_state(state.rng)
    return ((state.best_val_acc, state.best_stage, state.best_epoch), state.step,
            resume.plateau, state.global_epoch)


def run_stages(model: nn.Module, cfg: RunConfig, splits: DataSplits, pre: Preprocess,
               runtime: Runtime, hooks: TrainHooks, resume: ResumeState | None = None,
               ) -> TrainingResult:
    """Train every stage of `cfg` in order on one model. Raises Cancelled when stopped."""
    start = time.perf_counter()
    splits = _onto_device(model, splits, runtime)
    generator = _resolve_generator(cfg.seed)
    spe = steps_per_epoch(len(splits.train), cfg.batch_size)
    clock = EpochClock(cfg.total_epochs)
    best, step, plateau, last_epoch = _starting_point(model, generator, resume)
    resumed = resume.training if resume is not None else None  # state after the saved epoch
    global_epoch = 0
    for s_idx, stage in enumerate(cfg.stages, 1):
        first_epoch_global = global_epoch
        global_epoch += stage.epochs  # nominal: an early-ended stage keeps its span
        if plateau.stage_end is StageEnd.EARLY_STOP:
            break  # the run stopped early (before an interruption, when resumed)
        done_in_stage = max(0, resumed.global_epoch - first_epoch_global) if resumed is not None else 0
        if resumed is not None and (global_epoch <= resumed.global_epoch or (
                plateau.stage_end is not StageEnd.NONE and done_in_stage)):
            continue  # stage already ended before the interruption
        optimizer, scheduler = _stage_optimizer(model, stage, spe, runtime,
                                                resumed if done_in_stage else None)
        threads = stage_threads(runtime, resumed.threads if done_in_stage else 0)
        if threads is not None:
            torch.set_num_threads(threads)
        features = _stage_features(model, stage, splits.train, pre, runtime, lambda: hooks.on_progress(
            {"phase": "caching features", "stage": s_idx, "stages": len(cfg.stages),
             "fraction": first_epoch_global / cfg.total_epochs}))
        step_graph = StepGraph()  # the stage's training step, captured once on CUDA
        if not done_in_stage:  # a resume mid-stage goes on with its counters, logged the row
            plateau = plateau.next_stage()
            hooks.on_metrics([(s_idx, float(first_epoch_global), step, "trainable_params",
                               float(count_parameters(model, stage.groups)))]
                             + ([(s_idx, float(first_epoch_global), step, THREADS_KEY, float(threads))]
                                if threads is not None else []))
        for epoch in range(done_in_stage + 1, stage.epochs + 1):
            place = EpochPlace(s_idx, len(cfg.stages), epoch, stage.epochs,
                               first_epoch_global + epoch, cfg.total_epochs)
            reporter = EpochReporter(place, step, spe, clock, hooks)
            clock.start_epoch()
            train_metrics = train_one_epoch(
                model, splits.train, pre, runtime, optimizer, scheduler, stage.groups,
                stage.bn_policy, cfg.batch_size, cfg.augment and features is None, generator,
                reporter.on_step, hooks.should_stop, features, step_graph)
            val_loss, val_acc, _ = evaluate(model, splits.val, pre, runtime,
                                            on_batch=reporter.on_val_batch)
            clock.end_epoch()
            # Before anything is recorded or saved: a diverged epoch writes no row and no
            # checkpoint, so best.pt and last.pt stay those of the last sound epoch.
            check_finite(place, "loss", train_metrics.loss)
            check_finite(place, "validation loss", val_loss)
            step, is_best = reporter.step, val_acc > best[0]
            if is_best:
                best = (val_acc, s_idx, epoch)
            plateau = plateau.after_epoch(val_acc, is_best, stage, epoch,
                                          s_idx == len(cfg.stages), cfg.early_stop_patience)
            last_epoch = place.global_epoch
            hooks.on_metrics(epoch_rows(place, step, train_metrics, val_loss, val_acc,
                                        plateau.stage_end))
            hooks.on_epoch_end(EpochEnd(
                model=model, stage=s_idx, epoch=epoch, global_epoch=place.global_epoch,
                step=step, train=train_metrics, val_loss=val_loss, val_acc=val_acc,
                is_best=is_best, stage_end=plateau.stage_end, training_state=TrainingState.capture(
                    place.global_epoch, step, optimizer, scheduler, generator, best, plateau,
                    threads or 0)))
            if plateau.stage_end is not StageEnd.NONE:
                break
    return TrainingResult(best_val_acc=best[0], best_stage=best[1], best_epoch=best[2],
                          epochs_run=last_epoch, seconds=time.perf_counter() - start)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> list[list[int]]:
    cm = torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2)
    return cm.view(num_classes, num_classes).tolist()
