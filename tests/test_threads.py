"""Threads a CPU stage trains with: chosen from the CPU other work leaves free, recorded in
the run's metrics and its resumable training state, and reused by a resume part-way
through the stage (issue 18 part 3). No timing is asserted: speed belongs to
benchmarks/contention.py."""

from dataclasses import replace

import pytest
import torch

from core import config as cfgmod
from core.engine.checkpoints import Checkpoint, TrainingState, read_checkpoint, save_checkpoint
from core.engine.data import Preprocess, load_splits
from core.engine.model import build_resnet18
from core.engine.train import (
    THREADS_KEY,
    ResumeState,
    Runtime,
    TrainHooks,
    busy_cpus_elsewhere,
    run_stages,
    stage_threads,
    threads_for_free_cpu,
)
from core.process import physical_cores
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits(tiny_folder):
    return load_splits("folder", str(tiny_folder), Preprocess(32), val_fraction=0.25, seed=0)


def test_threads_follow_the_cores_other_work_leaves_free():
    assert threads_for_free_cpu(2, 0.0) == 2  # quiet: one per core
    assert threads_for_free_cpu(2, 0.3) == 2  # a little background work keeps both
    assert threads_for_free_cpu(2, 1.0) == 1  # one busy process: the other core
    assert threads_for_free_cpu(2, 2.0) == 1  # never fewer than one
    assert threads_for_free_cpu(2, 7.5) == 1
    assert threads_for_free_cpu(8, 2.6) == 5
    assert threads_for_free_cpu(1, 0.0) == 1
    assert busy_cpus_elsewhere(0.05) >= 0.0


def test_stage_threads_policy():
    cpu = torch.device("cpu")
    assert stage_threads(Runtime(cpu)) is None  # not a worker: the process's setting stays
    assert stage_threads(Runtime(cpu, cpu_threads=3)) == 3
    assert stage_threads(Runtime(cpu, cpu_threads=3), recorded=1) == 1  # a resumed stage
    assert 1 <= stage_threads(Runtime(cpu, cpu_threads=0)) <= physical_cores()  # from the free CPU


def _train(cfg, splits, runtime, resume=None, seen=None):
    torch.manual_seed(cfg.seed)
    model = build_resnet18(len(splits.classes))
    rows, ends = [], []
    hooks = TrainHooks(on_metrics=rows.extend,
                       on_epoch_end=lambda e: ends.append((e, torch.get_num_threads())))
    run_stages(model, cfg, splits, Preprocess(32), runtime, hooks, resume)
    return rows, ends


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains 5 tiny epochs: minutes at load 30+ on the shared machine
def test_a_stage_records_its_threads_and_a_resume_reuses_them(tiny_folder, splits, tmp_path):
    cfg = replace(tiny_config(tiny_folder), stages=(
        cfgmod.StageConfig(groups=("fc",), epochs=2, lr=0.01),
        cfgmod.StageConfig(groups=("fc",), epochs=1, lr=0.01)))
    rows, ends = _train(cfg, splits, Runtime(cpu_threads=2))
    assert [(s, v) for s, _, _, k, v in rows if k == THREADS_KEY] == [(1, 2.0), (2, 2.0)]
    assert [(e.training_state.threads, n) for e, n in ends] == [(2, 2), (2, 2), (2, 2)]

    # The saved state carries the threads through a checkpoint file.
    first = ends[0][0]
    path = tmp_path / "last.pt"
    save_checkpoint(path, Checkpoint(first.model.state_dict(), cfgmod.to_dict(cfg), list(splits.classes),
                                     {}, 1, 1, training_state=first.training_state))
    state = read_checkpoint(path).training_state
    assert state.threads == 2

    # Resumed after epoch 1 of stage 1 on a machine whose policy now says 1 thread: the rest
    # of stage 1 keeps the 2 it started with; stage 2 starts fresh and takes the policy's 1.
    # (model_state is only the resumed weights: the thread choice is what is checked here.)
    resume = ResumeState({k: v.clone() for k, v in ends[0][0].model.state_dict().items()}, state)
    rows2, ends2 = _train(cfg, splits, Runtime(cpu_threads=1), resume)
    assert [(e.stage, e.epoch, e.training_state.threads, n) for e, n in ends2] == [
        (1, 2, 2, 2), (2, 1, 1, 1)]
    assert [(s, v) for s, _, _, k, v in rows2 if k == THREADS_KEY] == [(2, 1.0)]


def test_checkpoints_from_before_threads_were_recorded_still_load():
    state = TrainingState(global_epoch=1, step=1, optimizer={}, scheduler={}, rng=torch.zeros(1),
                          best_val_acc=0.0, best_stage=1, best_epoch=1)
    assert state.threads == 0  # 0: a resume chooses as a fresh stage would
    assert stage_threads(Runtime(cpu_threads=1), recorded=state.threads) == 1
