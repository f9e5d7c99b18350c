"""Staged-recipe search: which layer groups each stage trains, per-stage learning rates and
epochs, schedule, BatchNorm policy and group LR multiplier, searched with Optuna and
confirmed with an experiment.

The study lives in Optuna's RDB storage on the run store's own database (the SQLAlchemy URL
the store uses: SQLite by default, PostgreSQL on a cluster), so a search needs no second
server and survives whatever the store survives. A search is one Optuna study named by its
id; what the user asked for (the base config, the space, the budget) is the study's user
attribute "search"; each trial records its recipe and its run's id as trial user attributes.
Trials are ordinary runs of kind "trial" (core.runs.search_driver submits them and feeds
their validation accuracy back to Optuna); this module reads and describes, it starts
nothing except `create_search`, `request_stop` and `confirm`, which say so.

The space is derived from the stage fields' FieldSpecs (core.config): their labels, bounds
and choices; the search only adds which sub-range it tries by default.

No torch or streamlit import here.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core import config as cfgmod
from core.runs.store import RunStore

log = logging.getLogger("finetune_lab.search")

SEARCH_PREFIX = "search-"
# A search tries 1..3 stages: 4 stages of the form are allowed, but every extra stage adds
# three dimensions, which a budget of tens of trials cannot cover.
MAX_SEARCH_STAGES = min(3, cfgmod.MAX_STAGES)
# Successive halving's parameters (asynchronous: trials need not wait for each other, which
# suits trials that run one or two at a time as the queue allows). Rungs at 1, 3, 9 epochs:
# a trial goes on past a rung only when it is in the best third of the trials that reached it.
PRUNER_MIN_EPOCHS = 1
PRUNER_REDUCTION = 3
# Trials sampled at random before TPE models the space (at least this many, at most a third
# of the budget): TPE needs a few points before its model says anything.
MIN_STARTUP_TRIALS = 3

STATES = ("running", "finished", "stopped")


class SearchError(ValueError):
    """A search that does not exist, or a request it cannot take."""


# ---------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """One searched quantity of a stage: a StageConfig field (its FieldSpec gives label,
    bounds and choices) or the number of stages. `kind`: "int", "log" (a float searched on
    a log scale), "float", "choice"."""

    name: str
    kind: str
    per_stage: bool
    default: tuple[Any, ...]  # (low, high) of the default range, or the default choices

    @property
    def spec(self) -> cfgmod.FieldSpec:
        if self.name == "stages":
            return cfgmod.FieldSpec(label="Stages", low=1, high=MAX_SEARCH_STAGES, step=1,
                                    help="how many stages a recipe has")
        if self.name == "groups":
            return cfgmod.FieldSpec(
                label="Layer groups trained (counted from the head)", low=1,
                high=len(cfgmod.LAYER_GROUPS), step=1,
                help="1 = fc only, 2 = layer4 and fc, ... 6 = every group. A later stage "
                     "never trains fewer groups than the one before.")
        return cfgmod.field_spec(cfgmod.StageConfig, self.name)

    @property
    def bounds(self) -> tuple[Any, ...]:
        """The widest range or every choice the form allows, from the FieldSpec."""
        spec = self.spec
        if self.kind == "choice":
            return spec.choices
        if self.kind == "log":
            return (min(spec.suggested), max(spec.suggested))
        return (spec.low, spec.high)

    def describe(self, value: Any) -> str:
        if self.name == "groups":
            return group_range(int(value))
        if self.kind == "choice":
            return self.spec.choice_label(value)
        return f"{value:g}" if isinstance(value, float) else str(value)


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("stages", "int", False, (1, MAX_SEARCH_STAGES)),
    Dimension("groups", "int", True, (1, len(cfgmod.LAYER_GROUPS))),
    Dimension("lr", "log", True, (1e-4, 0.1)),
    Dimension("epochs", "int", True, (1, 3)),
    Dimension("schedule", "choice", False, cfgmod.SCHEDULES),
    Dimension("bn_policy", "choice", False, cfgmod.BN_POLICIES),
    Dimension("group_lr_mult", "float", False, (0.5, 1.0)),
)


def dimension(name: str) -> Dimension:
    return next(d for d in DIMENSIONS if d.name == name)


@dataclass(frozen=True)
class SearchSpace:
    """What a search tries: for each Dimension a (low, high) range or a tuple of choices.
    A range of one value or a single choice fixes that dimension."""

    ranges: tuple[tuple[str, tuple[Any, ...]], ...] = tuple((d.name, d.default)
                                                            for d in DIMENSIONS)

    def of(self, name: str) -> tuple[Any, ...]:
        return dict(self.ranges)[name]

    def with_range(self, name: str, values: Sequence[Any]) -> SearchSpace:
        return SearchSpace(tuple((n, tuple(values) if n == name else r) for n, r in self.ranges))

    def to_dict(self) -> dict[str, list[Any]]:
        return {n: list(r) for n, r in self.ranges}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        default = cls()
        return cls(tuple((n, tuple(d.get(n, r))) for n, r in default.ranges))


def validate_space(space: SearchSpace) -> list[str]:
    """Every problem with the space, each naming its dimension."""
    errors = []
    for dim in DIMENSIONS:
        values = space.of(dim.name)
        label = dim.spec.label
        if dim.kind == "choice":
            if not values:
                errors.append(f"{label}: pick at least one")
            errors += [f"{label}: unknown choice {v!r}" for v in values if v not in dim.bounds]
            continue
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in values):
            errors.append(f"{label}: give a range (low, high)")
            continue
        low, high = values
        lo_bound, hi_bound = dim.bounds
        if dim.kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            errors.append(f"{label}: whole numbers only")
        if not lo_bound <= low <= high <= hi_bound:
            errors.append(f"{label}: the range must lie within {lo_bound:g}..{hi_bound:g} "
                          f"with low <= high, not {low:g}..{high:g}")
    return errors


def group_range(depth: int) -> str:
    """The layer groups a stage training the last `depth` groups trains, in words."""
    groups = cfgmod.LAYER_GROUPS[-depth:]
    return groups[0] if len(groups) == 1 else f"{groups[0]}..{groups[-1]}"


def _param(name: str, stage: int | None = None) -> str:
    return name if stage is None else f"stage {stage}.{name}"


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask an optuna Trial for one recipe's parameters, define-by-run: the stage count, then
    each stage's dimensions (a later stage trains at least the groups of the one before)."""
    def ask(dim: Dimension, name: str, low: Any = None) -> Any:
        values = space.of(dim.name)
        if dim.kind == "choice":
            return trial.suggest_categorical(name, list(values))
        lo, hi = values
        lo = lo if low is None else max(lo, low)
        if dim.kind == "int":
            return trial.suggest_int(name, int(lo), int(hi))
        if dim.kind == "log":
            return trial.suggest_float(name, float(lo), float(hi), log=True)
        step = dim.spec.step
        if step and round((hi - lo) / step, 9).is_integer():
            return trial.suggest_float(name, float(lo), float(hi), step=step)
        return trial.suggest_float(name, float(lo), float(hi))

    stages = ask(dimension("stages"), "stages")
    for name in ("schedule", "bn_policy", "group_lr_mult"):
        ask(dimension(name), name)
    depth = None
    for i in range(1, stages + 1):
        depth = ask(dimension("groups"), _param("groups", i), low=depth)
        ask(dimension("lr"), _param("lr", i))
        ask(dimension("epochs"), _param("epochs", i))
    return dict(trial.params)


def recipe(base: cfgmod.RunConfig, params: dict[str, Any]) -> cfgmod.RunConfig:
    """The run config a trial's parameters describe: `base`'s run-level fields (data,
    weights, resolution, ...) and its first stage's unsearched fields (optimizer, weight
    decay, ...), with the searched stage fields from `params`. Pure: a restarted driver
    rebuilds the same config from the stored parameters."""
    template = replace(base.stages[0], feature_cache=False, plateau_patience=0,
                       warmup_epochs=0.0)
    shared = {n: params[n] for n in ("schedule", "bn_policy", "group_lr_mult")}
    stages = tuple(
        replace(template, groups=cfgmod.LAYER_GROUPS[-int(params[_param("groups", i)]):],
                lr=float(params[_param("lr", i)]), epochs=int(params[_param("epochs", i)]),
                **shared)
        for i in range(1, int(params["stages"]) + 1))
    return replace(base, stages=stages, early_stop_patience=0)


def describe_recipe(cfg: cfgmod.RunConfig) -> str:
    """A recipe in plain words: "train layer3..fc for 3 epochs at 0.02, one-cycle; then ..."."""
    sched = cfgmod.field_spec(cfgmod.StageConfig, "schedule")
    parts = []
    for s in cfg.stages:
        groups = (s.groups[0] if len(s.groups) == 1 else f"{s.groups[0]}..{s.groups[-1]}")
        epochs = f"{s.epochs} epoch{'s' if s.epochs != 1 else ''}"
        parts.append(f"train {groups} for {epochs} at lr {s.lr:.3g}, {sched.choice_label(s.schedule)}")
    first = cfg.stages[0]
    tail = []
    if first.group_lr_mult != 1.0:
        tail.append(f"each group one step further from the head at {first.group_lr_mult:g}x "
                    f"the learning rate")
    tail.append("BatchNorm of frozen groups " + ("kept fixed" if first.bn_policy == "eval"
                                                  else "left to update its statistics"))
    text = "; then ".join(parts)
    return text[0].upper() + text[1:] + " (" + "; ".join(tail) + ")."


# ---------------------------------------------------------------- what was asked for


@dataclass(frozen=True)
class SearchSpec:
    """What the user asked for: the data and weights (a base run config whose stages the
    search replaces), the space and the budget."""

    name: str
    base: cfgmod.RunConfig
    space: SearchSpace = field(default_factory=SearchSpace)
    trials: int = 12  # trials that become runs
    minutes: float | None = None  # no new trial starts after this many minutes
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "base": cfgmod.to_dict(self.base),
                           "space": self.space.to_dict(), "trials": self.trials,
                           "minutes": self.minutes, "created_at": self.created_at})

    @classmethod
    def from_json(cls, text: str) -> SearchSpec:
        d = json.loads(text)
        return cls(name=str(d["name"]), base=cfgmod.from_dict(d["base"], validate_values=False),
                   space=SearchSpace.from_dict(d["space"]), trials=int(d["trials"]),
                   minutes=None if d["minutes"] is None else float(d["minutes"]),
                   created_at=float(d["created_at"]))

    @property
    def deadline(self) -> float | None:
        return None if self.minutes is None else self.created_at + 60.0 * self.minutes


def validate_spec(spec: SearchSpec) -> list[str]:
    errors = validate_space(spec.space)
    if not isinstance(spec.trials, int) or not 1 <= spec.trials <= 1000:
        errors.append("trials: a whole number from 1 to 1000")
    if spec.minutes is not None and not 0 < spec.minutes <= 7 * 24 * 60:
        errors.append("minutes: more than 0 and at most a week (10080)")
    return errors


# ---------------------------------------------------------------- the study


@functools.lru_cache(maxsize=8)
def _storage(url: str) -> Any:
    import optuna

    # Optuna logs each study and trial at INFO on its own stderr handler: the driver's log
    # says what matters, in the lab's words.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # SQLite: wait for a busy database as the store does rather than fail at once.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
        "pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def storage(store: RunStore) -> Any:
    """Optuna's RDB storage in the run store's database (its tables beside the store's)."""
    return _storage(store.url)


def sampler(trials: int) -> Any:
    """TPE (handles conditional, define-by-run spaces), with the constant liar so trials
    that run at the same time are not all sampled at one point."""
    import optuna

    startup = max(MIN_STARTUP_TRIALS, trials // 3)
    return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True)


def pruner() -> Any:
    """Asynchronous successive halving: it compares a trial with the others at the same
    epoch and needs no fixed number of trials or epochs (Hyperband wants a maximum resource,
    and recipes here differ in length); the median pruner keeps anything above the median,
    which saves little when most recipes are fine and a few are hopeless."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=PRUNER_MIN_EPOCHS,
                                                  reduction_factor=PRUNER_REDUCTION)


def load_study(store: RunStore, search_id: str) -> Any:
    import optuna

    try:
        spec = read_spec_of(optuna.load_study(study_name=search_id, storage=storage(store)))
    except KeyError:
        raise SearchError(f"no search {search_id!r} in {store.location}") from None
    return optuna.load_study(study_name=search_id, storage=storage(store),
                             sampler=sampler(spec.trials), pruner=pruner())


def read_spec_of(study: Any) -> SearchSpec:
    text = study.user_attrs.get("search")
    if text is None:
        raise SearchError(f"{study.study_name} is not a search of this lab")
    return SearchSpec.from_json(text)


def create_search(store: RunStore, spec: SearchSpec, start: bool = True) -> str:
    """Check the spec (values, then data and weights), record the search as a study and,
    when `start`, start its driver process. Returns the search id. Raises ConfigError."""
    import optuna

    from core.runs import jobs
    from core.runs.preflight import preflight

    errors = validate_spec(spec) + cfgmod.validate(spec.base)
    if errors:
        raise cfgmod.ConfigError(errors)
    cfgmod.check_text_limits(name=spec.name)
    report = preflight(spec.base, store)
    jobs.check_executor(store, spec.base, report.memory_bytes)
    now = time.time()
    search_id = (f"{SEARCH_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-"
                 f"{uuid.uuid4().hex[:4]}")
    spec = replace(spec, name=spec.name.strip() or search_id, created_at=now)
    study = optuna.create_study(study_name=search_id, storage=storage(store),
                                direction="maximize")
    study.set_user_attr("search", spec.to_json())
    if start:
        from core.runs import search_driver

        search_driver.ensure_running(store, search_id)
    return search_id


def list_searches(store: RunStore) -> list[str]:
    """Search ids, newest first. A read."""
    import optuna

    names = optuna.get_all_study_names(storage=storage(store))
    return sorted((n for n in names if n.startswith(SEARCH_PREFIX)), reverse=True)


def request_stop(store: RunStore, search_id: str) -> None:
    """Ask the search to stop: no new trial starts, running trials are cancelled. The
    driver does it (it is started if it is not running)."""
    study = load_study(store, search_id)
    study.set_user_attr("stop_requested", True)
    if not study.user_attrs.get("ended"):
        from core.runs import search_driver

        search_driver.ensure_running(store, search_id)


# ---------------------------------------------------------------- what it found


@dataclass(frozen=True)
class TrialRow:
    """One trial as the page and the command line show it."""

    number: int
    state: str  # "running" | "finished" | "pruned" | "failed" | "stopped"
    run_id: str | None
    params: dict[str, Any]
    config: cfgmod.RunConfig | None
    val_acc: float | None  # the trial's value (finished), else its best reported epoch
    epochs_run: int  # validated epochs reported to Optuna
    pruned_at: int | None  # the epoch (1-based, across stages) it was pruned at
    outcome: str  # in words
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True)
class SearchSummary:
    id: str
    spec: SearchSpec
    state: str  # one of STATES
    trials: tuple[TrialRow, ...]
    stop_requested: bool

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)

    @property
    def best(self) -> TrialRow | None:
        done = [t for t in self.trials if t.state == "finished" and t.val_acc is not None]
        return max(done, key=lambda t: (t.val_acc, -t.number)) if done else None

    def best_so_far(self) -> list[tuple[float, float]]:
        """(seconds since the search started, best finished val acc) at each improvement."""
        points: list[tuple[float, float]] = []
        for t in sorted((t for t in self.trials if t.state == "finished" and t.ended_at
                         and t.val_acc is not None), key=lambda t: t.ended_at or 0.0):
            if not points or t.val_acc > points[-1][1]:
                points.append(((t.ended_at or 0.0) - self.spec.created_at, float(t.val_acc)))
        return points

    @property
    def trial_epochs_run(self) -> int:
        return sum(t.epochs_run for t in self.trials)

    @property
    def trial_epochs_planned(self) -> int:
        """Epochs the trials would have run without pruning."""
        return sum(t.config.total_epochs if t.config is not None else t.epochs_run
                   for t in self.trials)

    def to_status(self) -> dict[str, Any]:
        """What `python -m core search --status ID --json` prints."""
        best = self.best
        return {"id": self.id, "name": self.spec.name, "state": self.state,
                "trials": len(self.trials), "finished": self.count("finished"),
                "pruned": self.count("pruned"), "failed": self.count("failed"),
                "stopped": self.count("stopped"), "running": self.count("running"),
                "budget_trials": self.spec.trials,
                "trial_epochs_run": self.trial_epochs_run,
                "trial_epochs_without_pruning": self.trial_epochs_planned,
                "best": None if best is None else {
                    "trial": best.number, "run_id": best.run_id, "val_acc": best.val_acc,
                    "recipe": describe_recipe(best.config) if best.config else "",
                    "config": cfgmod.to_dict(best.config) if best.config else None}}


def _trial_row(t: Any) -> TrialRow | None:
    """A FrozenTrial as a TrialRow; None for a trial that never became a recipe (its driver
    died while sampling it)."""
    from optuna.trial import TrialState

    attrs = t.user_attrs
    if "config" not in attrs:
        return None
    config = cfgmod.from_dict(attrs["config"], validate_values=False)
    pruned_at = attrs.get("pruned_at")
    reported = t.intermediate_values
    if t.state == TrialState.COMPLETE:
        state = "finished"
    elif t.state == TrialState.PRUNED:
        state = "pruned"
    elif t.state == TrialState.FAIL:
        state = "stopped" if attrs.get("stopped") else "failed"
    else:
        state = "running"
    value = t.value if state == "finished" else (max(reported.values()) if reported else None)
    outcome = attrs.get("outcome") or (f"pruned at epoch {pruned_at}" if pruned_at
                                       else state)
    return TrialRow(number=t.number, state=state, run_id=attrs.get("run_id"),
                    params=dict(t.params), config=config, val_acc=value,
                    epochs_run=len(reported), pruned_at=pruned_at, outcome=outcome,
                    started_at=t.datetime_start.timestamp() if t.datetime_start else None,
                    ended_at=t.datetime_complete.timestamp() if t.datetime_complete else None)


def summary(store: RunStore, search_id: str) -> SearchSummary:
    """The search as the storage has it. A read: starts nothing."""
    study = load_study(store, search_id)
    spec = read_spec_of(study)
    attrs = study.user_attrs
    rows = tuple(r for r in map(_trial_row, study.get_trials(deepcopy=False)) if r is not None)
    state = attrs.get("ended") or "running"
    return SearchSummary(id=search_id, spec=spec, state=state, trials=rows,
                         stop_requested=bool(attrs.get("stop_requested")))


def importances(store: RunStore, search_id: str) -> dict[str, float]:
    """How much each dimension mattered to validation accuracy (Optuna's PED-ANOVA
    evaluator, which needs no extra library), over the finished trials; {} until there
    are enough of them."""
    import optuna

    study = load_study(store, search_id)
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return {}
    # The dimensions every finished trial has (a later stage's exist only in longer
    # recipes): an importance over the few trials that have one says nothing.
    shared = set.intersection(*(set(t.params) for t in complete))
    if not shared:
        return {}
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            params=sorted(shared))
    except (RuntimeError, ValueError) as exc:  # e.g. every finished trial had one value
        log.info("no importances for %s: %s", search_id, exc)
        return {}


# ---------------------------------------------------------------- confirm

CONFIRM_SEEDS = (101, 102, 103)


def confirm(store: RunStore, search_id: str, baseline: str = "Two-stage",
            seeds: Sequence[int] = CONFIRM_SEEDS) -> Any:
    """Start an experiment (core.analysis.experiments): the search's best recipe against a
    preset over fresh seeds, judged on the test split. The best trial was picked on
    validation accuracy among many, so its own figure is optimistic. Returns the
    Experiment. Raises SearchError when no trial has finished yet, ConfigError for a bad
    baseline or seeds."""
    from core.analysis import experiments

    found = summary(store, search_id)
    best = found.best
    if best is None or best.config is None:
        raise SearchError("no trial has finished yet: there is nothing to confirm")
    base = found.spec.base
    baseline_recipes = experiments.preset_recipes([baseline], cfgmod.PRESET_EPOCHS,
                                                  cfgmod.PRESET_LR, base)
    recipes = [(f"search best (trial {best.number})", best.config), *baseline_recipes]
    return experiments.submit_experiment(store, recipes, list(seeds),
                                         name=f"{found.spec.name}: confirm")


def space_table(space: SearchSpace) -> list[dict[str, str]]:
    """The space in words, one row per dimension (for the page and the README)."""
    rows = []
    for dim in DIMENSIONS:
        values = space.of(dim.name)
        text = (", ".join(dim.describe(v) for v in values) if dim.kind == "choice"
                else dim.describe(values[0]) if values[0] == values[1]
                else f"{dim.describe(values[0])} .. {dim.describe(values[1])}")
        rows.append({"dimension": dim.spec.label, "per stage": "yes" if dim.per_stage else "",
                     "searched": text})
    return rows

