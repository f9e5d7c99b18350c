"""Time to accuracy, end to end: a real transfer fine-tune through the app's own run path
against the plain torchvision recipe, same data, same backbone, same seed.

    python -m benchmarks.time_to_accuracy [--quick] [--data DIR] [--configs NAMES]

The task: a ResNet-18 pretrained (from random weights, 32x32) on five CIFAR-10 classes
(airplane, automobile, bird, cat, deer) is fine-tuned on the other five (dog, frog, horse,
ship, truck). The backbone is trained once with our trainer and cached under
~/.cache/finetune-lab-bench/ (`--backbone FILE` uses another state_dict).

- plain: torchvision ImageFolder + RandomCrop(32, padding=4) + RandomHorizontalFlip +
  ToTensor + Normalize, a DataLoader with 2 workers, every layer trained (freezing, for
  the stages of a preset, would be requires_grad), model.train(), SGD-momentum 0.9, lr
  0.01, weight decay 5e-4, cosine over its epochs; after every epoch, validation accuracy
  with a DataLoader under no_grad. No checkpoints.
- ours: `core.runs.worker.execute_run` on a run created in a real RunStore in a temporary
  folder: decoding the JPEGs (first run: no decoded cache yet), checkpoints (best, last with
  optimizer state, stage ends), evaluation, metric rows, progress, weight-change tracking,
  the final test evaluation: everything a user's run pays. One run per config in
  `--configs` (the presets as a user picks them, and hand-picked recipes).

The train/validation split is the app's (stratified, seeded, `max_train_images` cap in
`--quick`), and the plain recipe trains and validates on exactly those files. Reported:
the wall time from the start until validation accuracy first reaches the target (default:
the plain recipe's best validation accuracy), each run's best validation and final test
accuracy, and ours' per-epoch overheads (evaluation, end-of-epoch checkpoints and weight
change, metric logging) as a share of the epoch. The last line printed is one JSON object:
`time_to_target_s` (per config and plain), `speedup` (plain's time / ours), `overhead_share`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.summary import emit_summary
from benchmarks.throughput import DEFAULT_DATA, cpu_model, log, plain_transforms
from core import config as cfgmod
from core.engine.data import ImageSet, cap_stratified, scan_folder, stratified_split
from core.engine.train import CPU_BF16_ENV, cpu_has_native_bf16

PRETRAIN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
FINETUNE_CLASSES = ("dog", "frog", "horse", "ship", "truck")
BENCH_CACHE = Path.home() / ".cache" / "finetune-lab-bench"
SEED = 0  # the backbone's seed, and the fine-tune's unless --seed says otherwise


@dataclass(frozen=True)
class Task:
    """Which classes the backbone learns and which it is fine-tuned on; `seed` drives the
    fine-tune's split, initialisation of the new head and data order (the backbone's stays
    SEED). `mirrored()` swaps the two class sets: the out-of-sample task for the presets,
    which were chosen on the original one."""

    pretrain: tuple[str, ...] = PRETRAIN_CLASSES
    finetune: tuple[str, ...] = FINETUNE_CLASSES
    seed: int = SEED

    def mirrored(self) -> Task:
        return Task(self.finetune, self.pretrain, self.seed)
VAL_FRACTION = 0.1

L4, L34, L234 = ("layer4", "fc"), ("layer3", "layer4", "fc"), ("layer2", "layer3", "layer4", "fc")


def _stage(groups: tuple[str, ...], epochs: int, lr: float, cache: bool = False,
           schedule: str = "onecycle", warmup: float = 0.0) -> cfgmod.StageConfig:
    """A hand-picked stage; `warmup` in epochs (with one-cycle: its rising phase)."""
    return cfgmod.StageConfig(groups=groups, epochs=epochs, lr=lr, schedule=schedule,
                              feature_cache=cache, warmup_epochs=warmup)


# Configs a user can pick (the presets at their defaults) and hand-picked recipes.
# name -> (stages, batch size)
CONFIGS: dict[str, tuple[tuple[cfgmod.StageConfig, ...], int]] = {
    "preset Two-stage": (cfgmod.preset_stages("Two-stage"), 128),
    "preset All at once": (cfgmod.preset_stages("All at once"), 128),
    "preset Fast transfer": (cfgmod.preset_stages("Fast transfer"), 128),
    "all layers 2 ep one-cycle lr 0.03": (
        (cfgmod.StageConfig(groups=cfgmod.LAYER_GROUPS, epochs=2, lr=0.03, schedule="onecycle"),), 128),
    "all layers 1 ep one-cycle lr 0.03": (
        (cfgmod.StageConfig(groups=cfgmod.LAYER_GROUPS, epochs=1, lr=0.03, schedule="onecycle"),), 128),
    "two-stage 1+1 ep one-cycle lr 0.03": (
        (cfgmod.StageConfig(groups=("layer4", "fc"), epochs=1, lr=0.03, schedule="onecycle"),
         cfgmod.StageConfig(groups=cfgmod.LAYER_GROUPS, epochs=1, lr=0.03, schedule="onecycle")), 128),
    # Stages on the frozen prefix's cached outputs (no augmentation, a fraction of an
    # epoch's cost), some followed by a short all-layers stage: the candidates measured for
    # the Fast transfer preset (its table in benchmarks/README.md). "cache l2+l3+l4 2 ep
    # cosine lr 0.05" is the preset at its defaults.
    "cache l3+l4 3 ep one-cycle lr 0.03": (
        (_stage(L34, 3, 0.03, cache=True),), 128),
    "cache l4 2 ep -> all 1 ep one-cycle lr 0.03": (
        (_stage(L4, 2, 0.03, cache=True), _stage(cfgmod.LAYER_GROUPS, 1, 0.03)), 128),
    "cache l3+l4 2 ep -> all 1 ep one-cycle lr 0.03": (
        (_stage(L34, 2, 0.03, cache=True), _stage(cfgmod.LAYER_GROUPS, 1, 0.03)), 128),
    "cache l3+l4 1 ep one-cycle lr 0.03": ((_stage(L34, 1, 0.03, cache=True),), 128),
    "cache l3+l4 2 ep one-cycle lr 0.03": ((_stage(L34, 2, 0.03, cache=True),), 128),
    "cache l3+l4 1 ep one-cycle lr 0.01": ((_stage(L34, 1, 0.01, cache=True),), 128),
    "cache l3+l4 2 ep one-cycle lr 0.01": ((_stage(L34, 2, 0.01, cache=True),), 128),
    "cache l2+l3+l4 2 ep one-cycle lr 0.03": ((_stage(L234, 2, 0.03, cache=True),), 128),
    "cache l2+l3+l4 2 ep one-cycle lr 0.05": ((_stage(L234, 2, 0.05, cache=True),), 128),
    "cache l2+l3+l4 2 ep cosine lr 0.03": (
        (_stage(L234, 2, 0.03, cache=True, schedule="cosine"),), 128),
    "cache l2+l3+l4 3 ep one-cycle lr 0.03": ((_stage(L234, 3, 0.03, cache=True),), 128),
    "cache l3+l4 2 ep one-cycle lr 0.05": ((_stage(L34, 2, 0.05, cache=True),), 128),
    "cache l3+l4 2 ep cosine lr 0.03": ((_stage(L34, 2, 0.03, cache=True, schedule="cosine"),), 128),
    "cache l3+l4 2 ep cosine lr 0.05": ((_stage(L34, 2, 0.05, cache=True, schedule="cosine"),), 128),
    "cache l3+l4 2 ep one-cycle (0.3 ep up) lr 0.05": (
        (_stage(L34, 2, 0.05, cache=True, warmup=0.3),), 128),
    "cache l2+l3+l4 2 ep cosine lr 0.05": (
        (_stage(L234, 2, 0.05, cache=True, schedule="cosine"),), 128),
    "cache l2+l3+l4 2 ep one-cycle (0.3 ep up) lr 0.05": (
        (_stage(L234, 2, 0.05, cache=True, warmup=0.3),), 128),
    "l3+l4 2 ep one-cycle lr 0.03": ((_stage(L34, 2, 0.03),), 128),
    "all layers 1 ep one-cycle lr 0.05": ((_stage(cfgmod.LAYER_GROUPS, 1, 0.05),), 128),
}
DEFAULT_CONFIGS = ("preset Two-stage", "preset All at once", "preset Fast transfer",
                   "all layers 2 ep one-cycle lr 0.03")


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (DataLoader
    workers): on a shared machine less distorted by other load than wall time."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a worker that just exited
            pass
    return total


# ---------------------------------------------------------------- the backbone


def pretrained_backbone(data_root: Path, images: int, epochs: int,
                        classes: tuple[str, ...] = PRETRAIN_CLASSES) -> Path:
    """A ResNet-18 trained from random weights on `classes` with our trainer, cached."""
    tag = "" if classes == PRETRAIN_CLASSES else "-" + "-".join(c[:3] for c in classes)
    path = BENCH_CACHE / f"resnet18-cifar5{tag}-{images}img-{epochs}ep-seed{SEED}.pth"
    if path.exists():
        return path
    from core.engine.checkpoints import atomic_torch_save
    from core.engine.data import Preprocess, load_splits
    from core.engine.model import build_resnet18, physical_cores
    from core.engine.train import TrainHooks, default_runtime, run_stages

    torch.set_num_threads(physical_cores())
    pre = Preprocess(32)
    splits = load_splits("folder", str(data_root), pre, classes, VAL_FRACTION,
                         max_train_images=images, seed=SEED, cache_dir=BENCH_CACHE / "decoded")
    cfg = cfgmod.RunConfig(stages=(cfgmod.StageConfig(groups=cfgmod.LAYER_GROUPS, epochs=epochs,
                                                      lr=0.05, schedule="onecycle"),),
                           weights="random", seed=SEED)
    torch.manual_seed(SEED)
    model = build_resnet18(len(classes))
    t0 = time.perf_counter()
    # Threads as a worker chooses them (from the CPU free at the start: a shared machine).
    runtime = replace(default_runtime(torch.device("cpu")), cpu_threads=0)
    res = run_stages(model, cfg, splits, pre, runtime, TrainHooks())
    log(f"pretrained the backbone on {len(splits.train):,} images of {', '.join(classes)}: "
        f"{epochs} epochs, {time.perf_counter() - t0:.0f} s, final val acc {res.best_val_acc:.1%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------- the app's split, as files


def app_split_files(train_dir: Path, max_train: int, task: Task = Task(),
                    ) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """(train paths, labels, val paths, labels) exactly as core.engine.data.load_splits
    splits the task's fine-tuning classes of `train_dir`: the same functions on the file
    indices."""
    names, per_class, _ = scan_folder(train_dir, task.finetune)
    paths = [p for files in per_class for p in files]
    labels = torch.tensor([i for i, files in enumerate(per_class) for _ in files])
    index = ImageSet(torch.arange(len(paths)), labels, names)  # "images" = file indices
    capped = cap_stratified(index, max_train, task.seed)
    rest, held = stratified_split(capped.labels, VAL_FRACTION, task.seed)
    train, val = capped.subset(rest), capped.subset(held)
    return ([paths[i] for i in train.images.tolist()], train.labels.tolist(),
            [paths[i] for i in val.images.tolist()], val.labels.tolist())


# ---------------------------------------------------------------- the plain recipe


@dataclass
class Curve:
    """Validation accuracy after each epoch and the wall seconds since the start then."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (seconds, val acc)
    cpu_points: list[float] = field(default_factory=list)  # CPU seconds at each point
    test_acc: float | None = None
    epoch_overheads: list[dict[str, float]] = field(default_factory=list)
    notes: str = ""

    def time_to(self, target: float) -> float | None:
        return next((t for t, acc in self.points if acc >= target - 1e-9), None)

    def cpu_to(self, target: float) -> float | None:
        return next((c for (_, acc), c in zip(self.points, self.cpu_points, strict=True)
                     if acc >= target - 1e-9), None)

    @property
    def best(self) -> float:
        return max((a for _, a in self.points), default=0.0)


class _Files(torch.utils.data.Dataset):
    """(path, label) pairs read the way ImageFolder reads them (its loader, RGB)."""

    def __init__(self, paths, labels, transform):
        from torchvision.datasets.folder import default_loader

        self.paths, self.labels, self.transform, self.loader = paths, labels, transform, default_loader

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.loader(str(self.paths[i]))), self.labels[i]


def plain_run(split, backbone: Path, epochs: int, test_dir: Path, task: Task = Task()) -> Curve:
    from torch.utils.data import DataLoader

    from core.engine.model import build_model, physical_cores

    tr_paths, tr_labels, va_paths, va_labels = split
    torch.set_num_threads(physical_cores())
    curve = Curve("plain")
    t0, c0 = time.perf_counter(), cpu_seconds()
    torch.manual_seed(task.seed)
    model = build_model(len(task.finetune), "file", str(backbone)).model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(task.seed)
    train = DataLoader(_Files(tr_paths, tr_labels, plain_transforms(True)), batch_size=128,
                       shuffle=True, num_workers=2, generator=g, persistent_workers=True)
    val = DataLoader(_Files(va_paths, va_labels, plain_transforms(False)), batch_size=512,
                     num_workers=2, persistent_workers=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train))
    for _ in range(epochs):
        model.train()
        e0 = time.perf_counter()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        e1 = time.perf_counter()
        acc = _loader_accuracy(model, val)
        now = time.perf_counter()
        curve.points.append((now - t0, acc))
        curve.cpu_points.append(cpu_seconds() - c0)
        curve.epoch_overheads.append({"epoch_s": now - e0, "evaluation": now - e1})
        log(f"  plain epoch {len(curve.points)}: val acc {acc:.2%} at {now - t0:.1f} s "
            f"(training {e1 - e0:.1f} s, validation {now - e1:.1f} s)")
    del train, val
    names, per_class, _ = scan_folder(test_dir, task.finetune)
    test = DataLoader(_Files([p for f in per_class for p in f],
                             [i for i, f in enumerate(per_class) for _ in f], plain_transforms(False)),
                      batch_size=512, num_workers=2)
    curve.test_acc = _loader_accuracy(model, test)
    return curve


def _loader_accuracy(model, loader) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return correct / max(1, n)


# ---------------------------------------------------------------- ours, through the app


def ours_run(name: str, stages, batch: int, data_root: Path, backbone: Path, max_train: int,
             store_root: Path, task: Task = Task()) -> Curve:
    from core.runs.store import RunStore
    from core.runs.worker import execute_run

    store = RunStore(store_root)
    cfg = cfgmod.RunConfig(stages=stages, data_source="folder", data_path=str(data_root),
                           classes=task.finetune, val_fraction=VAL_FRACTION,
                           max_train_images=max_train, batch_size=batch, seed=task.seed,
                           weights="file", weights_path=str(backbone), device="cpu")
    run = store.create_run(cfgmod.check(cfg), name=name)
    assert store.claim_run_now(run.id, os.getpid())
    events: list[tuple[float, float, object]] = []  # (perf_counter, CPU seconds, RunProgress)
    t0, c0 = time.perf_counter(), cpu_seconds()
    # Instrumentation only: time the recorder's end-of-epoch work (checkpoints, weight
    # change, metric rows) around the real method.
    from core.runs import recorder as recmod

    real_end = recmod.RunRecorder.on_epoch_end
    epoch_ends: dict[int, tuple[float, float, float]] = {}  # global epoch -> (start, end, CPU s)

    def timed_end(self, end):
        a = time.perf_counter()
        real_end(self, end)
        epoch_ends[end.global_epoch] = (a, time.perf_counter(), cpu_seconds() - c0)

    recmod.RunRecorder.on_epoch_end = timed_end
    try:
        status = execute_run(store, run.id, on_progress=lambda p: events.append(
            (time.perf_counter(), cpu_seconds() - c0, p)))
    finally:
        recmod.RunRecorder.on_epoch_end = real_end
    t_end = time.perf_counter()
    if status != "finished":
        raise RuntimeError(f"{name}: run ended {status}: {store.get_run(run.id).error}")
    rows = store.metrics(run.id)
    val_rows = sorted((r for r in rows if r.key == "val/acc"), key=lambda r: r.epoch)
    train_s = {int(r.epoch): r.value for r in rows if r.key == "epoch_s"}
    logged = [r for r in rows if r.key in ("train/step_loss", "lr")]
    curve = Curve(name)
    loading = next((t for t, _, p in events if p.phase != "loading data"), t_end) - t0
    prev_end = t0 + loading
    for r in val_rows:
        e = int(r.epoch)
        validating = next(t for t, _, p in events if p.phase == "validating" and p.global_epoch == e)
        ckpt_start, end, cpu = epoch_ends[e]
        curve.points.append((end - t0, r.value))
        curve.cpu_points.append(cpu)
        curve.epoch_overheads.append({
            "epoch_s": end - prev_end, "training": train_s.get(e, float("nan")),
            "evaluation": ckpt_start - validating,  # evaluate() and the epoch's metric rows
            "end_of_epoch": end - ckpt_start,  # checkpoints, weight change
            "log_rows": len([x for x in logged if e - 1 < x.epoch <= e]),
        })
        prev_end = end
    curve.test_acc = store.get_run(run.id).test_acc
    curve.notes = f"loading the decoded data from the store's cache: {loading:.1f} s"
    for i, (t, acc) in enumerate(curve.points):
        o = curve.epoch_overheads[i]
        log(f"  {name} epoch {i + 1}: val acc {acc:.2%} at {t:.1f} s (epoch {o['epoch_s']:.1f} s: "
            f"training {o['training']:.1f}, evaluation {o['evaluation']:.2f}, checkpoints and "
            f"weight change {o['end_of_epoch']:.2f})")
    return curve


def decode_once(data_root: Path, max_train: int, store_root: Path, task: Task = Task()) -> float:
    """Seconds the app's first run on this data set spends decoding it into the store's
    cache (what load_splits does with a cold cache)."""
    from core.engine.data import Preprocess, load_splits
    from core.runs.store import RunStore

    store = RunStore(store_root)
    t0 = time.perf_counter()
    load_splits("folder", str(data_root), Preprocess(32), task.finetune, VAL_FRACTION,
                max_train_images=max_train, seed=task.seed, cache_dir=store.layout.cache)
    return time.perf_counter() - t0


def logging_cost_s(store_root: Path, rows_per_call: int = 2, calls: int = 20) -> float:
    """Seconds of one metric write of the kind the trainer makes during an epoch."""
    from core.runs.store import RunStore

    store = RunStore(store_root)
    run = store.create_run(cfgmod.RunConfig(), name="logging cost")
    t0 = time.perf_counter()
    for i in range(calls):
        store.log_metrics(run.id, [(1, i / calls, i, "train/step_loss", 1.0)] * rows_per_call)
    return (time.perf_counter() - t0) / calls


def overhead_share(curve: Curve, log_call_s: float) -> dict[str, float]:
    """Mean share of ours' epoch wall time spent outside the training steps' arithmetic."""
    shares: dict[str, list[float]] = {}
    for o in curve.epoch_overheads:
        ep = o["epoch_s"]
        parts = {"evaluation": o["evaluation"], "checkpoints_and_weight_change": o["end_of_epoch"],
                 "logging": o.get("log_rows", 0) / 2 * log_call_s}
        parts["total"] = sum(parts.values())
        for k, v in parts.items():
            shares.setdefault(k, []).append(v / ep if ep > 0 else 0.0)
    return {k: round(statistics.mean(v), 4) for k, v in shares.items()}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="5,000 fine-tuning images (4,500 train / 500 val), a smaller backbone run, "
                         "3 plain epochs: a few minutes")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 as train/ and test/ class folders")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"ours' configs, comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--plain-epochs", type=int, default=0, help="0 = 3 (--quick) or 4")
    ap.add_argument("--target", type=float, default=0.0,
                    help="validation accuracy to reach (0 = the plain recipe's best)")
    ap.add_argument("--images", type=int, default=0,
                    help="fine-tuning images before the split (0 = 5,000 with --quick, else all 25,000)")
    ap.add_argument("--backbone", default="", help="a ResNet-18 state_dict to start from instead")
    ap.add_argument("--backbone-images", type=int, default=-1,
                    help="images the backbone is pretrained on (-1 = 5,000 with --quick, else all)")
    ap.add_argument("--backbone-epochs", type=int, default=0, help="0 = 6 (--quick) or 15")
    ap.add_argument("--mirrored", action="store_true",
                    help="swap the class sets: pretrain on dog..truck, fine-tune on airplane..deer "
                         "(a task the presets were not chosen on)")
    ap.add_argument("--seed", type=int, default=SEED,
                    help="the fine-tune's seed (split, new head, data order); the backbone's stays 0")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    import logging

    logging.basicConfig(level=logging.WARNING)
    data_root = Path(args.data).expanduser()
    quick = args.quick
    max_train = args.images or (5000 if quick else 0)  # 0 = all 25,000 (22,500 train / 2,500 val)
    plain_epochs = args.plain_epochs or (3 if quick else 4)
    started_load = os.getloadavg()
    task = Task(seed=args.seed)
    task = task.mirrored() if args.mirrored else task
    log(f"== Time to accuracy: fine-tune on {', '.join(task.finetune)} from a backbone "
        f"pretrained on {', '.join(task.pretrain)}, seed {task.seed} ==")
    log(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
        f"bf16 used on CPU: {cpu_has_native_bf16()} (${CPU_BF16_ENV}="
        f"{os.environ.get(CPU_BF16_ENV, 'unset')})")
    bb_images = args.backbone_images if args.backbone_images >= 0 else (5_000 if quick else 0)
    bb_epochs = args.backbone_epochs or (6 if quick else 15)
    backbone = Path(args.backbone) if args.backbone else pretrained_backbone(
        data_root / "train", bb_images, bb_epochs, task.pretrain)
    log(f"backbone: {backbone}")

    split = app_split_files(data_root / "train", max_train, task)
    log(f"data: {len(split[0]):,} train / {len(split[2]):,} validation images (the app's split), "
        f"test: all of {data_root / 'test'} for these classes")

    log(f"\nplain recipe, all layers, {plain_epochs} epochs:")
    plain = plain_run(split, backbone, plain_epochs, data_root / "test", task)
    target = args.target or plain.best
    log(f"target validation accuracy: {target:.2%}" + ("" if args.target else " (the plain recipe's best)"))

    curves = [plain]
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        store_root = Path(tmp) / "store"
        log_call_s = logging_cost_s(Path(tmp) / "cost")
        decode_s = decode_once(data_root, max_train, store_root, task)
        log(f"\nours decodes the JPEGs once per data set into the store's cache: {decode_s:.1f} s "
            f"(counted once below as 'first run'; later runs load the cache)")
        for name in names:
            stages, batch = CONFIGS[name]
            log(f"\nours: {name} ({' -> '.join(f'{s.trains} {s.epochs} ep {s.schedule} lr {s.lr:g}' for s in stages)}):")
            curves.append(ours_run(name, stages, batch, data_root, backbone, max_train,
                                   store_root, task))
            log(f"  {curves[-1].notes}")

    t_plain = plain.time_to(target)
    log(f"\n{'run':40s} {'best val':>9s} {'test':>7s} {'to target':>10s} {'speed-up':>9s} "
        f"{'CPU s to target':>16s} {'total':>8s}")
    summary_t, speedup, shares, cpu_t, cpu_speedup = {}, {}, {}, {}, {}
    c_plain = plain.cpu_to(target)
    for c in curves:
        t = c.time_to(target)
        summary_t[c.name] = round(t, 1) if t is not None else None
        sp = (t_plain / t) if (t and t_plain) else None
        ct = c.cpu_to(target)
        cpu_t[c.name] = round(ct, 1) if ct is not None else None
        if c is not plain:
            speedup[c.name] = round(sp, 2) if sp else None
            cpu_speedup[c.name] = round(c_plain / ct, 2) if (ct and c_plain) else None
            shares[c.name] = overhead_share(c, log_call_s)
        log(f"{c.name:40s} {c.best:9.2%} {c.test_acc or 0:7.2%} "
            f"{(f'{t:.1f} s' if t is not None else 'never'):>10s} "
            f"{(f'{sp:.2f}x' if sp else '-'):>9s} "
            f"{(f'{ct:.0f} s' if ct is not None else 'never'):>16s} {c.points[-1][0]:7.1f}s")
    log("\nours' per-epoch overheads, share of the epoch's wall time (mean over epochs):")
    for n, s in shares.items():
        log(f"  {n:40s} " + ", ".join(f"{k} {v:.1%}" for k, v in s.items()))
    plain_eval = statistics.mean(o["evaluation"] / o["epoch_s"] for o in plain.epoch_overheads)
    log(f"  {'plain (validation only)':40s} evaluation {plain_eval:.1%}")
    summary = {
        "machine": cpu_model(), "bf16": cpu_has_native_bf16(), "quick": quick,
        "pretrain_classes": list(task.pretrain), "finetune_classes": list(task.finetune),
        "seed": task.seed, "mirrored": args.mirrored, "plain_epochs": plain_epochs,
        "backbone": str(backbone), "backbone_images": bb_images, "backbone_epochs": bb_epochs,
        "train_images": len(split[0]), "val_images": len(split[2]), "target_val_acc": round(target, 4),
        "time_to_target_s": summary_t, "speedup": speedup,
        "cpu_s_to_target": cpu_t, "cpu_speedup": cpu_speedup, "overhead_share": shares,
        "best_val_acc": {c.name: round(c.best, 4) for c in curves},
        "test_acc": {c.name: round(c.test_acc, 4) if c.test_acc is not None else None for c in curves},
        "decode_once_s": round(decode_s, 1),
        "time_to_target_first_run_s": {c.name: (round(summary_t[c.name] + decode_s, 1)
                                                if summary_t[c.name] is not None else None)
                                        for c in curves if c is not plain},
        "total_s": {c.name: round(c.points[-1][0], 1) for c in curves},
        "curves": {c.name: [(round(t, 1), round(a, 4)) for t, a in c.points] for c in curves},
    }
    emit_summary(summary, args.json_out, bench="time_to_accuracy", started_load=started_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
