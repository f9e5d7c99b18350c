"""Per-run overhead of a Ray job vs a local process, on this machine (README "Run on a
cluster"). Runs the same tiny run (generated 3-class image folder, random weights, 1 epoch
per stage, 32 px, 1 thread) REPS times through jobs.submit with each executor, interleaved
so both see the same load, and reports the median of each phase:
  submit:   the jobs.submit call (checks, the run row, handing it to the executor)
  up:       submit -> the worker process has imported its code and opened the store (its
            log's first line; for Ray this includes the job supervisor actor's process,
            the runtime_env and the entrypoint's shell)
  progress: up -> the worker's first progress report
  total:    submit -> the run is settled finished in the store (by the worker itself)

    bash scripts/with_services.sh .venv/bin/python scripts/executor_overhead.py [REPS] \
        [--json-out benchmarks/results/executor_overhead-DATE.json]

Needs the Ray head that scripts/with_services.sh starts (FINETUNE_LAB_TEST_RAY). The
summary (CPU named, load average before and after) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.summary import emit_summary  # noqa: E402
from core.runs import jobs  # noqa: E402
from core.runs.store import RunStore  # noqa: E402
from tests.conftest import make_image_folder, tiny_config  # noqa: E402

POLL_S = 0.005  # how often the store is read while timing, seconds
PHASES = ("submit", "up", "progress", "total")


def time_one(store: RunStore, data: Path) -> dict[str, float]:
    """Seconds of each phase of one run, measured from just before jobs.submit."""
    wall0, t0 = time.time(), time.perf_counter()
    run = jobs.submit(store, tiny_config(data))
    times = {"submit": time.perf_counter() - t0}
    progress_at = None
    while True:
        r = store.get_run(run.id)
        if progress_at is None and r.progress.phase:
            progress_at = time.perf_counter() - t0
        if r.status in ("finished", "failed", "cancelled"):
            assert r.status == "finished", (r.error, jobs.log_tail(store, run.id))
            total = time.perf_counter() - t0
            break
        time.sleep(POLL_S)
    up = worker_up_at(store, run.id) - wall0
    return times | {"up": up, "progress": (progress_at or total) - up, "total": total}


def worker_up_at(store: RunStore, run_id: str) -> float:
    """When the worker wrote its log's first line ("worker pid ..."), seconds since the
    epoch: the same point of core.runs.worker.main on both executors."""
    import datetime

    first = next(line for line in store.files(run_id).log.read_text().splitlines()
                 if " worker pid " in line)
    stamp = datetime.datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", platform.processor()).strip()
    family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    return f"{name} (family {family}, model {model}), {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reps", nargs="?", type=int, default=5)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    ray_url = os.environ.get("FINETUNE_LAB_TEST_RAY")
    if not ray_url:
        raise SystemExit("no Ray head: run through scripts/with_services.sh")
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    data = make_image_folder(tmp / "colors")
    os.environ.setdefault("TORCH_HOME", str(tmp / "torch"))
    os.environ.setdefault("FINETUNE_LAB_DATA_ROOTS", str(tmp))
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    for i in range(args.reps + 1):  # round 0 warms the decode cache and the cluster: not counted
        for executor in ("local", "ray"):  # interleaved: both see the same machine load
            os.environ[jobs.EXECUTOR_ENV] = executor
            os.environ["RAY_ADDRESS"] = ray_url
            store = RunStore(tmp / f"store-{executor}")
            timing = time_one(store, data)
            if i:
                results[executor].append(timing)
            print(f"{executor:5} rep {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                         timing.items())
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    load_after = os.getloadavg()
    med = {k: {p: round(statistics.median(t[p] for t in v), 2) for p in PHASES}
           for k, v in results.items()}
    print(f"\n{cpu_name()}; {args.reps} runs each, medians (s):")
    for k, phases in med.items():
        print(f"  {k:5}: " + ", ".join(f"{p} {v:.2f}" for p, v in phases.items()))
    extra = {p: round(med["ray"][p] - med["local"][p], 2) for p in PHASES}
    print("  Ray minus local: " + ", ".join(f"{p} {v:+.2f}" for p, v in extra.items()))
    import ray

    emit_summary({"benchmark": "executor_overhead", "cpu": cpu_name(), "reps": args.reps,
                  "ray_version": ray.__version__, "medians_s": med, "ray_minus_local_s": extra,
                  "load_average_before": [round(x, 1) for x in load_before],
                  "load_average_after": [round(x, 1) for x in load_after],
                  "runs": results}, args.json_out)


if __name__ == "__main__":
    main()
