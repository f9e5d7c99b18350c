"""Training beside other work: ours' throughput quiet, beside one busy process and beside
two, for the trainer's thread policies, measured interleaved in one invocation.

    python -m benchmarks.contention [--quick] [--data DIR] [--variants ...]

A laptop is never quiet: the browser and the dashboard share the CPU with a run. A busy
process here is a Python busy loop (`while ...: pass`) at the same priority (nice 0), started for
each condition and stopped after it. Each variant is one long-lived measuring process
(OpenMP's wait policy is read once, before torch starts, so a policy needs its own
process) that decodes the data once and then answers "train n batches now" requests with
the images/s of the real `train_one_epoch` in the default runtime, all layers trained
(the heaviest case), batch 128, 32x32, random weights. Rounds go condition by condition,
variant by variant, so background load (other users of the machine) hits all alike.

Variants:
- `auto`: the trainer's default, threads chosen from the CPU free when the stage starts
  (core.engine.train.stage_threads with cpu_threads=0: what a worker does).
- `fixed`: one thread per physical core whatever the load (the trainer before).
- `one`: one thread.
- `passive-fixed`, `passive-auto`: as fixed/auto with OMP_WAIT_POLICY=PASSIVE.

Reported: median images/s per condition and variant, each variant's share of its own quiet
throughput beside 1 and 2 busy processes, and each variant's quiet throughput against
`fixed` (what the policy costs on a quiet machine). The last line is one JSON object with
`one_busy_share` and `two_busy_share` (the default variant, all layers), the same per
variant, the load average before and after, and the threads `auto` chose.
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

VARIANTS = {  # name -> (environment additions, cpu_threads for stage_threads)
    "auto": ({}, 0),
    "fixed": ({}, -1),  # -1: physical cores
    "one": ({}, 1),
    "passive-fixed": ({"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    "passive-auto": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
}
DEFAULT_VARIANT = "auto"
CONDITIONS = {"quiet": 0, "one_busy": 1, "two_busy": 2}
# Busy until its parent (this benchmark) is gone, so a killed benchmark leaves no spinner.
BUSY_CODE = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"


# ---------------------------------------------------------------- the measuring process


def serve(args) -> int:
    """Decode the data, then per request line {"batches", "seed"} train that many batches
    and answer {"ips", "threads"}."""
    from dataclasses import replace

    import torch

    from benchmarks.throughput import BATCH, STAGES, Ours, folder_listing, load_ours
    from core.engine.data import ImageSet, Preprocess
    from core.engine.model import physical_cores
    from core.engine.train import default_runtime, stage_threads

    runtime = default_runtime(torch.device("cpu"))
    policy = args.cpu_threads if args.cpu_threads >= 0 else physical_cores()
    pre = Preprocess(32)
    names, paths, labels, _ = folder_listing(Path(args.data) / "train", args.images, seed=0)
    images, labels_t, _ = load_ours(Path(args.data) / "train", (paths, labels), pre)
    ours = Ours(ImageSet(images, labels_t, names), STAGES["all"], runtime, pre)
    torch.set_num_threads(physical_cores())
    ours.window(2, seed=999)  # warm-up: kernels chosen, memory allocated
    print(json.dumps({"ready": True, "batch": BATCH}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        threads = stage_threads(replace(runtime, cpu_threads=policy))
        torch.set_num_threads(threads)
        ips = ours.window(req["batches"], seed=req["seed"])
        print(json.dumps({"ips": ips, "threads": threads}), flush=True)
    return 0


class Measurer:
    def __init__(self, name: str, args):
        env_add, threads = VARIANTS[name]
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.contention", "--serve", "--cpu-threads", str(threads),
             "--data", args.data, "--images", str(args.images)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **env_add})

    def ready(self) -> None:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"measuring process {self.name} ended before it was ready")

    def measure(self, batches: int, seed: int) -> dict:
        self.proc.stdin.write(json.dumps({"batches": batches, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"measuring process {self.name} ended")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def summarize(ips: dict[tuple[str, str], list[float]], chosen: dict[str, list[int]],
              names: list[str], rounds: int) -> dict:
    """Print the table and return the summary's measured part: `ips` maps (condition,
    variant) to images/s per round, `chosen` the threads the default variant took."""
    med = {k: statistics.median(v) for k, v in ips.items()}
    print(f"\nimages/s, median of {rounds} rounds [min..max]; share = beside busy / quiet:")
    print(f"{'variant':15s} " + " ".join(f"{c:>22s}" for c in CONDITIONS) + f" {'1 busy':>7s} {'2 busy':>7s}")
    shares = {}
    for n in names:
        cells = " ".join(f"{med[(c, n)]:8.0f} [{min(ips[(c, n)]):5.0f}..{max(ips[(c, n)]):5.0f}]"
                         for c in CONDITIONS)
        one, two = med[("one_busy", n)] / med[("quiet", n)], med[("two_busy", n)] / med[("quiet", n)]
        shares[n] = {"one_busy_share": round(one, 3), "two_busy_share": round(two, 3)}
        print(f"{n:15s} {cells} {one:7.1%} {two:7.1%}")
    quiet_vs_fixed = ({n: round(med[("quiet", n)] / med[("quiet", "fixed")], 3) for n in names}
                      if "fixed" in names else None)
    if quiet_vs_fixed:
        print("quiet throughput against 'fixed' (one thread per core whatever the load): "
              + ", ".join(f"{n} {v:.2f}x" for n, v in quiet_vs_fixed.items()))
    print(f"threads '{DEFAULT_VARIANT}' chose: " + ", ".join(f"{c} {v}" for c, v in chosen.items()))
    summary = {
        "default_variant": DEFAULT_VARIANT,
        "one_busy_share": shares[DEFAULT_VARIANT]["one_busy_share"],
        "two_busy_share": shares[DEFAULT_VARIANT]["two_busy_share"],
        "shares": shares, "quiet_vs_fixed": quiet_vs_fixed,
        "images_per_s": {f"{c}/{n}": round(v, 1) for (c, n), v in med.items()},
        "images_per_s_all": {f"{c}/{n}": [round(x, 1) for x in v] for (c, n), v in ips.items()},
        "threads_chosen": chosen, "rounds": rounds,
    }
    return summary


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images, rounds and batches")
    ap.add_argument("--data", default=str(Path.home() / ".cache" / "cifar10-jpg"))
    ap.add_argument("--images", type=int, default=0, help="0 = 2,000 (--quick) or 6,000")
    ap.add_argument("--rounds", type=int, default=0, help="0 = 2 (--quick) or 4")
    ap.add_argument("--batches", type=int, default=0, help="batches per window, 0 = 4 (--quick) or 8")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join(VARIANTS)} (the first is reported as the default)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.images = args.images or (2000 if args.quick else 6000)
    if args.serve:
        return serve(args)

    from benchmarks.summary import cpu_label, emit_summary

    rounds = args.rounds or (2 if args.quick else 4)
    batches = args.batches or (4 if args.quick else 8)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if DEFAULT_VARIANT not in names:
        names.insert(0, DEFAULT_VARIANT)
    started_load = os.getloadavg()
    print(f"== Training beside other work: all layers, batch 128, 32x32, {batches} batches per "
          f"window, {rounds} rounds ==\nmachine: {cpu_label()}, {os.cpu_count()} logical CPUs; "
          f"load average at the start {started_load[0]:.2f}", flush=True)
    measurers = {n: Measurer(n, args) for n in names}
    ips: dict[tuple[str, str], list[float]] = {}
    chosen: dict[str, list[int]] = {}
    try:
        for m in measurers.values():
            m.ready()
        t0 = time.perf_counter()
        for r in range(rounds):
            for cond, n_busy in CONDITIONS.items():
                busy = start_busy(n_busy)
                try:
                    for name, m in measurers.items():
                        got = m.measure(batches, seed=r)
                        ips.setdefault((cond, name), []).append(got["ips"])
                        if name == DEFAULT_VARIANT:
                            chosen.setdefault(cond, []).append(got["threads"])
                finally:
                    stop_busy(busy)
            print(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for m in measurers.values():
            m.close()
    summary = summarize(ips, chosen, names, rounds)
    summary.update({"batches_per_window": batches, "images": args.images, "machine": cpu_label(),
                    "logical_cpus": os.cpu_count(),
                    "load_average_start": [round(x, 2) for x in started_load],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]})
    emit_summary(summary, args.json_out, bench="contention", started_load=started_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
