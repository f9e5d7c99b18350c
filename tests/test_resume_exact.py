"""Exact resume, wherever the worker dies: a real worker process is SIGKILLed at every
named point of a small two-stage run (before every training batch, after each checkpoint's
temp file is written but before it replaces the file, before the test pass, before the
outcome is recorded: core/faults.py), the run is resumed, and it must equal an
uninterrupted control run in every metric row and every file."""

from __future__ import annotations

import math
import os
import signal
import subprocess
from dataclasses import replace

import pytest

from core import config as cfgmod
from core.engine.checkpoints import read_checkpoint
from core.engine.data import Preprocess, load_splits
from core.faults import KILL_AT_ENV, TRACE_ENV
from core.runs import jobs
from core.runs.store import RunStore
from core.runs.worker import execute_run
from core.settings import DATA_DIR_ENV
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Depend on time, not on the training: compared only for presence.
TIMED_KEYS = {"epoch_s", "images_per_s"}


def small_config(folder) -> cfgmod.RunConfig:
    """Two stages (2 + 1 epochs) of 2 steps each: a mid-stage resume, a stage boundary and
    every checkpoint kind (best, stage1, last); validation batches count as batch points too."""
    cfg = replace(tiny_config(folder), batch_size=16)
    return cfgmod.with_stage(cfg, 0, epochs=2)


def run_in_process(store: RunStore, run_id: str) -> str:
    assert store.claim_run_now(run_id, os.getpid())
    return execute_run(store, run_id)


def outcome(store: RunStore, run_id: str):
    run = store.get_run(run_id)
    rows = [(m.stage, m.epoch, m.step, m.key, m.value) for m in store.metrics(run_id)]
    files = sorted(p.name for p in store.run_dir(run_id).iterdir() if p.name != "worker.log")
    checkpoints = {name: read_checkpoint(store.run_dir(run_id) / name)
                   for name in files if name.endswith(".pt")}
    return run, rows, files, checkpoints


def assert_same_run(control, resumed, where: str) -> None:
    (c_run, c_rows, c_files, c_ckpts), (r_run, r_rows, r_files, r_ckpts) = control, resumed
    assert r_run.status == "finished", where
    assert r_files == c_files, where
    assert len(r_rows) == len(c_rows), (where, len(r_rows), len(c_rows))
    for c, r in zip(c_rows, r_rows, strict=True):
        assert c[:4] == r[:4], (where, c, r)
        if c[3] not in TIMED_KEYS:
            assert math.isclose(c[4], r[4], rel_tol=1e-5, abs_tol=1e-6), (where, c, r)
    assert (r_run.best_stage, r_run.best_epoch) == (c_run.best_stage, c_run.best_epoch), where
    assert math.isclose(r_run.best_val_acc, c_run.best_val_acc), where
    assert math.isclose(r_run.test_acc, c_run.test_acc), where
    for name, c in c_ckpts.items():
        r = r_ckpts[name]
        assert (r.stage, r.epoch) == (c.stage, c.epoch), (where, name)
        for key, tensor in c.state_dict.items():
            assert (r.state_dict[key].float() - tensor.float()).abs().max() <= 1e-5, (where, name, key)
    assert len(r_run.results.weight_change) == len(c_run.results.weight_change), where
    for c, r in zip(c_run.results.weight_change, r_run.results.weight_change, strict=True):
        assert c.stage == r.stage
        for g, v in c.groups.items():
            assert math.isclose(r.groups[g], v, rel_tol=1e-4, abs_tol=1e-7), (where, g)


def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_run(tmp_path, tiny_folder,
                                                                    monkeypatch):
    store = RunStore(tmp_path / "runs")
    cfg = small_config(tiny_folder)
    # Decode once, so every run below finds the cache and passes the same points.
    load_splits(cfg.data_source, cfg.data_path, Preprocess(cfg.resolution),
                cache_dir=store.layout.cache)

    trace = tmp_path / "points.txt"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    control_run = store.create_run(cfg, name="control")
    assert run_in_process(store, control_run.id) == "finished"
    monkeypatch.delenv(TRACE_ENV)
    points = trace.read_text().split()
    control = outcome(store, control_run.id)
    assert {"stage1.pt", "best.pt", "last.pt"} <= set(control[2])
    assert points.count("batch") == 6 + 3 and "write:stage1.pt" in points, points

    env = {**os.environ, DATA_DIR_ENV: str(store.root), "PYTHONUNBUFFERED": "1"}
    for n, point in enumerate(points, 1):
        where = f"killed at point {n} ({point})"
        run = store.create_run(cfg, name=where)
        assert store.claim_next_queued(1).id == run.id
        log = store.files(run.id).log
        with open(log, "ab") as out:
            worker = subprocess.run(jobs.worker_command(run.id, store), cwd=jobs.PROJECT_ROOT,
                                    env={**env, KILL_AT_ENV: str(n)}, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=300)
        assert worker.returncode == -signal.SIGKILL, (where, log.read_text())
        assert jobs.reconcile(store) == [run.id], where  # dead worker found, temp files gone
        assert store.get_run(run.id).status == "failed"
        assert store.requeue(run.id), where  # what the Resume button does
        assert run_in_process(store, run.id) == "finished", (where, store.get_run(run.id).error)
        assert_same_run(control, outcome(store, run.id), where)
        assert not store.files(run.id).temp_files(), where


def test_resume_is_offered_when_the_first_last_pt_was_never_written(app_env, tiny_folder,
                                                                   no_workers):
    """Killed while writing the first last.pt: best.pt exists, last.pt does not. The run can
    still be resumed (it starts over, which gives the same run), so the page offers it."""
    from tests.test_app_pages import open_page

    run = app_env.create_run(tiny_config(tiny_folder))
    app_env.claim_run_now(run.id, os.getpid())
    app_env.finish_run(run.id, "failed", "killed")
    (app_env.run_dir(run.id) / "best.pt").write_bytes(b"stands in for a checkpoint")
    at = open_page("app_pages/runs.py", selected_run_id=run.id)
    resume = at.button(key="runs.resume")
    assert "starts from the beginning" in resume.label
    resume.click().run()
    assert app_env.get_run(run.id).status == "queued" and no_workers  # Resume queued it
