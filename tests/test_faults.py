"""Faults and hostile input outside the UI: server gone mid-run, foreign checkpoints,
missing weights, paths outside the data roots."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from core.config import RunConfig
from core.engine.checkpoints import CheckpointError, atomic_torch_save, read_checkpoint
from core.engine.model import WeightsError, build_model, imagenet_state_dict, load_weights_file
from core.engine.paths import PathNotAllowed, resolve_user_path
from core.runs import jobs
from tests.conftest import tiny_config, wait_for

SUBMITTER = """
import sys, time
from core import config as cfgmod
from core.runs import jobs
from core.runs.store import RunStore
cfg = cfgmod.from_json(open(sys.argv[2]).read())
run = jobs.submit(RunStore(sys.argv[1]), cfg)
print(run.id, flush=True)
time.sleep(600)  # stands in for a Streamlit server that stays up until killed
"""


def test_run_survives_the_server_process_group_being_killed(store, tiny_folder, tmp_path):
    from core import config as cfgmod

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfgmod.to_json(cfgmod.with_stage(tiny_config(tiny_folder), 0, epochs=3)))
    server = subprocess.Popen([sys.executable, "-c", SUBMITTER, str(store.root), str(cfg_file)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    run_id = server.stdout.readline().strip()
    wait_for(lambda: store.get_run(run_id).pid, 60, "the worker to start")
    os.killpg(server.pid, signal.SIGKILL)  # the whole "server" process group dies
    server.wait(timeout=30)
    # A new "server" (this test process) picks the run up from the store.
    wait_for(lambda: store.get_run(run_id).status != "running" or None, 180, "the run to end")
    jobs.reconcile(store)
    final = store.get_run(run_id)
    assert final.status == "finished", (final.error, jobs.log_tail(store, run_id))


def test_stale_running_row_after_a_machine_restart_is_failed_and_resumable(store, tiny_folder):

    run = store.create_run(tiny_config(tiny_folder))
    # What a machine restart leaves: status running, a pid that no longer exists.
    store.claim_run_now(run.id, pid=2**22 + 12345)
    assert jobs.reconcile(store) == [run.id]
    failed = store.get_run(run.id)
    assert failed.status == "failed" and "resumed" in failed.error
    jobs.resume(store, run.id)
    wait_for(lambda: store.get_run(run.id).status in ("finished", "failed"), 180, "the resumed run")
    assert store.get_run(run.id).status == "finished"


def test_heartbeat_bound_marks_silent_workers_on_other_hosts_failed(store):
    from dataclasses import replace

    run = store.create_run(RunConfig())
    store.claim_run_now(run.id, os.getpid())
    elsewhere = replace(store.get_run(run.id), host="another-machine")  # its pid is not ours to check
    now = time.time()
    assert jobs.liveness_problem(elsewhere, now=now) is None
    late = jobs.liveness_problem(elsewhere, now=now + jobs.STALE_AFTER_S + 1)
    assert late and "no heartbeat" in late
    # On this machine the process itself is checked: alive means alive, however late.
    assert jobs.liveness_problem(store.get_run(run.id), now=now + 10 * jobs.STALE_AFTER_S) is None


def test_a_foreground_cli_run_is_not_declared_dead(store):
    """The CLI trains in its own process (no run id on its command line)."""
    run = store.create_run(RunConfig())
    store.claim_run_now(run.id, os.getpid())
    assert jobs.reconcile(store) == []
    assert store.get_run(run.id).status == "running"


def test_a_reused_pid_does_not_count_as_the_worker(store):
    run = store.create_run(RunConfig())
    store.claim_run_now(run.id, os.getpid())
    with sqlite3.connect(store.db_path) as con:  # as if our pid had been recycled
        con.execute("UPDATE runs SET pid_start='1' WHERE id=?", (run.id,))
    assert jobs.reconcile(store) == [run.id]


def test_a_settled_run_tells_its_worker_to_stop(store):
    run = store.create_run(RunConfig())
    store.claim_run_now(run.id, os.getpid())
    assert store.heartbeat(run.id) is False
    store.finish_run(run.id, "failed", "declared dead")
    assert store.heartbeat(run.id) is True  # the worker's should_stop turns true


def test_files_that_are_not_our_checkpoints(tmp_path, finished_run):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded safely|not a checkpoint"):
        read_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    atomic_torch_save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a Fine-Tuning Lab checkpoint"):
        read_checkpoint(plain)
    _, run = finished_run
    ckpt = torch.load(run.best_checkpoint, weights_only=True)
    ckpt["arch"] = "resnet50"
    other = tmp_path / "other-arch.pt"
    atomic_torch_save(ckpt, other)
    with pytest.raises(CheckpointError, match="resnet50"):
        read_checkpoint(other)
    # A pickle that would run code is refused by weights_only loading.
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)


def test_weights_that_do_not_fit_resnet18(tmp_path):
    import torchvision

    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), wrong)
    with pytest.raises(WeightsError, match="not ResNet-18|do not fit ResNet-18"):
        build_model(3, "file", str(wrong))
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights_file(tmp_path / "missing.pth")


def test_missing_imagenet_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as exc:
        imagenet_state_dict(download=False)
    text = str(exc.value)
    assert "resnet18-f37072fd.pth" in text and str(tmp_path) in text
    assert "random" in text and "run" in text


def test_paths_are_confined_to_data_roots(tmp_path):
    root = tmp_path / "data"
    (root / "flowers").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "escape")
    assert resolve_user_path("flowers", [root]) == (root / "flowers").resolve()
    assert resolve_user_path(str(root / "flowers"), [root]) == (root / "flowers").resolve()
    for bad in ["/etc", "../secret", str(root / "flowers" / ".." / ".." / "secret"), "escape", ""]:
        with pytest.raises(PathNotAllowed):
            resolve_user_path(bad, [root])


def test_process_identity_and_liveness_through_psutil():
    from core.process import is_alive, physical_cores, process_identity

    me = process_identity(os.getpid())
    assert me is not None and me == process_identity(os.getpid())
    assert is_alive(os.getpid(), me) and is_alive(os.getpid())
    assert not is_alive(os.getpid(), "1")  # same pid, another process's start time
    assert process_identity(2**22 + 12345) is None and not is_alive(2**22 + 12345)
    # A child that exited but was not reaped yet is a zombie: dead for us.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    import psutil

    wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 30, "a zombie")
    assert not is_alive(child.pid)
    child.wait()
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
