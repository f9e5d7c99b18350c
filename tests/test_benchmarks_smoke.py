"""The benchmarks still run against the code they measure: each on a tiny generated data
set, seconds each, checking only that it ends with its JSON summary. (A refactor of
build_model's return once broke time_to_accuracy and cpu_levers without a failing test.)
No figure is asserted: speed belongs to the benchmarks, not to tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image_folder

# Each runs a real benchmark end to end: minutes at load 15+ on the shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parent.parent
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def run_benchmark(module: str, *args: str, cwd: Path) -> dict:
    """Run `python -m benchmarks.<module> args`; its last line parsed as JSON. Its results
    record (benchmarks.summary) goes to `cwd`/results, not the repository: checked there."""
    results = cwd / "results"
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FINETUNE_LAB_DATA": str(cwd),
                               "FINETUNE_LAB_BENCH_RESULTS": str(results)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    records = [json.loads(p.read_text()) for p in results.glob("*.json")]
    same = json.dumps(summary, sort_keys=True)  # as text: a NaN in both still compares equal
    assert [json.dumps(r["summary"], sort_keys=True) for r in records] == [same]
    env = records[0]["environment"]
    assert env["torch"] and env["cpu"]["model_name"] and env["command"].startswith(
        f"python -m benchmarks.{module}")
    assert len(env["load_average_end"]) == 3
    return summary


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("bench") / "data", per_class=140)


def test_throughput_benchmark_runs(bench_folder, tmp_path):
    summary = run_benchmark("throughput", "--quick", "--data", str(bench_folder), "--images",
                            "400", "--rounds", "1", "--batches", "1", "--acc-epochs", "-1",
                            cwd=tmp_path)
    assert {"stage1_speedup", "all_speedup", "images_per_s"} <= set(summary)
    for key in ("speedup", "compute_speedup"):
        assert set(summary[key]) == {"stage1", "stage2", "all"}
        assert all(v > 0 for v in summary[key].values())


def test_cpu_levers_benchmark_runs(bench_folder, tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.cpu_levers", "--data",
                           str(bench_folder), "--images", "400", "--rounds", "1", "--batches",
                           "1", "--steps", "1", "--skip", "compile,int8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FINETUNE_LAB_DATA": str(tmp_path),
                               "FINETUNE_LAB_BENCH_RESULTS": str(tmp_path / "results")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(list((tmp_path / "results").glob("cpu_levers-*.json"))) == 1


def test_time_to_accuracy_benchmark_runs(tmp_path):
    import torch

    from core.engine.model import build_resnet18

    data = make_image_folder(tmp_path / "cifar-like", per_class=20, classes=CIFAR_CLASSES)
    backbone = tmp_path / "backbone.pt"
    torch.save(build_resnet18(10).state_dict(), backbone)
    summary = run_benchmark("time_to_accuracy", "--quick", "--data", str(data), "--images",
                            "100", "--plain-epochs", "1", "--backbone", str(backbone),
                            "--configs", "preset Fast transfer,preset Two-stage", cwd=tmp_path)
    assert {"time_to_target_s", "speedup", "overhead_share"} <= set(summary)
    assert set(summary["best_val_acc"]) == {"plain", "preset Fast transfer", "preset Two-stage"}


def test_contention_benchmark_runs(bench_folder, tmp_path):
    summary = run_benchmark("contention", "--data", str(bench_folder), "--images", "300",
                            "--rounds", "1", "--batches", "1", "--variants", "auto,fixed",
                            cwd=tmp_path)
    assert {"one_busy_share", "two_busy_share", "shares", "threads_chosen"} <= set(summary)
    assert set(summary["shares"]) == {"auto", "fixed"}
    assert all(v > 0 for v in (summary["one_busy_share"], summary["two_busy_share"]))
