"""Time to accuracy out of sample: the presets as they are, on tasks they were not chosen on.

    python -m benchmarks.out_of_sample [--out DIR] [--sizes 500,2500,22500] [--seeds 0,1,2]
    python -m benchmarks.out_of_sample --report DIR     # the table from a finished (or partial) DIR

The presets (Fast transfer's layers and 5x learning rate above all) were chosen on one
task: fine-tune on dog/frog/horse/ship/truck from a backbone pretrained on the other five
CIFAR-10 classes, 4,500 and 22,500 training images, seed 0. This runs
`benchmarks.time_to_accuracy` (one subprocess per task, so a slow or failed task loses
nothing of the others) on the mirrored class split (pretrain on dog..truck, fine-tune on
airplane..deer) and the original one, at 500, 2,500 and 22,500 training images, over
seeds; each task's results record and log land in DIR as they finish. The target of a
task is the plain recipe's best validation accuracy in that task; the report gives, per
preset, the time to it (wall and CPU seconds, and the speed-up over the plain recipe) with
test accuracy beside it.

Order: the mirrored split's small tasks (every seed), then the original split's, then
22,500 images seed by seed, mirrored before original, so a run stopped early has the most
out-of-sample evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.summary import RESULTS_DIR, RESULTS_ENV

PRESETS = ("preset Two-stage", "preset All at once", "preset Fast transfer")
# Training images -> images before the app's 10 % validation split (stratified per class).
IMAGES_FOR_TRAIN = {500: 556, 2500: 2778, 22500: 0}


def plan(sizes: list[int], seeds: list[int]) -> list[tuple[bool, int, int]]:
    """(mirrored, train images, seed) in the order they run."""
    small = [s for s in sizes if s < 22500]
    out = [(m, n, seed) for m in (True, False) for n in small for seed in seeds]
    out += [(m, n, seed) for seed in seeds for n in sizes if n >= 22500 for m in (True, False)]
    return out


def task_name(mirrored: bool, train: int, seed: int) -> str:
    return f"{'mirrored' if mirrored else 'original'}-{train}-seed{seed}"


def run_all(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mirrored, train, seed in plan(args.sizes, args.seeds):
        name = task_name(mirrored, train, seed)
        if (out / f"{name}.json").exists():
            continue
        cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", "--data", args.data,
               "--images", str(IMAGES_FOR_TRAIN.get(train, train)), "--seed", str(seed),
               "--plain-epochs", str(args.plain_epochs),
               "--backbone-images", str(args.backbone_images),
               "--backbone-epochs", str(args.backbone_epochs),
               "--configs", ",".join(PRESETS), "--json-out", str(out / f"{name}.json")]
        if mirrored:
            cmd.append("--mirrored")
        t0 = time.time()
        with open(out / f"{name}.log", "w") as logf:
            logf.write(" ".join(cmd) + "\n")
            logf.flush()
            rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                 env={**os.environ, RESULTS_ENV: str(out)})
        print(f"{name}: exit {rc} after {time.time() - t0:.0f} s, load {os.getloadavg()}",
              flush=True)
    return 0


def report(folder: Path) -> str:
    """A markdown table per task group from the results records in `folder`."""
    recs = []
    for p in sorted(folder.glob("time_to_accuracy-*.json")):
        r = json.loads(p.read_text())
        r["file"] = p.name
        recs.append(r)
    lines = []
    groups: dict[tuple[bool, int], list[dict]] = {}
    for r in recs:
        s = r["summary"]
        groups.setdefault((s["mirrored"], s["train_images"]), []).append(r)
    for (mirrored, train), rs in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        lines.append(f"\n{'mirrored' if mirrored else 'original'} split, {train:,} training "
                     f"images, seeds {sorted(r['summary']['seed'] for r in rs)}:\n")
        lines.append("| run | reached plain's best val (seeds) | wall speed-up per seed | "
                     "CPU speed-up per seed | best val (mean) | test (mean) | total wall s (mean) |")
        lines.append("|---|---:|---|---|---:|---:|---:|")
        for name in ("plain", *PRESETS):
            got = [r["summary"] for r in rs if name in r["summary"]["best_val_acc"]]
            if not got:
                continue
            reached = sum(s["time_to_target_s"][name] is not None for s in got)
            sp = [s["speedup"].get(name) for s in got] if name != "plain" else []
            cs = [s["cpu_speedup"].get(name) for s in got] if name != "plain" else []
            fmt = lambda xs: " / ".join("never" if x is None else f"{x:.2f}x" for x in xs)  # noqa: E731
            lines.append(
                f"| {name} | {reached}/{len(got)} | {fmt(sp) if sp else '1'} | {fmt(cs) if cs else '1'} | "
                f"{statistics.mean(s['best_val_acc'][name] for s in got):.1%} | "
                f"{statistics.mean(s['test_acc'][name] for s in got):.1%} | "
                f"{statistics.mean(s['total_s'][name] for s in got):.1f} |")
        loads = [r["environment"].get("load_average_start", [0])[0] for r in rs] + \
                [r["environment"]["load_average_end"][0] for r in rs]
        lines.append(f"\nload average (1 min) at the tasks' starts and ends: "
                     f"{min(loads):.1f}-{max(loads):.1f}; files: {', '.join(r['file'] for r in rs)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.out_of_sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS_DIR / f"out_of_sample-{time.strftime('%Y%m%d')}"))
    ap.add_argument("--data", default=str(Path.home() / ".cache" / "cifar10-jpg"))
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[500, 2500, 22500])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--plain-epochs", type=int, default=4)
    ap.add_argument("--backbone-images", type=int, default=5_000)
    ap.add_argument("--backbone-epochs", type=int, default=4)
    ap.add_argument("--report", default="", help="print the table of a results folder and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
