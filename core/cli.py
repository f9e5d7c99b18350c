"""Command line: the same engine and store as the dashboard.

    python -m core train --preset Two-stage --data-source folder --data-path DIR ...
    python -m core train --config run.json
    python -m core submit ...same options as train...   (queues it, prints the run id)
    python -m core cancel RUN_ID | resume RUN_ID
    python -m core runs [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

from core import config as cfgmod
from core.runs.store import DATA_DIR_ENV, Run, RunProgress, RunStore


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
    t.add_argument("--epochs", type=int, help=f"epochs per stage (presets only; default "
                   f"{cfgmod.PRESET_EPOCHS})")
    t.add_argument("--lr", type=float, help=f"learning rate of the first stage (presets only; "
                   f"default {cfgmod.PRESET_LR:g})")
    for cls in (cfgmod.RunConfig, cfgmod.StageConfig):
        for f, spec in cfgmod.specs(cls):
            if spec.flag:
                _add_field_flag(t, f, spec, typing.get_type_hints(cls)[f.name])
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    s = sub.add_parser("submit", add_help=False, help="queue a run in the background and print "
                       "its id", description="Queue a run (the same options as train) for the "
                       "executor (FINETUNE_LAB_EXECUTOR: a local background process, or a Ray "
                       "job) and return at once; it shows up in the dashboard.")
    # The very options of train (argparse's own `parents` mechanism, applied to a parser
    # that exists already), so the two commands can never drift apart.
    s._add_container_actions(t)
    for name, text in (("cancel", "ask a run to stop (a queued run is cancelled at once)"),
                       ("resume", "queue a failed or cancelled run again, from its last epoch")):
        sub.add_parser(name, help=text, description=text).add_argument("run_id")

    r = sub.add_parser("runs", help="list runs with status and best accuracy")
    r.add_argument("--json", action="store_true",
                   help="machine-readable output: one JSON object per line per run")
    return p


def _comma_list(text: str) -> tuple[str, ...] | None:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    return names or None  # an empty list changes nothing


def _add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field,
                    spec: cfgmod.FieldSpec, kind: type) -> None:
    """One option per config field, named after it: --field-name, or --no-field-name for a
    switch that is on by default. A stage field's option applies to every stage. Every
    option defaults to None: "not given", so the preset's or the config file's value stays."""
    flag = "--" + f.name.replace("_", "-")
    if kind is bool:
        if f.default:
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                default=None, help=f"turn off: {spec.help}")
        else:
            parser.add_argument(flag, action="store_true", default=None, help=spec.help)
    elif typing.get_origin(kind) is tuple:
        parser.add_argument(flag, type=_comma_list, help=f"comma-separated {spec.help}")
    else:
        default = f" (default: {f.default})" if f.default != "" else ""
        parser.add_argument(flag, type=kind, choices=spec.choices or None,
                            help=f"{spec.help}{default}")


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f, spec in cfgmod.specs(cls)
            if spec.flag and getattr(args, f.name) is not None}


def build_config(args: argparse.Namespace) -> cfgmod.RunConfig:
    if args.config:
        try:
            text = args.config.read_text()
        except OSError as exc:
            raise cfgmod.ConfigError([f"config: cannot read {args.config} ({exc.strerror})"]) from None
        cfg = cfgmod.from_json(text)
    else:
        cfg = cfgmod.preset_config(
            args.preset, epochs=args.epochs or cfgmod.PRESET_EPOCHS,
            lr=args.lr if args.lr is not None else cfgmod.PRESET_LR)
    cfg = replace(cfg, **_given(args, cfgmod.RunConfig))
    stage_changes = _given(args, cfgmod.StageConfig)
    cfg = replace(cfg, stages=tuple(replace(s, **stage_changes) for s in cfg.stages))
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


def cmd_submit(store: RunStore, args: argparse.Namespace) -> int:
    from core.runs import jobs

    cfg = build_config(args)
    if args.print_config:
        print(cfgmod.to_json(cfg))
        return 0
    run = jobs.submit(store, cfg, name=args.name)  # preflight first: bad data queues nothing
    print(run.id)
    return 0


def cmd_cancel(store: RunStore, run_id: str) -> int:
    from core.runs import jobs

    run = jobs.cancel(store, run_id)
    if run is None:
        print(f"no run {run_id} in {store.root}", file=sys.stderr)
        return 1
    state = "cancel requested (stops between batches)" if run.status == "running" else run.status
    print(f"run {run_id}: {state}", file=sys.stderr)
    return 0 if run.status in ("running", "cancelled") else 1


def cmd_resume(store: RunStore, run_id: str) -> int:
    from core.runs import jobs

    before = store.get_run(run_id)
    if before is None or before.status not in ("failed", "cancelled"):
        state = before.status if before else "missing"
        print(f"run {run_id} is {state}; only failed or cancelled runs resume", file=sys.stderr)
        return 1
    run = jobs.resume(store, run_id)
    print(f"run {run_id}: {run.status if run else 'missing'}", file=sys.stderr)
    return 0


def run_record(r: Run) -> dict[str, Any]:
    """One run as `runs --json` prints it."""
    return {"id": r.id, "name": r.name, "status": r.status, "pid": r.pid, "error": r.error,
            "best_val_acc": r.best_val_acc, "test_acc": r.test_acc, "created_at": r.created_at,
            "executor": r.executor, "job_id": r.job_id, "host": r.host}


def cmd_runs(store: RunStore, as_json: bool) -> int:
    from core.runs.jobs import reconcile

    reconcile(store)
    runs = store.list_runs()
    if as_json:
        for r in runs:  # JSON Lines: a script can read one run per line as it comes
            print(json.dumps(run_record(r)))
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
        if args.command == "submit":
            return cmd_submit(store, args)
        if args.command == "cancel":
            return cmd_cancel(store, args.run_id)
        if args.command == "resume":
            return cmd_resume(store, args.run_id)
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
