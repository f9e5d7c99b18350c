"""The search driver: one detached process per search that runs its Optuna study,
ask-and-tell, over ordinary runs.

    python -m core.runs.search_driver SEARCH_ID [--data-dir DIR]

Every few moments it looks at each unfinished trial's run in the store, reports the run's
new validation accuracies to Optuna (one step per validated epoch, across stages), cancels
the run through the store when the pruner rejects it, tells Optuna how each trial ended,
and asks for new trials while the budget and the queue's slots allow (submitted through
core.runs.jobs: they queue, run locally or as Ray jobs, and resume like any run).

Everything it knows is in the storage, and every step is safe to repeat, so a driver killed
at any point (SIGKILL included) is replaced by one that continues the study: a trial whose
recipe was stored but whose run id was not is matched to its run by name, or submitted
then; a trial whose driver died while sampling it (no recipe stored) is closed as failed
and never became a run. A lock file keeps one driver per search on a machine. A store
error is "try again", never death. No torch import here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from core import config as cfgmod
from core.analysis import search as searchmod
from core.runs import jobs
from core.runs.entities import DONE
from core.runs.executors.local import spawn_detached
from core.runs.store import Run, RunStore
from core.runs.supervisor import _lock

log = logging.getLogger("finetune_lab.search_driver")
POLL_S = 1.0  # seconds between looks at the store: an epoch takes far longer
PROBE_WAIT_S = 2.0  # how long a starting driver waits for its lock, seconds


def lock_path(store: RunStore, search_id: str) -> Path:
    return store.layout.search_drivers / f"{search_id}.lock"


def log_path(store: RunStore, search_id: str) -> Path:
    return store.layout.search_drivers / f"{search_id}.log"


def is_running(store: RunStore, search_id: str) -> bool:
    """Whether a driver holds this search's lock."""
    with _lock(lock_path(store, search_id)) as free:
        return not free


def ensure_running(store: RunStore, search_id: str) -> None:
    """Start the search's driver unless one runs (a second one started in a race finds the
    lock taken and exits)."""
    if is_running(store, search_id):
        return
    cmd = [sys.executable, "-m", "core.runs.search_driver", search_id,
           "--data-dir", str(store.root)]
    env = {**os.environ, **store.environment(), "PYTHONUNBUFFERED": "1"}
    log_path(store, search_id).parent.mkdir(parents=True, exist_ok=True)
    spawn_detached(cmd, log_path(store, search_id), env)


def ensure_drivers(store: RunStore) -> list[str]:
    """Start a driver for every search that has not ended and has none (after a machine
    restart nothing else would). Returns the ids started. What the Search page does."""
    started = []
    for search_id in searchmod.list_searches(store):
        study = searchmod.load_study(store, search_id)
        if not study.user_attrs.get("ended") and not is_running(store, search_id):
            ensure_running(store, search_id)
            started.append(search_id)
    return started


def trial_run_name(spec: searchmod.SearchSpec, number: int) -> str:
    """A trial's run name: also how a restarted driver finds a run whose id it never
    stored (the run is created in one transaction with its name and group)."""
    return f"{spec.name} · trial {number}"


def _val_accs(store: RunStore, run_id: str) -> list[float]:
    """The run's validation accuracy per validated epoch, in order."""
    return [m.value for m in store.metrics(run_id, keys=("val/acc",))]


def _trial(study: Any, frozen: Any) -> Any:
    """A live Trial for a stored, unfinished one (reports and pruning decisions go through
    it), in any process: ask-and-tell keeps no state outside the storage."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def _submit(store: RunStore, spec: searchmod.SearchSpec, search_id: str, number: int,
            cfg: cfgmod.RunConfig) -> Run:
    run = store.create_run(cfg, name=trial_run_name(spec, number), group=search_id,
                           kind="trial")
    return run


def _finish(study: Any, trial: Any, state: Any, outcome: str, value: float | None = None,
            **attrs: Any) -> None:
    """Record how the trial ended (attributes first: a driver killed between the two
    steps sets them again and tells then), and tell Optuna."""
    for key, v in {**attrs, "outcome": outcome}.items():
        trial.set_user_attr(key, v)
    study.tell(trial, value, state=state, skip_if_finished=True)
    log.info("trial %d: %s", trial.number, outcome)


def advance_trial(store: RunStore, study: Any, spec: searchmod.SearchSpec, search_id: str,
                  frozen: Any, stopping: bool) -> bool:
    """One look at an unfinished trial. Returns whether it is still active."""
    from optuna.trial import TrialState

    attrs = frozen.user_attrs
    trial = _trial(study, frozen)
    if "config" not in attrs:  # its driver died while sampling: it never became a run
        _finish(study, trial, TrialState.FAIL, "abandoned before it became a run")
        return False
    run_id = attrs.get("run_id")
    if run_id is None:  # its driver died between submitting and recording the run
        name = trial_run_name(spec, frozen.number)
        found = [r for r in store.list_runs(group=search_id) if r.name == name]
        if found:
            run = found[-1]
        else:
            cfg = cfgmod.from_dict(attrs["config"])
            run = _submit(store, spec, search_id, frozen.number, cfg)
        jobs.dispatch(store)  # it may never have been handed to the executor
        trial.set_user_attr("run_id", run.id)
        run_id = run.id
    run = store.get_run(run_id)
    if run is None:
        _finish(study, trial, TrialState.FAIL, "its run was deleted")
        return False
    reported = frozen.intermediate_values
    pruned_at = attrs.get("pruned_at")
    for step, value in enumerate(_val_accs(store, run_id), 1):
        if step not in reported:
            trial.report(value, step)
            # Judged at every new epoch, not only the last: successive halving records a
            # trial at each rung it passes.
            # Asked at every new epoch, even when the answer cannot matter: successive
            # halving records the trial at each rung it reaches when asked. Never acted on
            # at the run's last epoch: nothing is left to save, and its test result would
            # be lost.
            prune = trial.should_prune()
            if (prune and pruned_at is None and not stopping and run.status == "running"
                    and step < run.config.total_epochs):
                pruned_at = step
                trial.set_user_attr("pruned_at", step)
                log.info("trial %d (run %s): pruned at epoch %d", frozen.number, run_id, step)
    if pruned_at is not None and run.status == "running":
        jobs.cancel(store, run_id)  # again after a restart: asking twice is harmless
        return True
    if stopping and run.is_active:
        jobs.cancel(store, run_id)
        return True
    if run.status not in DONE:
        return True
    if pruned_at is not None and run.status == "cancelled":
        # The worker settled it "cancelled by request"; the reason says why.
        reason = f"pruned at epoch {pruned_at}"
        if run.error != reason:
            store.finish_run(run_id, "cancelled", reason)
        _finish(study, trial, TrialState.PRUNED, reason)
    elif run.status == "finished" and run.best_val_acc is not None:
        _finish(study, trial, TrialState.COMPLETE, "finished", value=run.best_val_acc)
    elif run.status == "cancelled" and stopping:
        _finish(study, trial, TrialState.FAIL, "stopped with the search", stopped=True)
    else:
        reason = run.error or run.status
        _finish(study, trial, TrialState.FAIL, f"{run.status}: {reason}")
    return False


def step(store: RunStore, study: Any, search_id: str, now: float) -> bool:
    """One look at the whole search: advance every unfinished trial, then ask for new ones
    while the budget and the slots allow. Returns whether the search is over."""
    from optuna.trial import TrialState

    spec = searchmod.read_spec_of(study)
    stopping = bool(study.user_attrs.get("stop_requested"))
    trials = study.get_trials(deepcopy=False)
    active = sum(advance_trial(store, study, spec, search_id, t, stopping)
                 for t in trials if t.state == TrialState.RUNNING)  # WAITING: enqueued, not asked
    started = sum("config" in t.user_attrs for t in study.get_trials(deepcopy=False))
    out_of_time = spec.deadline is not None and now >= spec.deadline
    slots = max(1, jobs.max_jobs())
    submitted = False
    while not stopping and not out_of_time and started < spec.trials and active < slots:
        trial = study.ask()
        params = searchmod.suggest(trial, spec.space)
        cfg = searchmod.recipe(spec.base, params)
        errors = cfgmod.validate(cfg)
        # The recipe is stored before its run exists: a restart finds the run by name or
        # submits it from this.
        trial.set_user_attr("config", cfgmod.to_dict(cfg))
        started += 1
        if errors:
            _finish(study, trial, TrialState.FAIL, "invalid recipe: " + "; ".join(errors))
            continue
        run = _submit(store, spec, search_id, trial.number, cfg)
        trial.set_user_attr("run_id", run.id)
        log.info("trial %d: run %s, %s", trial.number, run.id, searchmod.describe_recipe(cfg))
        active += 1
        submitted = True
    if submitted:
        jobs.dispatch(store)
    if active == 0 and (stopping or out_of_time or started >= spec.trials):
        study.set_user_attr("ended", "stopped" if stopping else "finished")
        study.set_user_attr("ended_at", now)
        return True
    return False


def drive(store: RunStore, search_id: str) -> None:
    """Run the search to its end. Holds the search's lock while it runs."""
    with _lock(lock_path(store, search_id), wait_s=PROBE_WAIT_S) as held:
        if not held:
            log.info("another driver runs %s", search_id)
            return
        study = searchmod.load_study(store, search_id)
        if study.user_attrs.get("ended"):
            log.info("%s has ended", search_id)
            return
        log.info("driving %s (pid %d)", search_id, os.getpid())
        study.set_user_attr("driver_pid", os.getpid())
        while True:
            try:
                if step(store, study, search_id, time.time()):
                    log.info("%s: %s", search_id, study.user_attrs.get("ended"))
                    return
            except searchmod.SearchError:
                raise
            except Exception as exc:  # a busy or unreachable store, a cluster hiccup: retry
                log.warning("search step failed, retrying: %s", exc)
            time.sleep(POLL_S)  # a polling interval, not a wait for something


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.runs.search_driver",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search_id")
    parser.add_argument("--data-dir", default=None, help="run store folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s search-driver %(process)d %(levelname)s %(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drive(RunStore(args.data_dir), args.search_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
