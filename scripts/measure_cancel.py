"""Click-to-cancelled latency of real background workers, for the README's reliability
section: queue a run, request a cancel (what the Cancel button does) once the worker
reports the phase, and time until the store says "cancelled".

    python scripts/measure_cancel.py [TRIES]

Alternates between cancelling while images decode and while training. Prints each try,
the median and the worst, and the CPU. Everything lives in a temporary folder.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import config as cfgmod  # noqa: E402
from core.runs import jobs  # noqa: E402
from core.runs.store import RunStore  # noqa: E402
from tests.conftest import make_image_folder  # noqa: E402

# (what the store's progress shows when the cancel is sent, in words)
PHASES = (("decoding", lambda p: p.message.startswith("Decoding")),
          ("training", lambda p: p.phase == "training"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def one_try(base: Path, folder: Path, reached) -> float:
    store = RunStore(base)  # a fresh store: a cold decode cache every time
    cfg = cfgmod.preset_config("Two-stage", epochs=3, lr=0.01, data_source="folder",
                               data_path=str(folder), weights="random", batch_size=32,
                               device="cpu")
    run = jobs.submit(store, replace(cfg, val_fraction=0.2))
    deadline = time.monotonic() + 300
    while not reached(store.get_run(run.id).progress):
        if time.monotonic() > deadline or store.get_run(run.id).status != "running":
            raise SystemExit(f"run never reached the phase: {store.get_run(run.id)}")
        time.sleep(0.01)
    asked = time.time()
    jobs.cancel(store, run.id)
    while store.get_run(run.id).status == "running":
        if time.monotonic() > deadline:
            raise SystemExit("the cancel was not honoured")
        time.sleep(0.01)
    final = store.get_run(run.id)
    assert final.status == "cancelled", final
    return final.ended_at - asked


def main() -> None:
    tries = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        # Big enough that decoding outlasts a heartbeat (2 s), so it can be caught.
        folder = make_image_folder(Path(tmp) / "data", per_class=800, size=160)
        latencies = []
        for i in range(tries):
            phase, reached = PHASES[i % len(PHASES)]
            s = one_try(Path(tmp) / f"runs{i}", folder, reached)
            latencies.append(s)
            print(f"try {i + 1}: cancelled while {phase}: {s:.3f} s", flush=True)
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{tries} tries on {cpu_name()} ({os.cpu_count()} cores, load average {load}): median {statistics.median(latencies):.2f} s, "
          f"worst {max(latencies):.2f} s")


if __name__ == "__main__":
    main()
