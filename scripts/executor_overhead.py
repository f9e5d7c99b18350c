"""Per-run overhead of a Ray job vs a local process, on this machine (README "Run on a
cluster"). Runs the same tiny run (generated 3-class image folder, random weights, 1 epoch
per stage, 32 px, 1 thread) REPS times through jobs.submit with each executor and reports the
median of:
  start:  submit -> the worker process reports itself (its first progress, "loading data")
  total:  submit -> the run is settled finished in the store

    bash scripts/with_services.sh .venv/bin/python scripts/executor_overhead.py [REPS]

Needs the Ray head that scripts/with_services.sh starts (FINETUNE_LAB_TEST_RAY).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runs import jobs  # noqa: E402
from core.runs.store import RunStore  # noqa: E402
from tests.conftest import make_image_folder, tiny_config  # noqa: E402

POLL_S = 0.005  # how often the store is read while timing, seconds


def time_one(store: RunStore, data: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    run = jobs.submit(store, tiny_config(data))
    started = None
    while True:
        r = store.get_run(run.id)
        if started is None and r.progress.phase:
            started = time.perf_counter() - t0
        if r.status in ("finished", "failed", "cancelled"):
            assert r.status == "finished", (r.error, jobs.log_tail(store, run.id))
            return started or float("nan"), time.perf_counter() - t0
        time.sleep(POLL_S)


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} CPUs"


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    ray_url = os.environ.get("FINETUNE_LAB_TEST_RAY")
    if not ray_url:
        raise SystemExit("no Ray head: run through scripts/with_services.sh")
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    data = make_image_folder(tmp / "colors")
    os.environ.setdefault("TORCH_HOME", str(tmp / "torch"))
    results: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    for i in range(reps + 1):  # round 0 warms the decode cache and the cluster: not counted
        for executor in ("local", "ray"):  # interleaved: both see the same machine load
            os.environ[jobs.EXECUTOR_ENV] = executor
            os.environ["RAY_ADDRESS"] = ray_url
            store = RunStore(tmp / f"store-{executor}")
            timing = time_one(store, data)
            if i:
                results[executor].append(timing)
            print(f"{executor:5} rep {i}: start {timing[0]:.2f} s, total {timing[1]:.2f} s",
                  flush=True)
    print(f"\n{cpu_name()}; {reps} runs each, medians:")
    med = {k: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v))
           for k, v in results.items()}
    for k, (s, t) in med.items():
        print(f"  {k:5}: submit -> worker running {s:.2f} s, submit -> finished {t:.2f} s")
    print(f"  Ray overhead per run: {med['ray'][1] - med['local'][1]:+.2f} s total, "
          f"{med['ray'][0] - med['local'][0]:+.2f} s to start")


if __name__ == "__main__":
    main()
