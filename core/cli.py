"""Command line: the same engine and store as the dashboard.

    python -m core train --preset Two-stage --data-source folder --data-path DIR ...
    python -m core train --config run.json
    python -m core submit ...same options as train...   (queues it, prints the run id)
    python -m core cancel RUN_ID | resume RUN_ID
    python -m core runs [--json]
    python -m core lr-find --config run.json --stage 2
    python -m core search ...data options of train... --trials N [--minutes M]
    python -m core search --status ID [--json] | --stop ID
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
from core.views.text import visible  # every text output: no user's escape sequence or newline


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
    t.add_argument("--note", default="", help="a free-text note on the run (editable on its "
                   "Runs page)")
    t.add_argument("--tag", action="append", default=[], dest="tags", metavar="TAG",
                   help="a tag on the run, repeatable (Overview and Compare filter by tag)")
    t.add_argument("--epochs", type=_positive_int, metavar="N", help=_epochs_help())
    t.add_argument("--lr", type=float, help=f"the preset's learning rate: the first stage's, "
                   f"except Fast transfer's, {cfgmod.FAST_TRANSFER_LR_MULT:g}x it; later stages "
                   f"scale it (presets only, not with --config; default {cfgmod.PRESET_LR:g})")
    for cls in (cfgmod.RunConfig, cfgmod.StageConfig):
        for f, spec in cfgmod.specs(cls):
            if spec.flag:
                _add_field_flag(t, f, spec, typing.get_type_hints(cls)[f.name])
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    lf = sub.add_parser("lr-find", help="LR range test of one stage (recorded as a run)",
                        description="Raise the learning rate exponentially over a short run "
                        "that trains exactly the stage's layer groups, and suggest the LR where "
                        "the loss falls fastest (steepest descent).")
    lsrc = lf.add_mutually_exclusive_group(required=True)
    lsrc.add_argument("--config", type=Path, help="a JSON run config")
    lsrc.add_argument("--run", help="the id of a run whose config to use")
    lf.add_argument("--stage", type=int, default=1, help="the stage to test, 1-based (default 1)")
    lf.add_argument("--start-checkpoint", type=Path, default=None,
                    help="weights a later stage starts from, e.g. a finished run's stage1.pt "
                         "(default: the run's starting weights)")
    lf.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    lf.add_argument("--name", default="", help="added to the recorded run's name")
    lf.add_argument("--json", action="store_true", help="print the curve as JSON")
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

    _add_search_parser(sub, t)
    r = sub.add_parser("runs", help="list runs with status and best accuracy")
    r.add_argument("--json", action="store_true",
                   help="machine-readable output: one JSON object per line per run")
    return p


def _add_search_parser(sub: Any, train: argparse.ArgumentParser) -> None:
    se = sub.add_parser(
        "search", add_help=False, help="search staged recipes in the background (Optuna)",
        description="Search staged recipes (stages, the layer groups each trains, per-stage "
        "learning rates and epochs, schedule, BatchNorm policy, group LR multiplier) on the "
        "data and weights given as for train; each trial is a run. Prints the search id. "
        "Then --status ID [--json] or --stop ID.")
    se._add_container_actions(train)  # the data and weights options of train, exactly
    se.add_argument("--trials", type=_positive_int, default=12, metavar="N",
                    help="trials to run (default 12)")
    se.add_argument("--minutes", type=float, default=None, metavar="M",
                    help="start no new trial after M minutes (default: no time limit)")
    se.add_argument("--space", type=Path, default=None, metavar="FILE",
                    help="a JSON object narrowing or fixing dimensions, e.g. "
                         '{"stages": [2, 2], "schedule": ["onecycle"]}')
    what = se.add_mutually_exclusive_group()
    what.add_argument("--status", metavar="ID", help="print a search's state")
    what.add_argument("--stop", metavar="ID", help="stop a search (running trials are cancelled)")
    se.add_argument("--json", action="store_true", help="with --status: one JSON object")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} epochs: give 1 or more")
    return value


def preset_epoch_plan(name: str) -> str:
    """What `--epochs N` trains for a preset, in words, read off the preset's own stages
    (so the help cannot drift from what runs): "2 stages of N epochs (2xN in all)"."""
    per_stage = [s.epochs for s in cfgmod.preset_stages(name, epochs=1)]
    total = f"{sum(per_stage)}xN"
    if len(set(per_stage)) == 1:
        each = "N" if per_stage[0] == 1 else f"{per_stage[0]}xN"
        stages = f"{len(per_stage)} stage{'s' if len(per_stage) > 1 else ''} of {each} epochs"
    else:
        stages = "stages of " + " + ".join("N" if k == 1 else f"{k}xN" for k in per_stage) + " epochs"
    return f"{stages} ({total} in all)"


def _epochs_help() -> str:
    plans = "; ".join(f"{name}: {preset_epoch_plan(name)}" for name in cfgmod.PRESETS)
    return (f"the preset's length, N >= 1 (default {cfgmod.PRESET_EPOCHS}): {plans}. Not with "
            f"--config (set each stage's epochs in the file)")


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
        preset_knobs = [f"--{k}" for k in ("epochs", "lr") if getattr(args, k) is not None]
        if preset_knobs:  # a config's stages each have their own epochs and lr
            raise cfgmod.ConfigError([f"{' and '.join(preset_knobs)}: set a preset's stages, "
                                      f"not a config file's; edit the stages' epochs and lr "
                                      f"in {args.config}, or use --preset"])
        try:
            text = args.config.read_bytes()
        except OSError as exc:
            raise cfgmod.ConfigError([f"config: cannot read {args.config} ({exc.strerror})"]) from None
        cfg = cfgmod.from_json(text)
    else:
        cfg = cfgmod.preset_config(
            args.preset, epochs=args.epochs if args.epochs is not None else cfgmod.PRESET_EPOCHS,
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
    cfgmod.check_text_limits(name=args.name, note=args.note, tags=args.tags)
    from core.runs.preflight import ExecutorUnavailable, device_problem, preflight

    report = preflight(cfg, store)  # bad data/weights fail here, before a run exists
    if problem := device_problem(cfg):  # it runs here, in the foreground
        raise ExecutorUnavailable([problem])
    for note in report.notes:
        print(f"note: {visible(note)}", file=sys.stderr)
    run = store.create_run(cfg, name=args.name)
    annotate(store, run.id, args)
    # Claim it for this process (bypassing the queue: the user asked for it now).
    store.claim_run_now(run.id, os.getpid())
    print(f"run {run.id}: {' -> '.join(s.trains for s in cfg.stages)} "
          f"({cfg.total_epochs} epochs); store {visible(store.root)}", file=sys.stderr)
    bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
               file=sys.stderr)

    def on_progress(p: RunProgress) -> None:
        bar.n = int(p.fraction * 1000)
        desc = p.phase
        if p.stage:
            desc = f"stage {p.stage}/{p.stages} epoch {p.epoch or '-'}/{p.epochs or '-'}"
        elif p.message:
            desc = visible(p.message)
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
              f"{final.duration_s:.1f} s; checkpoint {visible(final.best_checkpoint)}")
        return 0
    print(f"run {run.id} {status}: {visible(final.error)}", file=sys.stderr)
    return 1


class _TqdmHandler(logging.Handler):
    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.write(visible(self.format(record), keep_newlines=True), file=sys.stderr)


def cmd_lr_find(store: RunStore, args: argparse.Namespace) -> int:
    from core.analysis import lr_finder

    if args.config:
        try:
            cfg = cfgmod.from_json(args.config.read_text())
        except OSError as exc:
            raise cfgmod.ConfigError([f"config: cannot read {args.config} ({exc.strerror})"]) from None
    else:
        run = store.get_run(args.run)
        if run is None:
            print(f"no run {visible(args.run)!r} in {visible(store.root)}", file=sys.stderr)
            return 2
        cfg = cfgmod.check(run.config)
    if not 1 <= args.stage <= len(cfg.stages):
        raise cfgmod.ConfigError([f"stage: the config has stages 1 to {len(cfg.stages)}, "
                                  f"not {args.stage}"])
    if args.steps < lr_finder.SKIP_START + 3:
        raise cfgmod.ConfigError([f"steps: use at least {lr_finder.SKIP_START + 3}"])
    if cfg.threads:  # this process is ours alone (the dashboard leaves threads alone)
        import torch

        torch.set_num_threads(cfg.threads)
    finding = lr_finder.find_lr(
        store, cfg, args.stage, str(args.start_checkpoint) if args.start_checkpoint else None,
        steps=args.steps, on_progress=lambda p: print(
            f"\r{visible(p.message or p.phase)} {100 * (p.data_fraction or p.fraction):3.0f} %",
            end="", file=sys.stderr))
    print(file=sys.stderr)
    run = lr_finder.record(store, cfg, finding, args.name)
    c = finding.curve
    if args.json:
        print(json.dumps({"run": run.id, "stage": finding.stage, "trains": finding.trains,
                          "start": finding.start, "suggested_lr": c.suggested_lr,
                          "min_loss_lr_over_10": c.min_loss_lr_over_10, "diverged": c.diverged,
                          "lrs": c.lrs, "losses": c.losses, "smoothed": c.smoothed}, indent=2))
        return 0
    print(f"stage {finding.stage} ({visible(finding.trains)}) from {visible(finding.start)}")
    print(f"{len(c.lrs)} steps, {c.lrs[0]:.1e} .. {c.lrs[-1]:.1e}"
          f"{' (stopped: the loss diverged)' if c.diverged else ''}")
    if c.suggested_lr is None:
        print(visible(c.suggestion.why))
    else:
        print(f"suggested lr {c.suggested_lr:.2g} (steepest descent); the loss minimum's "
              f"LR / 10 is {c.min_loss_lr_over_10:.2g}")
    print(f"recorded as run {run.id}")
    return 0


def cmd_submit(store: RunStore, args: argparse.Namespace) -> int:
    from core.runs import jobs

    cfg = build_config(args)
    if args.print_config:
        print(cfgmod.to_json(cfg))
        return 0
    # Preflight first: bad data queues nothing. The note and tags are on the run before an
    # executor can pick it up.
    cfgmod.check_text_limits(name=args.name, note=args.note, tags=args.tags)
    run = jobs.submit(store, cfg, name=args.name, start=False)
    annotate(store, run.id, args)
    jobs.dispatch(store)
    print(run.id)
    return 0


def annotate(store: RunStore, run_id: str, args: argparse.Namespace) -> None:
    """The --note and --tag options of train and submit (run metadata, not config fields)."""
    if args.note:
        store.set_note(run_id, args.note)
    if args.tags:
        store.set_tags(run_id, args.tags)


def cmd_cancel(store: RunStore, run_id: str) -> int:
    from core.runs import jobs

    run = jobs.cancel(store, run_id)
    if run is None:
        print(f"no run {visible(run_id)} in {visible(store.root)}", file=sys.stderr)
        return 1
    state = "cancel requested (stops between batches)" if run.status == "running" else run.status
    print(f"run {visible(run_id)}: {state}", file=sys.stderr)
    return 0 if run.status in ("running", "cancelled") else 1


def cmd_resume(store: RunStore, run_id: str) -> int:
    from core.runs import jobs

    before = store.get_run(run_id)
    if before is None or before.status not in ("failed", "cancelled"):
        state = before.status if before else "missing"
        print(f"run {visible(run_id)} is {state}; only failed or cancelled runs resume",
              file=sys.stderr)
        return 1
    run = jobs.resume(store, run_id)
    print(f"run {visible(run_id)}: {run.status if run else 'missing'}", file=sys.stderr)
    return 0


def run_record(r: Run) -> dict[str, Any]:
    """One run as `runs --json` prints it."""
    return {"id": r.id, "name": r.name, "status": r.status, "pid": r.pid, "error": r.error,
            "best_val_acc": r.best_val_acc, "test_acc": r.test_acc, "created_at": r.created_at,
            "executor": r.executor, "job_id": r.job_id, "host": r.host, "note": r.note,
            "tags": list(r.tags), "kind": r.kind, "started_by": r.started_by}


def cmd_runs(store: RunStore, as_json: bool) -> int:
    from core.runs.jobs import cluster_notice, dispatch, reconcile

    # Settling a dead run frees its slot: then the next queued run starts and a supervisor
    # watches (issue 22.2), so the listing never leaves the queue stalled behind it.
    if reconcile(store):
        dispatch(store)
    if notice := cluster_notice(store):
        print(visible(notice), file=sys.stderr)
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
        print(f"{visible(r.id):<23} {r.status:<10} {val:>8} {test:>6}  {visible(r.name)}")
    return 0


def cmd_search(store: RunStore, args: argparse.Namespace) -> int:
    from core.analysis import search as searchmod

    if args.status:
        found = searchmod.summary(store, args.status)
        status = found.to_status()
        if args.json:
            print(json.dumps(status))
            return 0
        print(f"search {visible(found.id)} ({visible(found.spec.name)}): {found.state}; "
              f"{status['trials']} of "
              f"{found.spec.trials} trials: {status['finished']} finished, {status['pruned']} "
              f"pruned, {status['failed']} failed, {status['running']} running")
        if status["best"]:
            print(f"best: trial {status['best']['trial']} (run {visible(status['best']['run_id'])}), "
                  f"val acc {status['best']['val_acc']:.4f}: {status['best']['recipe']}")
        return 0
    if args.stop:
        searchmod.request_stop(store, args.stop)
        print(f"search {visible(args.stop)}: stop requested (running trials are cancelled)",
              file=sys.stderr)
        return 0
    if args.note or args.tags:  # train's options; a search's runs are named after it
        raise cfgmod.ConfigError(["--note/--tag: label runs, not searches; each trial run is "
                                  "named after the search (--name)"])
    space = searchmod.SearchSpace()
    if args.space is not None:
        try:
            given = json.loads(args.space.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise cfgmod.ConfigError([f"space: cannot read {args.space} ({exc})"]) from None
        unknown = sorted(set(given) - {d.name for d in searchmod.DIMENSIONS}) if isinstance(
            given, dict) else ["(not an object)"]
        if unknown:
            raise cfgmod.ConfigError([f"space: unknown dimensions {', '.join(unknown)}; known: "
                                      f"{', '.join(d.name for d in searchmod.DIMENSIONS)}"])
        space = searchmod.SearchSpace.from_dict(given)
    spec = searchmod.SearchSpec(name=args.name, base=build_config(args), space=space,
                                trials=args.trials, minutes=args.minutes)
    if args.print_config:
        print(spec.to_json())
        return 0
    print(searchmod.create_search(store, spec))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        store = RunStore(args.data_dir)
        if args.command == "train":
            return cmd_train(store, args)
        if args.command == "lr-find":
            return cmd_lr_find(store, args)
        if args.command == "submit":
            return cmd_submit(store, args)
        if args.command == "cancel":
            return cmd_cancel(store, args.run_id)
        if args.command == "resume":
            return cmd_resume(store, args.run_id)
        if args.command == "search":
            return cmd_search(store, args)
        return cmd_runs(store, args.json)
    except cfgmod.ConfigError as exc:
        from core.runs.preflight import ExecutorUnavailable

        heading = "cannot submit" if isinstance(exc, ExecutorUnavailable) else "invalid config"
        print(f"{heading}:\n  " + "\n  ".join(visible(e) for e in exc.errors), file=sys.stderr)
        return 2
    except Exception as exc:
        from core.analysis.search import SearchError
        from core.runs.store import StoreError

        if isinstance(exc, (StoreError, SearchError)):
            print(visible(exc), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
