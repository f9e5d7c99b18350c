"""A cluster run reads its data on whichever node Ray picked: when the data folder or the
weights file is not mounted there, the run fails at once naming that machine and the fix,
instead of a bare "does not exist" (issue 10 §3)."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import replace

from core.runs.preflight import input_paths
from core.runs.store import RunStore
from core.runs.worker import execute_run
from tests.conftest import make_image_folder, tiny_config


def test_inputs_are_the_data_folder_and_the_weights_file(tmp_path):
    cfg = replace(tiny_config(tmp_path / "data"), weights="file", weights_path=str(tmp_path / "w.pt"))
    assert input_paths(cfg) == [tmp_path / "data", tmp_path / "w.pt"]
    assert input_paths(replace(cfg, data_source="cifar10", data_path="", weights="random")) == []


def test_data_not_mounted_where_the_worker_runs_fails_naming_the_machine(tmp_path):
    data = make_image_folder(tmp_path / "data")
    store = RunStore(tmp_path / "store")
    run = store.create_run(tiny_config(data))  # the dashboard saw the folder...
    shutil.rmtree(data)  # ...the node that runs the job does not
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "failed"
    error = store.get_run(run.id).error
    assert f"{data} not visible on {socket.gethostname()}" in error
    assert "every node mounts" in error and "resume" in error
