"""Command line: the same engine and store as the dashboard.

    python -m core train --preset Two-stage --data-source folder --data-path DIR ...
    python -m core train --config run.json
    python -m core runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from core import config as cfgmod
from core.runs.store import DATA_DIR_ENV, RunProgress, RunStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Two-Stage Fine-Tuning Lab: "
                                "train ResNet-18 in stages and list runs, from the command line.")
    p.add_argument("--data-dir", help=f"run store folder (default: ${DATA_DIR_ENV} or ./runs)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a preset or a JSON config in the foreground",
                       description="Train in the foreground with a progress bar; the run is "
                       "written to the store, so it shows up in the dashboard.")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=cfgmod.PRESETS, default="Two-stage",
                     help="stage recipe (default: Two-stage)")
    src.add_argument("--config", type=Path, help="a JSON run config (as downloaded from the dashboard)")
    t.add_argument("--name", default="", help="run name shown in the dashboard")
    t.add_argument("--epochs", type=int, help="epochs per stage (presets only; default 1)")
    t.add_argument("--lr", type=float, help="learning rate of the first stage (presets only; default 0.01)")
    t.add_argument("--data-source", choices=cfgmod.DATA_SOURCES,
                   help="cifar10 (torchvision, downloads) or folder (an image folder)")
    t.add_argument("--data-path", help="image folder (train/ and test/ class folders, or one "
                   "class-folder tree), or where CIFAR-10 is downloaded")
    t.add_argument("--classes", help="comma-separated subset of classes (default: all)")
    t.add_argument("--max-train-images", type=int, help="cap on training images, 0 = all")
    t.add_argument("--val-fraction", type=float, help="validation share carved from train (default 0.1)")
    t.add_argument("--resolution", type=int, help="input side in pixels, 32..224 (default 32)")
    t.add_argument("--batch-size", type=int, help="batch size (default 128)")
    t.add_argument("--no-augment", action="store_true", help="turn off random crop and flip")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--weights", choices=cfgmod.WEIGHT_SOURCES,
                   help="starting weights: imagenet (default), random, file, run")
    t.add_argument("--weights-path", help="weights file, with --weights file")
    t.add_argument("--weights-run", help="run id whose best checkpoint starts training, with --weights run")
    t.add_argument("--device", choices=cfgmod.DEVICES, help="auto (default): cuda, then mps, then cpu")
    t.add_argument("--threads", type=int, help="CPU threads, 0 = one per physical core")
    t.add_argument("--feature-cache", action="store_true",
                   help="train stages that leave a frozen prefix on cached features (faster; no "
                        "augmentation through the frozen part)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    r = sub.add_parser("runs", help="list runs with status and best accuracy")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def build_config(args: argparse.Namespace) -> cfgmod.RunConfig:
    if args.config:
        try:
            text = args.config.read_text()
        except OSError as exc:
            raise cfgmod.ConfigError([f"config: cannot read {args.config} ({exc.strerror})"]) from None
        cfg = cfgmod.from_json(text)
    else:
        cfg = cfgmod.preset_config(args.preset, epochs=args.epochs or 1,
                                   lr=args.lr if args.lr is not None else 0.01)
    overrides = {
        "data_source": args.data_source, "data_path": args.data_path,
        "max_train_images": args.max_train_images, "val_fraction": args.val_fraction,
        "resolution": args.resolution, "batch_size": args.batch_size, "seed": args.seed,
        "weights": args.weights, "weights_path": args.weights_path, "weights_run": args.weights_run,
        "device": args.device, "threads": args.threads,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.classes:
        changes["classes"] = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    if args.no_augment:
        changes["augment"] = False
    cfg = replace(cfg, **changes)
    if args.feature_cache:
        cfg = replace(cfg, stages=tuple(replace(s, feature_cache=True) for s in cfg.stages))
    return cfgmod.check(cfg)


def cmd_train(store: RunStore, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.runs.worker import execute_run

    cfg = build_config(args)
    if args.print_config:
        print(cfgmod.to_json(cfg))
        return 0
    from core.runs.preflight import preflight

    report = preflight(cfg, store)  # bad data/weights fail here, before a run exists
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    run = store.create_run(cfg, name=args.name)
    # Claim it for this process (bypassing the queue: the user asked for it now).
    store.claim_run_now(run.id, os.getpid())
    print(f"run {run.id}: {' -> '.join(s.trains for s in cfg.stages)} "
          f"({cfg.total_epochs} epochs); store {store.root}", file=sys.stderr)
    bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
               file=sys.stderr)

    def on_progress(p: RunProgress) -> None:
        bar.n = int(p.fraction * 1000)
        desc = p.phase
        if p.stage:
            desc = f"stage {p.stage}/{p.stages} epoch {p.epoch or '-'}/{p.epochs or '-'}"
        elif p.message:
            desc = p.message
        bar.set_description(desc, refresh=False)
        bar.refresh()

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[_TqdmHandler(bar)])
    try:
        status = execute_run(store, run.id, on_progress=on_progress)
    except KeyboardInterrupt:
        store.finish_run(run.id, "cancelled", "interrupted from the keyboard")
        status = "cancelled"
    bar.close()
    final = store.get_run(run.id)
    assert final is not None
    if status == "finished":
        print(f"finished run {run.id}: best val acc {final.best_val_acc:.4f} (stage "
              f"{final.best_stage}, epoch {final.best_epoch}), test acc {final.test_acc:.4f}, "
              f"{final.duration_s:.1f} s; checkpoint {final.best_checkpoint}")
        return 0
    print(f"run {run.id} {status}: {final.error}", file=sys.stderr)
    return 1


class _TqdmHandler(logging.Handler):
    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.write(self.format(record), file=sys.stderr)


def cmd_runs(store: RunStore, as_json: bool) -> int:
    from core.runs.jobs import reconcile

    reconcile(store)
    runs = store.list_runs()
    if as_json:
        print(json.dumps([{"id": r.id, "name": r.name, "status": r.status,
                           "best_val_acc": r.best_val_acc, "test_acc": r.test_acc,
                           "created_at": r.created_at, "error": r.error} for r in runs], indent=2))
        return 0
    if not runs:
        print("no runs yet; start one with: python -m core train --help")
        return 0
    print(f"{'id':<23} {'status':<10} {'best val':>8} {'test':>6}  name")
    for r in runs:
        val = f"{r.best_val_acc:.3f}" if r.best_val_acc is not None else "-"
        test = f"{r.test_acc:.3f}" if r.test_acc is not None else "-"
        print(f"{r.id:<23} {r.status:<10} {val:>8} {test:>6}  {r.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = RunStore(args.data_dir)
        if args.command == "train":
            return cmd_train(store, args)
        return cmd_runs(store, args.json)
    except cfgmod.ConfigError as exc:
        print("invalid config:\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 2
    except Exception as exc:
        from core.runs.store import StoreError

        if isinstance(exc, StoreError):
            print(str(exc), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
