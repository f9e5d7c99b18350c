"""Helpers for the tests against real Ray heads: a pgpass file for the store's password (jobs
carry the store URL without it), and a second Ray head of a test's own, on other ports, that
the test may kill without touching the shared one (never `ray stop`: it ends every Ray
process of the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest
from sqlalchemy.engine import make_url

from core.runs import jobs, supervisor
from tests.conftest import wait_for

RAY_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "ray"


def ray_head_url() -> str:
    """The shared test Ray head's job-submission URL (FINETUNE_LAB_TEST_RAY, which
    scripts/with_services.sh sets). Without it the calling test module is skipped, and in CI
    (CI set) it fails instead."""
    url = os.environ.get("FINETUNE_LAB_TEST_RAY")
    if not url:
        if os.environ.get("CI"):
            raise RuntimeError("CI is set but FINETUNE_LAB_TEST_RAY is not: start a Ray head "
                               "(scripts/with_services.sh) for the cluster tests")
        pytest.skip("no Ray head: set FINETUNE_LAB_TEST_RAY (scripts/with_services.sh does)",
                    allow_module_level=True)
    return url


def ray_store_fixture(ray_url: str):
    """A `store` fixture: PostgreSQL as a cluster uses it, its password in a pgpass file
    (jobs never carry it), the executor set to Ray at `ray_url`; what a test leaves running
    is stopped after it."""

    @pytest.fixture
    def store(pg_store, tmp_path, monkeypatch):
        monkeypatch.setenv("PGPASSFILE", str(write_pgpass(pg_store.url, tmp_path)))
        monkeypatch.setenv("FINETUNE_LAB_DB", pg_store.url)  # the command line's store too
        monkeypatch.setenv(jobs.EXECUTOR_ENV, "ray")
        monkeypatch.setenv("RAY_ADDRESS", ray_url)
        yield pg_store
        for run in pg_store.list_runs(statuses=("running",)):
            jobs.kill(pg_store, run.id)
        for run in pg_store.list_runs(statuses=("queued",)):
            jobs.cancel(pg_store, run.id)
        wait_for(lambda: not supervisor.is_running(pg_store), 60, "the supervisor to exit")

    return store


def write_pgpass(url: str, folder: Path) -> Path:
    """A libpq password file (mode 0600, as libpq requires) for the store at `url`: how a
    cluster's nodes get the store's password without it riding in a job's environment."""
    u = make_url(url)
    path = folder / "pgpass"
    path.write_text(f"{u.host}:{u.port or 5432}:*:{u.username}:{u.password}\n")
    path.chmod(0o600)
    return path


class OwnRayHead:
    """A Ray head started by a test (`ray start --head --block` in its own session), its
    temp folder short enough for Ray's unix sockets."""

    def __init__(self, cpus: int, port: int, dashboard_port: int):
        self.port, self.dashboard_port = port, dashboard_port
        self.url = f"http://127.0.0.1:{dashboard_port}"
        self.temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        self.log = open(self.temp / "head.log", "wb")
        self.proc = subprocess.Popen(
            [str(RAY_BIN if RAY_BIN.exists() else shutil.which("ray")), "start", "--head",
             "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
             f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={port + 1}",
             f"--dashboard-agent-listen-port={port + 2}", "--disable-usage-stats",
             f"--temp-dir={self.temp}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 240) -> OwnRayHead:
        """Until its dashboard lists an alive node (jobs can be placed then)."""
        def alive_node() -> bool:
            assert self.proc.poll() is None, (self.temp / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/api/v0/nodes", timeout=5) as r:
                    nodes = json.load(r)["data"]["result"]["result"]
                with urllib.request.urlopen(f"{self.url}/api/jobs/", timeout=5) as r:
                    r.read()  # the job API answers too (it starts after the node list)
                # Ray's client server listens once it found the node; on a loaded machine it
                # may give up first (30 s, fixed), and `ray start --block` then ends the head.
                socket.create_connection(("127.0.0.1", self.port + 1), 5).close()
                return any(n["state"] == "ALIVE" for n in nodes)
            except (OSError, ValueError, KeyError):
                return False

        wait_for(alive_node, timeout_s, "the test's own Ray head")
        return self

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill_head_services(self) -> list[str]:
        """SIGKILL what makes the head a head (GCS, dashboard, monitors), as when its
        machine dies, leaving the raylet and its workers: a node that lost its head. Returns
        the names killed."""
        killed = []
        for proc in self.processes():
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(part in cmd for part in ("gcs_server", "dashboard.py", "monitor.py",
                                            "ray.util.client.server", "log_monitor.py")):
                try:
                    proc.kill()
                    killed.append(proc.name())
                except psutil.Error:
                    pass
        return killed

    def close(self) -> None:
        """Kill every process this head started (its raylet, workers, job supervisors) and
        the `ray start` itself, then remove its folder."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait(timeout=30)
        psutil.wait_procs(procs, timeout=30)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
