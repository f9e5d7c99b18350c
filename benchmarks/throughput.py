"""Training throughput: the plain way vs our trainer vs our trainer with the feature cache.

    python -m benchmarks.throughput [--quick] [--device cpu|cuda] [--data DIR]

Measures in ONE process, interleaved round by round (so load from other processes hits
every variant alike), training images per second at 32x32, batch 128, random weights, for
stage 1 (layer4+fc), stage 2 (layer3+layer4+fc) and all layers:

  (a) plain: torchvision ImageFolder + RandomCrop(32, padding=4) + RandomHorizontalFlip +
      ToTensor + Normalize through a DataLoader with one worker per logical CPU; freezing by
      requires_grad only; the model in train() mode; SGD-momentum. The tutorial end to end,
      JPEG decoding included: `speedup` (b/a).
  (d) plain on tensors: the same loop on the same in-memory uint8 tensors ours trains on
      (decoded once), augmented the ordinary torchvision way per image on tensors
      (transforms.v2 RandomCrop + RandomHorizontalFlip + ToDtype + Normalize) in a DataLoader
      with one worker per logical CPU: what ours' training arithmetic gains, without the
      JPEG decoder in the comparison: `compute_speedup` (b/d). On CUDA also (d16): the same
      under torch.autocast(bfloat16), what a user would try first.
  (b) ours:  core.engine.train.train_one_epoch with core.engine.train.default_runtime (decoded uint8
      tensors in memory, batched augmentation, no DataLoader workers, frozen prefix without
      autograd and BN-folded, single-pixel layer4 as matrix products, ...).
  (c) ours + the frozen-feature cache (stages with a frozen prefix): only the suffix trains
      on cached prefix outputs; the one-off caching cost is reported beside it.
  (e) on CUDA only: ours with every step eager ($FINETUNE_LAB_CUDA_GRAPHS=0's runtime), to
      show what replaying the step as a CUDA graph brings ((b) and (c) use the graphs).

Also: seconds per epoch on 50,000 images, evaluation images/s, peak resident memory,
achieved FLOP/s against the CPU's fp32 peak, and a short accuracy comparison (fp32 vs the
default runtime vs the feature cache). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.summary import emit_summary
from core import config as cfgmod
from core.config import LAYER_GROUPS
from core.engine.data import DataSplits, ImageSet, Preprocess, decode_files, scan_folder, stratified_split
from core.engine.model import build_resnet18, frozen_prefix, physical_cores, set_trainable
from core.engine.train import (
    CPU_BF16_ENV,
    GRAPH_WARMUP_STEPS,
    Runtime,
    StepGraph,
    TrainHooks,
    compute_features,
    cpu_has_native_bf16,
    default_runtime,
    evaluate,
    make_optimizer,
    make_scheduler,
    run_stages,
    train_one_epoch,
)

BATCH = 128
STAGES = {
    "stage1": ("layer4", "fc"),
    "stage2": ("layer3", "layer4", "fc"),
    "all": LAYER_GROUPS,
}
DEFAULT_DATA = Path.home() / ".cache" / "cifar10-jpg"
EPOCH_IMAGES = 50_000  # CIFAR-10's training set


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> tuple[set[str], str, int]:
    flags, vendor, family = set(), "", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("cpu family"):
                    family = int(line.split(":", 1)[1])
    except OSError:
        pass
    return flags, vendor, family


def clock_ghz() -> float:
    """Base clock (max if cpufreq says it; else the current MHz /proc/cpuinfo reports)."""
    p = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if p.exists():
        return int(p.read_text()) / 1e6
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000
    except OSError:
        pass
    return 2.0


def cpu_fp32_peak(cores: int) -> tuple[float, str]:
    """fp32 peak FLOP/s = cores x clock x FMA units x SIMD lanes x 2 (an FMA is 2 FLOPs),
    from what the CPU flags say; the FMA unit count is not in the flags and is assumed."""
    flags, vendor, family = cpu_flags()
    ghz = clock_ghz()
    if "avx512f" in flags:
        lanes, units = 16, 2
        if vendor == "AuthenticAMD" and family == 25:
            # Zen 4 runs 512-bit FMAs on two 256-bit pipes: one 512-bit FMA per cycle.
            units, why = 1, "AVX-512 (Zen 4: 512-bit FMAs on 2x256-bit pipes = 1 per cycle)"
        else:
            why = "AVX-512, assuming 2 FMA units"
    elif "fma" in flags and "avx2" in flags:
        lanes, units, why = 8, 2, "AVX2+FMA, assuming 2 FMA units"
    else:
        lanes, units, why = 4, 1, "SSE, 1 multiply-add unit assumed"
    peak = cores * ghz * 1e9 * units * lanes * 2
    text = (f"{cores} cores x {ghz:.2f} GHz x {units} FMA/cycle x {lanes} fp32 lanes x 2 FLOP "
            f"= {peak / 1e9:.0f} GFLOP/s ({why}; bf16 hardware: "
            f"{'yes' if {'avx512_bf16', 'amx_bf16'} & flags else 'no'}; used: "
            f"{'yes' if cpu_has_native_bf16() else 'no'}, ${CPU_BF16_ENV}="
            f"{os.environ.get(CPU_BF16_ENV, 'unset')})")
    return peak, text


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# ---------------------------------------------------------------- the plain way (a)


def plain_transforms(train: bool):
    from torchvision import transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train:
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.ToTensor(), norm])


def plain_tensor_transforms(train: bool):
    """The ordinary torchvision augmentation on a uint8 image tensor (transforms.v2)."""
    from torchvision.transforms import v2 as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*steps, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(list(Preprocess().mean), list(Preprocess().std))])


class TensorImages(torch.utils.data.Dataset):
    """In-memory uint8 images (N x 3 x H x W) and labels, a torchvision transform per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def plain_workers() -> int:
    """The plain way's DataLoader workers: one per logical CPU of the machine."""
    return os.cpu_count() or 1


class Plain:
    """The recipe as usually written: requires_grad freezing, model.train(), DataLoader.
    `source`: a JPEG folder (ImageFolder, decoded in the workers every epoch) or an
    ImageSet (the uint8 tensors in memory, augmented per image on tensors); `amp`: the
    forward under torch.autocast(bfloat16) (CUDA)."""

    def __init__(self, source, indices, groups, device, workers=0, amp=False):
        import torchvision

        if isinstance(source, ImageSet):
            self.ds = TensorImages(source.images.cpu(), source.labels.cpu(), plain_tensor_transforms(True))
        else:
            self.ds = torchvision.datasets.ImageFolder(str(source), transform=plain_transforms(True))
        self.indices, self.device, self.workers = list(indices), device, workers or plain_workers()
        self.amp = amp
        torch.manual_seed(0)
        self.model = build_resnet18(10).to(device)
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(name.startswith(g) for g in _group_prefixes(groups)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def window(self, n_batches: int, seed: int) -> float:
        """Images/s over `n_batches`, timed from the first batch's arrival (so DataLoader
        start-up, amortised over a real epoch, does not count)."""
        from torch.utils.data import DataLoader, Subset

        g = torch.Generator().manual_seed(seed)
        pick = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g)[:n_batches * BATCH]]
        loader = DataLoader(Subset(self.ds, pick), batch_size=BATCH, shuffle=True,
                            num_workers=self.workers, generator=g,
                            pin_memory=self.device.type == "cuda")
        self.model.train()
        it = iter(loader)
        first = next(it)
        t0 = time.perf_counter()
        images = 0
        for x, y in _chain(first, it):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            loss.item()
            images += len(y)
        _sync(self.device)
        return images / (time.perf_counter() - t0)


def _chain(first, it):
    yield first
    yield from it


def _group_prefixes(groups):
    from core.engine.model import GROUP_MODULES

    return tuple(f"{m}." for g in groups for m in GROUP_MODULES[g])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_eval_ips(folder, indices, device, model) -> float:
    import torchvision
    from torch.utils.data import DataLoader, Subset

    ds = torchvision.datasets.ImageFolder(str(folder), transform=plain_transforms(False))
    loader = DataLoader(Subset(ds, list(indices)), batch_size=512, num_workers=plain_workers(),
                        pin_memory=device.type == "cuda")
    model.eval()
    it = iter(loader)
    first = next(it)
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        for x, _ in _chain(first, it):
            model(x.to(device, non_blocking=True)).argmax(1).cpu()
            n += len(x)
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- ours (b) and (c)


class Ours:
    def __init__(self, data: ImageSet, groups, runtime: Runtime, pre: Preprocess):
        self.data, self.groups, self.runtime, self.pre = data, tuple(groups), runtime, pre
        torch.manual_seed(0)
        self.model = build_resnet18(len(data.classes)).to(runtime.device)
        if runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        set_trainable(self.model, self.groups)
        stage = cfgmod.StageConfig(groups=self.groups, epochs=1, lr=0.01, schedule="constant")
        self.opt = make_optimizer(self.model, stage, fused=runtime.fused_optimizer)
        self.sched = make_scheduler(self.opt, stage, 10**6)
        self.features: torch.Tensor | None = None
        self.cache_s = 0.0
        self.gen = torch.Generator().manual_seed(0)
        # One captured step per input kind, kept across windows as run_stages keeps it
        # across a stage's epochs.
        self.graphs = {False: StepGraph(), True: StepGraph()}

    def build_cache(self) -> float:
        """Compute the frozen prefix's features for every image; returns seconds."""
        _sync(self.runtime.device)
        t0 = time.perf_counter()
        self.features = compute_features(self.model, self.data, frozen_prefix(self.groups),
                                         self.pre, self.runtime)
        _sync(self.runtime.device)
        self.cache_s = time.perf_counter() - t0
        return self.cache_s

    def window(self, n_batches: int, seed: int, cached: bool = False) -> float:
        """Images/s of the real train_one_epoch over an 'epoch' of n_batches batches."""
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self.data), generator=g)[:n_batches * BATCH]
        sub = self.data.subset(pick)
        if sub.images.device != self.runtime.device and self.runtime.data_on_device:
            sub = ImageSet(sub.images.to(self.runtime.device), sub.labels.to(self.runtime.device),
                           sub.classes)
        feats = self.features[pick.to(self.features.device)] if cached else None
        _sync(self.runtime.device)
        m = train_one_epoch(self.model, sub, self.pre, self.runtime, self.opt, self.sched,
                            self.groups, "eval", BATCH, True, self.gen, lambda *a: None,
                            lambda: False, feats, self.graphs[cached])
        _sync(self.runtime.device)
        return m.images / m.seconds


# ---------------------------------------------------------------- FLOPs


def train_flops_per_image(groups, device, suffix_only: bool = False) -> float:
    """Useful FLOPs of one training step (forward + backward), per image, counted by
    torch.utils.flop_counter with freezing by requires_grad. Layer4's convolutions are
    counted as the matrix products they are at 32x32 (1x1 maps): counting the 3x3 kernels
    over zero padding would inflate layer4 nine-fold. With `suffix_only`, the suffix alone
    (what the feature cache runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from core.engine.model import forward_prefix, forward_suffix

    model = build_resnet18(10).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(g) for g in _group_prefixes(groups)))
    prefix = frozen_prefix(groups)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    if suffix_only:
        with torch.no_grad():
            x = forward_prefix(model, x, prefix)
    counter = FlopCounterMode(display=False)
    with counter:
        out = forward_suffix(model, x, prefix if suffix_only else [])
        F.cross_entropy(out, y).backward()
    return counter.get_total_flops() / BATCH


# ---------------------------------------------------------------- data


def load_ours(folder: Path, paths_labels, pre: Preprocess):
    paths, labels = paths_labels
    t0 = time.perf_counter()
    images, labels_t, _ = decode_files(paths, labels, pre)
    return images, labels_t, time.perf_counter() - t0


def folder_listing(folder: Path, limit: int, seed: int):
    """(paths, labels, ImageFolder indices) of a stratified `limit`-image subset."""
    import torchvision

    names, per_class, _ = scan_folder(folder)
    ds_index = {}
    # ImageFolder sorts classes and files the same way; map path -> its index there.
    imf = torchvision.datasets.ImageFolder(str(folder))
    for i, (p, _) in enumerate(imf.samples):
        ds_index[os.path.realpath(p)] = i
    paths = [p for files in per_class for p in files]
    labels = [i for i, files in enumerate(per_class) for _ in files]
    if limit and limit < len(paths):
        _, keep = stratified_split(torch.as_tensor(labels), limit / len(paths), seed)
        paths = [paths[i] for i in keep.tolist()]
        labels = [labels[i] for i in keep.tolist()]
    return names, paths, labels, [ds_index[os.path.realpath(p)] for p in paths]


# ---------------------------------------------------------------- accuracy check


def accuracy_check(data: ImageSet, classes, device, epochs: int, groups=("layer4", "fc"),
                   with_cache: bool = True, max_images: int = 0, n_val_frac=0.2):
    """One stage training `groups` for `epochs` epochs, from the same weights and data
    order, with the fp32 reference runtime, the default runtime, and (stages with a frozen
    prefix) default + feature cache. Returns {variant: (best val acc, seconds)}."""
    if max_images and len(data) > max_images:
        _, keep = stratified_split(data.labels.cpu(), max_images / len(data), 1)
        data = data.subset(keep.to(data.labels.device))
    rest, held = stratified_split(data.labels.cpu(), n_val_frac, 0)
    rest, held = rest.to(data.labels.device), held.to(data.labels.device)
    splits = DataSplits(data.subset(rest), data.subset(held), data.subset(held[:2]), classes, [], "bench")
    pre = Preprocess(32)
    base = Runtime(device)  # fp32, contiguous, unfused: the reference
    stage = cfgmod.StageConfig(groups=tuple(groups), epochs=epochs, lr=0.05, schedule="cosine")
    out = {}
    variants = [("fp32 reference", base, False), ("default runtime", default_runtime(device), False)]
    if default_runtime(device).cuda_graphs:  # the same, every step eager: graphs change no result
        variants.append(("default, no CUDA graphs", replace(default_runtime(device), cuda_graphs=False), False))
    if with_cache and frozen_prefix(groups):
        variants.append(("default + feature cache", default_runtime(device), True))
    plain_best, plain_s = plain_fit(splits, stage, device)
    out["plain loop (tensors)"] = (plain_best, plain_s)
    for name, rt, cache in variants:
        cfg = cfgmod.RunConfig(stages=(replace(stage, feature_cache=cache),), weights="random",
                               batch_size=BATCH, seed=0, augment=True)
        torch.manual_seed(0)
        model = build_resnet18(len(classes))
        t0 = time.perf_counter()
        res = run_stages(model, cfg, splits, pre, rt, TrainHooks())
        out[name] = (res.best_val_acc, time.perf_counter() - t0)
    return out, len(splits.train), len(splits.val)


def plain_fit(splits: DataSplits, stage: cfgmod.StageConfig, device) -> tuple[float, float]:
    """The plain loop (d) trained like `stage` (same groups, epochs, lr, schedule per step,
    SGD-momentum 0.9, weight decay on weights only, same data, same initial weights),
    evaluated with model.eval() after each epoch; (best validation accuracy, seconds)."""
    from torch.utils.data import DataLoader

    from core.engine.train import lr_factor, param_groups

    torch.manual_seed(0)
    model = build_resnet18(len(splits.classes)).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(g) for g in _group_prefixes(stage.groups)))
    opt = torch.optim.SGD(param_groups(model, stage), lr=stage.lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorImages(splits.train.images.cpu(), splits.train.labels.cpu(),
                                    plain_tensor_transforms(True)),
                       batch_size=BATCH, shuffle=True, num_workers=plain_workers(), generator=g)
    val = DataLoader(TensorImages(splits.val.images.cpu(), splits.val.labels.cpu(),
                                  plain_tensor_transforms(False)), batch_size=512)
    total = stage.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(stage.schedule, i, total, 0))
    t0, best = time.perf_counter(), 0.0
    for _ in range(stage.epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
                n += len(y)
        best = max(best, correct / max(1, n))
    return best, time.perf_counter() - t0


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and rounds (~2 minutes)")
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="folder with train/ and test/ class folders (CIFAR-10 as JPEGs)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = physical cores)")
    ap.add_argument("--images", type=int, default=0, help="training images to use (0 = mode default)")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--batches", type=int, default=0, help="batches per timed window")
    ap.add_argument("--acc-epochs", type=int, default=0, help="epochs of the accuracy check (0 = default, -1 = skip)")
    ap.add_argument("--json-out", default="", help="also write the JSON summary here")
    args = ap.parse_args(argv)
    started_load = os.getloadavg()

    device = torch.device(args.device)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    quick = args.quick
    n_images = args.images or (6000 if quick else 50_000)
    rounds = args.rounds or (3 if quick else 5)
    n_batches = args.batches or (8 if quick else 20)
    if device.type == "cuda":
        n_batches = args.batches or (20 if quick else 60)
    acc_epochs = args.acc_epochs or (2 if quick else 3)
    data_root = Path(args.data).expanduser()
    train_dir, test_dir = data_root / "train", data_root / "test"
    pre = Preprocess(32)

    log(f"== Training throughput, 32x32, batch {BATCH}, random weights ==")
    log(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {threads}; "
        f"torch {torch.__version__}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    peak, peak_text = cpu_fp32_peak(threads)
    runtime = default_runtime(device)
    log(f"our runtime: {runtime}")
    log(f"CPU fp32 peak: {peak_text}")

    names, paths, labels, imf_idx = folder_listing(train_dir, n_images, seed=0)
    images, labels_t, decode_s = load_ours(train_dir, (paths, labels), pre)
    data = ImageSet(images, labels_t, names)
    log(f"data: {len(data):,} training images of {train_dir}; ours decoded them once in "
        f"{decode_s:.1f} s ({len(data) / decode_s:,.0f} images/s, then cached on disk by the "
        f"app), {data.images.numel() / 1024**2:.0f} MiB as uint8")
    if device.type == "cuda":
        data = ImageSet(data.images.to(device), data.labels.to(device), names)

    plain = {s: Plain(train_dir, imf_idx, g, device) for s, g in STAGES.items()}
    plain_t = {s: Plain(data, range(len(data)), g, device) for s, g in STAGES.items()}
    plain_amp = ({s: Plain(data, range(len(data)), g, device, amp=True) for s, g in STAGES.items()}
                 if device.type == "cuda" else {})
    ours = {s: Ours(data, g, runtime, pre) for s, g in STAGES.items()}
    # On CUDA also ours with every step eager: what the CUDA graphs bring.
    eager = ({s: Ours(data, g, replace(runtime, cuda_graphs=False), pre) for s, g in STAGES.items()}
             if runtime.cuda_graphs else {})
    cacheable = [s for s, g in STAGES.items() if frozen_prefix(g)]
    # Warm the prefix kernels (first calls pick/JIT them) so the caching cost is steady-state.
    warm = Ours(data.subset(torch.arange(min(len(data), 1024))), STAGES["stage2"], runtime, pre)
    warm.build_cache()
    Ours(warm.data, STAGES["stage1"], runtime, pre).build_cache()
    del warm
    cache_cost = {}
    for s in cacheable:
        cache_cost[s] = ours[s].build_cache()
    # Warm-up: first calls allocate, pick kernels, start threads; on CUDA the step graphs
    # are captured here (after GRAPH_WARMUP_STEPS eager steps), not in a timed window.
    warm_batches = GRAPH_WARMUP_STEPS + 2 if runtime.cuda_graphs else 2
    for s in STAGES:
        plain[s].window(2, seed=999)
        plain_t[s].window(2, seed=999)
        if s in plain_amp:
            plain_amp[s].window(2, seed=999)
        ours[s].window(warm_batches, seed=999)
        if s in eager:
            eager[s].window(warm_batches, seed=999)
        if s in cacheable:
            ours[s].window(warm_batches, seed=999, cached=True)

    ips: dict[tuple[str, str], list[float]] = {}
    t_start = time.perf_counter()
    for r in range(rounds):
        for s in STAGES:
            ips.setdefault(("a", s), []).append(plain[s].window(n_batches, seed=r))
            ips.setdefault(("d", s), []).append(plain_t[s].window(n_batches, seed=r))
            if s in plain_amp:
                ips.setdefault(("d16", s), []).append(plain_amp[s].window(n_batches, seed=r))
            ips.setdefault(("b", s), []).append(ours[s].window(n_batches, seed=r))
            if s in eager:
                ips.setdefault(("e", s), []).append(eager[s].window(n_batches, seed=r))
            if s in cacheable:
                ips.setdefault(("c", s), []).append(ours[s].window(n_batches, seed=r, cached=True))
        log(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t_start:.0f} s)")
    med = {k: statistics.median(v) for k, v in ips.items()}

    flops = {s: train_flops_per_image(g, torch.device("cpu")) for s, g in STAGES.items()}
    flops_c = {s: train_flops_per_image(STAGES[s], torch.device("cpu"), suffix_only=True)
               for s in cacheable}

    log("")
    log(f"Training images/s (median of {rounds} interleaved rounds of {n_batches} batches; "
        f"spread min..max in brackets)")
    hdr = f"{'stage':8s} {'(a) plain':>20s} {'(b) ours':>20s} {'b/a':>6s} {'(c) ours+cache':>20s} {'c/a':>6s}"
    log(hdr)
    for s in STAGES:
        def cell(k):
            if (k, s) not in med:
                return f"{'n/a':>20s}"
            v = ips[(k, s)]
            return f"{med[(k, s)]:7.0f} [{min(v):5.0f}..{max(v):5.0f}]"
        ca = f"{med[('c', s)] / med[('a', s)]:6.2f}" if ("c", s) in med else f"{'':6s}"
        log(f"{s:8s} {cell('a')} {cell('b')} {med[('b', s)] / med[('a', s)]:6.2f} {cell('c')} {ca}")
    log(f"(d) plain loop on the same in-memory uint8 tensors (torchvision transforms on tensors, "
        f"{plain_workers()} DataLoader workers), and ours against it (b/d = compute_speedup):")
    for s in STAGES:
        v = ips[("d", s)]
        line = (f"{s:8s} {med[('d', s)]:7.0f} [{min(v):5.0f}..{max(v):5.0f}]"
                f"   b/d {med[('b', s)] / med[('d', s)]:5.2f}x")
        if ("d16", s) in med:
            line += (f"   with autocast bf16 (d16) {med[('d16', s)]:7.0f}, "
                     f"b/d16 {med[('b', s)] / med[('d16', s)]:5.2f}x")
        log(line)
    if eager:
        log("(e) ours with every step eager (no CUDA graphs), and what the graphs bring (b/e):")
        for s in STAGES:
            log(f"{s:8s} {med[('e', s)]:7.0f} [{min(ips[('e', s)]):5.0f}..{max(ips[('e', s)]):5.0f}]"
                f"   b/e {med[('b', s)] / med[('e', s)]:5.2f}x")

    log("")
    log(f"Seconds per epoch of {EPOCH_IMAGES:,} images (training only)")
    for s in STAGES:
        line = (f"{s:8s} plain {EPOCH_IMAGES / med[('a', s)]:7.1f} s   ours {EPOCH_IMAGES / med[('b', s)]:7.1f} s")
        if s in cacheable:
            one_off = cache_cost[s] * EPOCH_IMAGES / len(data)
            line += (f"   ours+cache {EPOCH_IMAGES / med[('c', s)]:7.1f} s "
                     f"(+ {one_off:.1f} s once to cache the features, "
                     f"{len(data) / cache_cost[s]:,.0f} images/s)")
        log(line)

    log("")
    on_cpu = device.type == "cpu"
    log("Achieved training FLOP/s (useful FLOPs per image from torch.utils.flop_counter: "
        "forward + backward of one step, layer4 as the matrix products it is at 1x1"
        + (". Ours computes in bf16 (frozen prefix; trained layers under autocast), whose "
           "peak is twice fp32's on CPUs with AVX512-BF16: above 100 % of the fp32 peak is "
           "possible" if on_cpu and (runtime.frozen_dtype or runtime.autocast_dtype) else "") + ("" if on_cpu else "; the CPU peak does not apply to a GPU, so no fraction")
        + ")")

    def frac(f):
        return f" ({f / peak:5.1%} of fp32 peak)" if on_cpu else ""

    for s in STAGES:
        fa, fb = flops[s] * med[("a", s)], flops[s] * med[("b", s)]
        line = (f"{s:8s} {flops[s] / 1e6:6.1f} MFLOP/image: plain {fa / 1e9:6.1f} GFLOP/s{frac(fa)}, "
                f"ours {fb / 1e9:6.1f} GFLOP/s{frac(fb)}")
        if s in cacheable:
            fc = flops_c[s] * med[("c", s)]
            line += f", ours+cache {flops_c[s] / 1e6:.1f} MFLOP/image {fc / 1e9:6.1f} GFLOP/s{frac(fc)}"
        log(line)

    # Evaluation throughput, interleaved too.
    _, tpaths, tlabels, timf = folder_listing(test_dir, 2000 if quick else 10_000, seed=0)
    timages, tlab, _ = load_ours(test_dir, (tpaths, tlabels), pre)
    test = ImageSet(timages, tlab, names)
    eval_model = build_resnet18(10).to(device)
    ev_a, ev_b = [], []
    for _ in range(rounds):
        ev_a.append(plain_eval_ips(test_dir, timf, device, eval_model))
        _sync(device)
        t0 = time.perf_counter()
        evaluate(eval_model, test, pre, runtime)
        _sync(device)
        ev_b.append(len(test) / (time.perf_counter() - t0))
    eval_a, eval_b = statistics.median(ev_a), statistics.median(ev_b)
    log("")
    log(f"Evaluation images/s ({len(test):,} test images): plain {eval_a:,.0f} (DataLoader, "
        f"no_grad) | ours {eval_b:,.0f} (evaluate: in-memory, inference_mode, BN folded) "
        f"= {eval_b / eval_a:.2f}x")

    acc = acc_all = None
    if args.acc_epochs >= 0:
        acc, n_tr, n_val = accuracy_check(data, names, device, acc_epochs)
        log("")
        log(f"Accuracy check: stage 1 (layer4+fc), {acc_epochs} epochs on {n_tr:,} images, "
            f"best validation accuracy on {n_val:,} held-out images, same seed")
        for k, (a, secs) in acc.items():
            log(f"  {k:26s} {a:6.1%}   ({secs:.1f} s including evaluation)")
        # All layers train in the default runtime's training precision too: check that.
        acc_all, n_tr, n_val = accuracy_check(data, names, device, 2, LAYER_GROUPS,
                                              max_images=5000 if quick else 12_500)
        log(f"Accuracy check: all layers, 2 epochs on {n_tr:,} images, {n_val:,} held out")
        for k, (a, secs) in acc_all.items():
            log(f"  {k:26s} {a:6.1%}   ({secs:.1f} s including evaluation)")

    rss = peak_rss_gib()
    log("")
    log(f"Peak resident memory of this process: {rss:.2f} GiB (includes the plain way's "
        f"models; DataLoader workers are separate processes)")
    if device.type == "cuda":
        log(f"Peak GPU memory: {torch.cuda.max_memory_allocated(device) / 1024**3:.2f} GiB")

    summary = {
        "device": str(device), "machine": cpu_model(), "threads": threads, "quick": quick,
        "images": len(data), "rounds": rounds, "batches_per_window": n_batches,
        "stage1_speedup": round(med[("b", "stage1")] / med[("a", "stage1")], 3),
        "stage2_speedup": round(med[("b", "stage2")] / med[("a", "stage2")], 3),
        "all_speedup": round(med[("b", "all")] / med[("a", "all")], 3),
        "cache_speedup": round(med[("c", "stage1")] / med[("a", "stage1")], 3),
        "cache_speedup_stage2": round(med[("c", "stage2")] / med[("a", "stage2")], 3),
        # Against the tutorial end to end (JPEG decoding in its workers) and against the
        # plain loop on the same in-memory tensors (the training arithmetic alone).
        "speedup": {s: round(med[("b", s)] / med[("a", s)], 3) for s in STAGES},
        "compute_speedup": {s: round(med[("b", s)] / med[("d", s)], 3) for s in STAGES},
        "compute_speedup_vs_autocast": ({s: round(med[("b", s)] / med[("d16", s)], 3) for s in STAGES}
                                        if plain_amp else None),
        "cache_speedup_vs_tensors": {s: round(med[("c", s)] / med[("d", s)], 3) for s in cacheable},
        "cache_build_s": {s: round(c, 2) for s, c in cache_cost.items()},
        # One epoch with the cache, its one-off build counted (what a one-epoch stage pays),
        # against one plain epoch (b/a's terms).
        "cache_speedup_with_build": {
            s: round((len(data) / med[("a", s)]) / (len(data) / med[("c", s)] + cache_cost[s]), 3)
            for s in cacheable},
        "plain_workers": plain_workers(),
        "bf16": cpu_has_native_bf16(),
        "cuda_graphs": runtime.cuda_graphs,
        "graph_speedup": ({s: round(med[("b", s)] / med[("e", s)], 3) for s in STAGES}
                          if eager else None),
        "images_per_s_spread": {f"{k}/{s}": [round(min(v)), round(max(v))] for (k, s), v in ips.items()},
        "images_per_s": {f"{k}/{s}": round(v, 1) for (k, s), v in med.items()},
        "epoch_s_50k": {f"{k}/{s}": round(EPOCH_IMAGES / v, 1) for (k, s), v in med.items()},
        "cache_build_s_50k": {s: round(c * EPOCH_IMAGES / len(data), 1) for s, c in cache_cost.items()},
        "eval_images_per_s": {"plain": round(eval_a, 1), "ours": round(eval_b, 1)},
        "fp32_peak_gflops": round(peak / 1e9, 1),
        "achieved_gflops": {f"{k}/{s}": round((flops_c[s] if k == "c" else flops[s]) * v / 1e9, 1)
                            for (k, s), v in med.items()},
        "fraction_of_cpu_fp32_peak": ({f"{k}/{s}": round((flops_c[s] if k == "c" else flops[s]) * v / peak, 4)
                                       for (k, s), v in med.items()} if on_cpu else None),
        "accuracy": {k: round(a, 4) for k, (a, _) in acc.items()} if acc else None,
        "accuracy_all_layers": {k: round(a, 4) for k, (a, _) in acc_all.items()} if acc_all else None,
        "peak_rss_gib": round(rss, 3),
    }
    if device.type == "cuda":
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
    log("")
    emit_summary(summary, args.json_out, bench="throughput", started_load=started_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
