"""The recipe search on the transfer task, end to end through the lab's own parts: a
search with a wall-time budget of a multiple of one Two-stage run, then its best recipe
confirmed against a preset over fresh seeds on the test split.

    python -m benchmarks.search_transfer [--images 5000] [--budget-mult 3] [--seeds 3]
                                         [--baseline "Fast transfer"] [--json-out FILE]

The task is benchmarks/time_to_accuracy.py's: a ResNet-18 pretrained (from random weights,
32x32) on airplane/automobile/bird/cat/deer, fine-tuned on dog/frog/horse/ship/truck, with
`--images` fine-tuning images before the 90/10 train/validation split and the five
classes' 5,000 test images. Everything runs as the lab runs it: a RunStore in a temporary
folder, runs as background worker processes one at a time (FINETUNE_LAB_MAX_JOBS=1), the
search's driver process, the confirming experiment.

1. One Two-stage run (Experiments' default of 3 epochs per stage), timed from submit to
   its end (worker start, data, training, checkpoints, test): the reference wall time.
   It runs first, so it also pays decoding the JPEGs; the search's trials find them
   decoded.
2. A search with the default space, stopped at `--budget-mult` x that wall time (no new
   trial after it; running trials cancelled then).
3. Confirm: the best trial's recipe against `--baseline` over `--seeds` fresh seeds; the
   experiment's verdict on test accuracy (Welch 95 % interval).

The last line is one JSON object (benchmarks/summary.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.summary import emit_summary
from benchmarks.throughput import DEFAULT_DATA, cpu_model, log
from benchmarks.time_to_accuracy import (
    FINETUNE_CLASSES,
    SEED,
    VAL_FRACTION,
    pretrained_backbone,
)
from core import config as cfgmod

POLL_S = 2.0


def load() -> float:
    return round(os.getloadavg()[0], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search_transfer",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=5000,
                    help="fine-tuning images before the train/validation split")
    ap.add_argument("--budget-mult", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--baseline", default="Fast transfer", choices=cfgmod.PRESETS)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args(argv)
    os.environ["FINETUNE_LAB_MAX_JOBS"] = "1"

    from core.analysis import experiments as ex
    from core.analysis import search as searchmod
    from core.runs import jobs
    from core.runs.store import RunStore

    data_root = Path(args.data).expanduser()
    loads = [load()]
    t_start = time.time()
    log(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; load {loads[0]}")
    backbone = pretrained_backbone(data_root / "train", 5_000, 6)  # time_to_accuracy's --quick one
    log(f"backbone: {backbone}")
    store = RunStore(Path(tempfile.mkdtemp(prefix="search-transfer-")) / "runs")
    base = cfgmod.RunConfig(data_source="folder", data_path=str(data_root),
                            classes=FINETUNE_CLASSES, val_fraction=VAL_FRACTION,
                            max_train_images=args.images, batch_size=128, seed=SEED,
                            weights="file", weights_path=str(backbone), device="cpu")

    def wait(pred, what: str):
        while True:
            value = pred()
            if value:
                return value
            loads.append(load())
            time.sleep(POLL_S)  # polling interval

    # 1. the reference: one Two-stage run as Experiments runs it
    two = replace(base, stages=cfgmod.preset_stages("Two-stage", ex.DEFAULT_EPOCHS_PER_STAGE,
                                                    cfgmod.PRESET_LR))
    t0 = time.time()
    run = jobs.submit(store, two, name="reference Two-stage")
    ref = wait(lambda: (r := store.get_run(run.id)) and not r.is_active and r, "reference")
    ref_wall = time.time() - t0
    log(f"Two-stage ({ex.DEFAULT_EPOCHS_PER_STAGE}+{ex.DEFAULT_EPOCHS_PER_STAGE} epochs): "
        f"{ref.status}, {ref_wall:.0f} s wall, val {ref.best_val_acc:.4f}, test {ref.test_acc:.4f}")

    # 2. the search, stopped at budget_mult x the reference
    budget_s = args.budget_mult * ref_wall
    spec = searchmod.SearchSpec(name="transfer search", base=base, trials=1000,
                                minutes=budget_s / 60.0)
    t1 = time.time()
    sid = searchmod.create_search(store, spec)
    wait(lambda: time.time() - t1 >= budget_s
         or searchmod.summary(store, sid).state != "running", "the budget")
    searchmod.request_stop(store, sid)
    found = wait(lambda: (f := searchmod.summary(store, sid)) and f.state != "running" and f,
                 "the search to stop")
    search_wall = time.time() - t1
    rows = []
    for t in sorted(found.trials, key=lambda t: t.number):
        rows.append({"trial": t.number, "state": t.state, "val_acc": t.val_acc,
                     "epochs_run": t.epochs_run,
                     "epochs_planned": t.config.total_epochs if t.config else None,
                     "pruned_at": t.pruned_at,
                     "recipe": searchmod.describe_recipe(t.config) if t.config else ""})
        log(f"  trial {t.number}: {t.state:<8} val {t.val_acc if t.val_acc is not None else '-'}"
            f"  epochs {t.epochs_run}/{rows[-1]['epochs_planned']}  {rows[-1]['recipe']}")
    pruned = [t for t in found.trials if t.state == "pruned"]
    saved = sum(t.config.total_epochs - t.epochs_run for t in pruned if t.config)
    best = found.best
    log(f"search: {search_wall:.0f} s wall (budget {budget_s:.0f} s), {len(found.trials)} trials, "
        f"{len(pruned)} pruned saving {saved} trial-epochs; best: "
        f"{best.val_acc if best else None}, {searchmod.describe_recipe(best.config) if best else ''}")

    # 3. confirm against the baseline over fresh seeds
    seeds = [searchmod.CONFIRM_SEEDS[0] + i for i in range(args.seeds)]
    t2 = time.time()
    exp = searchmod.confirm(store, sid, args.baseline, seeds)
    res = wait(lambda: (r := ex.experiment_results(store, exp)) and r.active == 0 and r,
               "the confirmation")
    confirm_wall = time.time() - t2
    recipes = {}
    for r in res.recipes:
        recipes[r.recipe.name] = {"val": list(r.val), "test": list(r.test)}
        log(f"  {r.recipe.name}: val {[round(v, 4) for v in r.val]} test "
            f"{[round(v, 4) for v in r.test]}")
    verdicts = {c.metric: {"text": c.text, "diff_pts": c.difference.diff,
                           "low": c.difference.low, "high": c.difference.high}
                for c in res.comparisons}
    for c in res.comparisons:
        log(f"  {c.metric}: {c.text}")
    summary = {
        "benchmark": "search_transfer", "machine": cpu_model(), "logical_cpus": os.cpu_count(),
        "images": args.images, "load_min": min(loads), "load_max": max(loads),
        "reference_two_stage": {"wall_s": round(ref_wall, 1), "val": ref.best_val_acc,
                                "test": ref.test_acc,
                                "epochs_per_stage": ex.DEFAULT_EPOCHS_PER_STAGE},
        "search": {"id": sid, "budget_s": round(budget_s, 1), "wall_s": round(search_wall, 1),
                   "trials": rows, "pruned": len(pruned), "pruned_epochs_saved": saved,
                   "trial_epochs_run": found.trial_epochs_run,
                   "trial_epochs_without_pruning": found.trial_epochs_planned,
                   "best_val": best.val_acc if best else None,
                   "best_recipe": searchmod.describe_recipe(best.config) if best else None,
                   "best_config": cfgmod.to_dict(best.config) if best else None},
        "confirm": {"baseline": args.baseline, "seeds": seeds, "wall_s": round(confirm_wall, 1),
                    "recipes": recipes, "verdicts": verdicts},
        "total_wall_s": round(time.time() - t_start, 1),
    }
    emit_summary(summary, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
