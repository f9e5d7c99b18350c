"""How every benchmark ends: its summary as one JSON object on the last line of stdout
(what scripts and the README read), with --json-out in a file too, and always a results
record under benchmarks/results/ (the summary plus the machine, torch version, date,
command and load average): every figure in the READMEs comes from such a file.
No torch import at module level."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from core.atomic import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where results records go; tests point it at a temporary folder, "" writes none.
RESULTS_ENV = "FINETUNE_LAB_BENCH_RESULTS"


def cpu_identity() -> dict[str, str]:
    """lscpu's model name, CPU family and model (the family/model pair names the
    microarchitecture where the model name does not, e.g. 'AMD EPYC' on a cloud VM)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break
    except OSError:
        pass
    return {"model_name": info.get("model name", platform.processor() or "unknown"),
            "family": info.get("cpu family", "?"), "model": info.get("model", "?")}


def cpu_label() -> str:
    c = cpu_identity()
    return f"{c['model_name']} (family {c['family']} model {c['model']})"


def environment(started_load: tuple[float, float, float] | None = None) -> dict:
    """The facts a figure needs beside it to be checked."""
    import torch

    env = {
        "cpu": cpu_identity(), "logical_cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m", _module_name(), *sys.argv[1:]]),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "env": {k: os.environ[k] for k in ("FINETUNE_LAB_CPU_BF16", "OMP_WAIT_POLICY",
                                           "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
                if k in os.environ},
    }
    if started_load is not None:
        env["load_average_start"] = [round(x, 2) for x in started_load]
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else (sys.argv[0] or "?")


def results_path(bench: str) -> Path | None:
    """A new file for one run of `bench`, or None when results are switched off."""
    folder = os.environ.get(RESULTS_ENV, str(RESULTS_DIR))
    if not folder:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(folder) / f"{bench}-{stamp}-{os.getpid()}.json"


def write_record(bench: str, summary: dict, started_load=None) -> Path | None:
    """Write {"environment": ..., "summary": ...} as a results file; its path."""
    path = results_path(bench)
    if path is None:
        return None
    record = {"benchmark": bench, "environment": environment(started_load), "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def emit_summary(summary: dict, json_out: str = "", bench: str = "",
                 started_load: tuple[float, float, float] | None = None) -> str:
    """Print `summary` as the last line (sorted keys); if `json_out` names a file, write the
    same line there (atomically, its folder made); if `bench` names the benchmark, write its
    results record (see write_record). Returns the line."""
    line = json.dumps(summary, sort_keys=True)
    if json_out:
        atomic_write_text(json_out, line + "\n")
    if bench:
        path = write_record(bench, summary, started_load)
        if path is not None:
            print(f"results record: {path}", file=sys.stderr, flush=True)
    print(line, flush=True)
    return line
