"""224 px on one GPU: an epoch of our two-stage recipe against fastai's `fine_tune`.

    python -m benchmarks.gpu_224 --data DIR [--batch 128] [--work /tmp/gpu224]

Same images for both: the JPEGs of DIR/train and DIR/test (class folders, e.g. the
CIFAR-10 subset of benchmarks.make_subset) resized to 224 x 224 and written as JPEGs
under --work, once. Same batch size, ResNet-18 from random weights (no ImageNet weights
on the GPU machine), validation on DIR/test after every epoch in both.

- ours: `run_stages` (what a run of the app executes) with the app's default CUDA
  runtime, preset "Two-stage" at 224 px: stage 1 trains layer4+fc for one epoch, stage 2
  layer3+layer4+fc for one. Decoding the JPEGs into the uint8 set is timed apart (the app
  does it once per data set and caches it on disk). Also one all-layers epoch, and the
  two-stage recipe with every step eager ($FINETUNE_LAB_CUDA_GRAPHS=0's runtime).
- fastai: `vision_learner(dls, resnet18, pretrained=False).fine_tune(1)` on
  `ImageDataLoaders.from_folder(..., item_tfms=Resize(224))`, its defaults otherwise: the
  frozen epoch (head + every BatchNorm trains) and the unfrozen epoch, each timed (training
  and validation), in fp32 (fastai's default) and with `to_fp16()`. It runs in a child
  process (its own cudnn settings), only where fastai imports: it is not a dependency of
  the project (carry it to the GPU machine as wheels; see benchmarks/README.md).

Each recipe runs `--repeats` times; the first run of each pays for cudnn's algorithm
search and (fastai) worker start-up, so the table reports the last run and prints all.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.summary import emit_summary

RESOLUTION = 224


def log(*a) -> None:
    print(*a, flush=True)


def make_folder(src: Path, dst: Path, resolution: int) -> tuple[int, float]:
    """DIR/{train,test}/<class>/*.jpg resized to `resolution` px squares under `dst` (skipped
    where already there). Returns (images, seconds)."""
    from PIL import Image

    jobs = [(f, (dst / f.relative_to(src)).with_suffix(".jpg")) for part in ("train", "test")
            for f in sorted((src / part).rglob("*")) if f.suffix.lower() in (".jpg", ".jpeg", ".png")]

    def work(job) -> None:
        f, out = job
        if out.exists():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as img:
            img.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC).save(
                out, quality=90)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(work, jobs, chunksize=16))
    return len(jobs), time.perf_counter() - t0


# ---------------------------------------------------------------- ours


def ours(folder: Path, batch: int, repeats: int, device: torch.device, resolution: int) -> dict:
    from core import config as cfgmod
    from core.engine.data import DataSplits, ImageSet, Preprocess, decode_files, scan_folder
    from core.engine.model import build_resnet18
    from core.engine.train import TrainHooks, default_runtime, run_stages

    pre = Preprocess(resolution)
    t0 = time.perf_counter()
    sets = {}
    for part in ("train", "test"):
        names, per_class, _ = scan_folder(folder / part)
        paths = [p for files in per_class for p in files]
        labels = [i for i, files in enumerate(per_class) for _ in files]
        images, labels_t, _ = decode_files(paths, labels, pre)
        sets[part] = ImageSet(images, labels_t, names)
    decode_s = time.perf_counter() - t0
    n_train, n_val = len(sets["train"]), len(sets["test"])
    log(f"ours: decoded {n_train + n_val:,} JPEGs at {resolution} px in {decode_s:.1f} s "
        f"(once per data set; the app caches the result on disk)")
    splits = DataSplits(sets["train"], sets["test"], sets["test"], names, [], "gpu_224")
    runtime = default_runtime(device)
    two_stage = cfgmod.preset_config("Two-stage", epochs=1, resolution=resolution, batch_size=batch,
                                     weights="random", data_source="folder", data_path=str(folder))
    all_layers = replace(two_stage, stages=(cfgmod.StageConfig(
        groups=cfgmod.LAYER_GROUPS, epochs=1, lr=0.01, schedule="cosine"),))

    def run(cfg, rt) -> dict:
        ends: list[float] = []
        train_s: list[float] = []
        hooks = TrainHooks(
            on_metrics=lambda rows: train_s.extend(v for (_, _, _, k, v) in rows if k == "epoch_s"),
            on_epoch_end=lambda end: ends.append(time.perf_counter()))
        torch.manual_seed(0)
        model = build_resnet18(len(names))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_stages(model, cfg, splits, pre, rt, hooks)
        epochs = [b - a for a, b in zip([start, *ends], ends)]
        return {"epoch_s": [round(s, 3) for s in epochs], "train_s": [round(s, 3) for s in train_s],
                "total_s": round(sum(epochs), 3), "best_val_acc": round(result.best_val_acc, 4),
                "train_images_per_s": [round(n_train / s) for s in train_s]}

    out: dict = {"decode_s": round(decode_s, 2), "train_images": n_train, "val_images": n_val,
                 "runtime": str(runtime), "two_stage": [], "all_layers": None, "two_stage_eager": None}
    for r in range(repeats):
        res = run(two_stage, runtime)
        log(f"ours two-stage run {r + 1}: epochs (train + validation) {res['epoch_s']} s, "
            f"training only {res['train_s']} s, {res['train_images_per_s']} img/s, "
            f"best val {res['best_val_acc']:.1%}")
        out["two_stage"].append(res)
    # All layers: the first run pays cudnn's algorithm search for conv1..layer2's backward.
    for r in range(repeats):
        out["all_layers"] = run(all_layers, runtime)
        log(f"ours all layers, 1 epoch, run {r + 1}: {out['all_layers']['epoch_s']} s "
            f"({out['all_layers']['train_images_per_s']} img/s training)")
    if runtime.cuda_graphs:
        out["two_stage_eager"] = run(two_stage, replace(runtime, cuda_graphs=False))
        log(f"ours two-stage, every step eager: {out['two_stage_eager']['epoch_s']} s")
    return out


# ---------------------------------------------------------------- fastai (child process)


def fastai_child(folder: Path, batch: int, repeats: int, precisions: list[str]) -> dict:
    import fastai
    from fastai.vision.all import (
        Callback,
        ImageDataLoaders,
        Resize,
        accuracy,
        resnet18,
        vision_learner,
    )

    class EpochTimer(Callback):
        """Wall seconds of each epoch (training + validation) and of its training part."""

        order = 100

        def before_epoch(self):
            self.t0 = time.perf_counter()

        def after_train(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.train_s.append(time.perf_counter() - self.t0)

        def after_epoch(self):
            self.epoch_s.append(time.perf_counter() - self.t0)

    out: dict = {"fastai": fastai.__version__, "cudnn_benchmark": None, "runs": []}
    for r in range(repeats):
        for precision in precisions:
            dls = ImageDataLoaders.from_folder(folder, train="train", valid="test",
                                               item_tfms=Resize(RESOLUTION), bs=batch)
            timer = EpochTimer()
            timer.train_s, timer.epoch_s = [], []
            torch.manual_seed(0)
            learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy, cbs=[timer])
            if precision == "fp16":
                learn = learn.to_fp16()
            t0 = time.perf_counter()
            with learn.no_bar():  # the progress bar only adds output
                learn.fine_tune(1)
            total = time.perf_counter() - t0
            acc = float(learn.recorder.values[-1][-1]) if learn.recorder.values else float("nan")
            n_train = len(dls.train_ds)
            res = {"precision": precision, "repeat": r + 1, "epoch_s": [round(s, 3) for s in timer.epoch_s],
                   "train_s": [round(s, 3) for s in timer.train_s], "total_s": round(total, 3),
                   "val_acc": round(acc, 4), "num_workers": dls.train.fake_l.num_workers,
                   "train_images_per_s": [round(n_train / s) for s in timer.train_s]}
            log(f"fastai {precision} run {r + 1}: frozen epoch, unfrozen epoch (train + validation) "
                f"{res['epoch_s']} s, training only {res['train_s']} s, fine_tune total {total:.1f} s, "
                f"val acc {acc:.1%}, {res['num_workers']} DataLoader workers")
            out["runs"].append(res)
    out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return out


def fastai_in_child(args, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_224", "--fastai-child", "--work", str(args.work),
           "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--fastai-precisions", args.fastai_precisions]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fastai_timeout)
    for line in proc.stdout.splitlines()[:-1]:
        log("  " + line)
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                "seconds": round(time.perf_counter() - t0, 1)}
    return json.loads(proc.stdout.splitlines()[-1])


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_224", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".benchdata/cifar-subset", help="train/ and test/ class folders")
    ap.add_argument("--work", default="/tmp/gpu224", help="where the 224 px JPEGs go")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    ap.add_argument("--resolution", type=int, default=RESOLUTION, help="ours only; for CPU dry runs")
    ap.add_argument("--fastai-precisions", default="fp32,fp16")
    ap.add_argument("--fastai-timeout", type=int, default=300)
    ap.add_argument("--no-fastai", action="store_true")
    ap.add_argument("--fastai-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args(argv)
    folder = Path(args.work) / f"jpg{RESOLUTION}"
    if args.fastai_child:
        print(json.dumps(fastai_child(folder, args.batch, args.repeats,
                                      args.fastai_precisions.split(","))), flush=True)
        return 0

    device = torch.device(args.device)
    log(f"== 224 px: our two-stage recipe vs fastai fine_tune, batch {args.batch}, ResNet-18 random weights ==")
    log(f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    n, secs = make_folder(Path(args.data), folder, RESOLUTION)
    log(f"data: {n:,} JPEGs resized to {RESOLUTION} px under {folder} ({secs:.1f} s)")
    summary: dict = {"device": str(device), "torch": torch.__version__, "batch": args.batch,
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    summary["fastai"] = None if args.no_fastai else fastai_in_child(args, folder)
    summary["ours"] = ours(folder, args.batch, args.repeats, device, args.resolution)

    last = summary["ours"]["two_stage"][-1]
    log("")
    log("Seconds per epoch (training + validation), last run of each:")
    log(f"  ours   stage 1 (layer4+fc) {last['epoch_s'][0]:7.2f}   stage 2 (+layer3) {last['epoch_s'][1]:7.2f}"
        f"   all layers {summary['ours']['all_layers']['epoch_s'][0]:7.2f}")
    fa = summary["fastai"]
    verdict = {}
    if fa and "runs" in fa:
        for precision in args.fastai_precisions.split(","):
            runs = [r for r in fa["runs"] if r["precision"] == precision]
            if not runs:
                continue
            f = runs[-1]
            log(f"  fastai {precision}: frozen epoch {f['epoch_s'][0]:7.2f}   unfrozen epoch {f['epoch_s'][1]:7.2f}"
                f"   fine_tune(1) total {f['total_s']:7.2f}")
            verdict[precision] = {
                "stage1_vs_frozen": round(f["epoch_s"][0] / last["epoch_s"][0], 3),
                "stage2_vs_unfrozen": round(f["epoch_s"][1] / last["epoch_s"][1], 3),
                "all_layers_vs_unfrozen": round(f["epoch_s"][1] / summary["ours"]["all_layers"]["epoch_s"][0], 3),
                "recipe_total": round(sum(f["epoch_s"]) / sum(last["epoch_s"]), 3)}
            log(f"    fastai/ours: {verdict[precision]}")
    summary["fastai_over_ours"] = verdict
    log("")
    emit_summary(summary, args.json_out, bench="gpu_224")
    return 0


if __name__ == "__main__":
    sys.exit(main())
