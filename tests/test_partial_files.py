"""Temp files of atomic writes: group-readable like the files they become (a dashboard of
another user of the group reads checkpoints), and removed only when their writer is gone:
the supervisor once deleted a live worker's `.last.pt.*.tmp` mid-write (issue 17.2)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from core.atomic import FILE_MODE, atomic_write_text
from core.runs.executors.base import remove_partial_files
from tests.conftest import tiny_config


def test_atomically_written_files_are_readable_by_the_group(tmp_path):
    import torch

    from core.engine.checkpoints import atomic_torch_save

    atomic_write_text(tmp_path / "record.json", "{}")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "last.pt")
    for name in ("record.json", "last.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == FILE_MODE == 0o640


def _temp_file(store, run_id):
    files = store.files(run_id)
    files.folder.mkdir(parents=True, exist_ok=True)
    tmp = files.folder / ".last.pt.abc123.tmp"
    tmp.write_bytes(b"half a checkpoint")
    return files, tmp


def test_a_live_writers_temp_file_is_kept_and_a_dead_ones_removed(store, tiny_folder):
    run = store.create_run(tiny_config(tiny_folder))
    store.claim_run_now(run.id, os.getpid())  # this process: a live worker on this host
    files, tmp = _temp_file(store, run.id)
    assert remove_partial_files(files, store.get_run(run.id)) == []
    assert tmp.exists()

    # The same run on another node (a Ray job the head no longer knows): it may be alive.
    store.set_job(run.id, "ray", run.id, "another-node")
    elsewhere = store.get_run(run.id)
    assert elsewhere.host == "another-node"
    assert remove_partial_files(files, elsewhere) == [] and tmp.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    store.set_pid(run.id, dead.pid)  # records this host and the process's identity
    dead.wait()
    assert remove_partial_files(files, store.get_run(run.id)) == [tmp]
    assert not tmp.exists()
