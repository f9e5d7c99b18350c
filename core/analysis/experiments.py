"""Experiments: run several recipes (presets or saved configs) over several seeds, then
compare them with honest statistics and a plain-language verdict.

An experiment is a row of the run store (core.runs.store; before store migration 10 it was a
JSON file under the artifact root, imported when the store first opens) listing its recipes,
each with the run *group* its seed runs were queued under. The runs
themselves live in the ordinary run store; results are computed from them on demand, so a
record never goes stale while runs finish.

Statistics: per recipe the mean and sample standard deviation (n - 1) of best validation
and test accuracy, in percentage points; between two recipes Welch's difference of means
with a 95 % confidence interval from Student's t with Welch-Satterthwaite degrees of
freedom, from scipy.stats (imported inside the functions, so pages that import this module
at start-up stay fast). No torch import either.
"""

from __future__ import annotations

import math
import re
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from core import config as cfgmod
from core.runs.entities import Experiment, Recipe
from core.runs.store import ExperimentNotFound, Run, RunStore

if TYPE_CHECKING:
    from core.runs.jobs import RunResources

CONFIDENCE = 0.95
MAX_SEEDS = 20  # one experiment queues recipes x seeds runs; more is almost surely a typo
METRICS = {"val": "best validation accuracy", "test": "test accuracy"}
# A recipe whose mean accuracy is within this many points of chance (100 / classes) has
# barely learned: comparing it says more about the budget than about the recipe.
NEAR_CHANCE_PTS = 5.0
# A confidence interval wider than this (half width, points) cannot tell recipes apart
# that differ by the few points recipe choices usually make.
WIDE_INTERVAL_PTS = 5.0
# Fewer seeds than this make a spread (sample std) itself too uncertain to rank stability.
STABLE_SPREAD_SEEDS = 10
# Defaults of the Experiments form: a budget that can answer the question (the old
# 2,000 images x 1 epoch per stage turned a 6.5-point gap into "35.3 ± 16.6 points").
DEFAULT_EPOCHS_PER_STAGE = 3
DEFAULT_IMAGE_CAP = 10_000
DEFAULT_SEEDS = 3


class ExperimentError(ValueError):
    """An experiment cannot be created or read; the message says why."""


# ---------------------------------------------------------------- statistics


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return statistics.fmean(xs)


def sample_std(xs: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (divides by n - 1). NaN for n < 2:
    one seed says nothing about spread."""
    return statistics.stdev(xs) if len(xs) >= 2 else math.nan


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with a Welch confidence interval. Units are those of the inputs."""

    diff: float
    low: float  # NaN when either side has fewer than 2 values
    high: float
    df: float  # Welch-Satterthwaite degrees of freedom (inf when both spreads are 0)
    n_a: int
    n_b: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


def welch_difference(a: Sequence[float], b: Sequence[float],
                     confidence: float = CONFIDENCE) -> Difference:
    """Difference of means of two independent samples, with Welch's t interval (does not
    assume equal variances: recipes can differ exactly in how stable they are)."""
    if not a or not b:
        raise ValueError("both samples need at least one value")
    d = mean(a) - mean(b)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return Difference(d, math.nan, math.nan, math.nan, na, nb, confidence)
    if sample_std(a) == 0.0 and sample_std(b) == 0.0:
        # identical values within each recipe: no sampling noise to bound (scipy gives NaN)
        return Difference(d, d, d, math.inf, na, nb, confidence)
    from scipy import stats

    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(confidence)
    return Difference(d, float(interval.low), float(interval.high), float(test.df), na, nb,
                      confidence)


# ---------------------------------------------------------------- verdict


def _pts(x: float) -> str:
    return f"{x:.1f}"


def verdict(name_a: str, name_b: str, difference: Difference, what: str = "validation accuracy",
            std_a: float = math.nan, std_b: float = math.nan, seeds_planned: int = 1,
            still_running: bool = False) -> str:
    """One plain-language sentence (or two) about `mean(a) - mean(b)` in percentage points,
    e.g. "Two-stage beat All at once by 1.8 ± 0.9 points of validation accuracy over 5
    seeds (95 % confidence interval 0.9 to 2.7)." `seeds_planned`: seeds per recipe the
    experiment asked for; with 2 or more planned, a single finished seed means "wait" (or
    "re-run the missing ones" when nothing is `still_running`), not "run 2 seeds"."""
    d = difference
    seeds = (f"over {d.n_a} seeds" if d.n_a == d.n_b
             else f"over {d.n_a} and {d.n_b} seeds")
    if not d.has_interval:
        lead, other = (name_a, name_b) if d.diff >= 0 else (name_b, name_a)
        lead_text = (f"{lead} scored {_pts(abs(d.diff))} points higher {what} than {other}, but "
                     f"with a single finished seed in a recipe there is no way to tell this from "
                     f"seed-to-seed luck; ")
        if seeds_planned < 2:
            return lead_text + "run at least 2 seeds (5 is better)."
        if still_running:
            return lead_text + (f"the interval appears once a second of the {seeds_planned} "
                                f"seeds per recipe has finished.")
        return lead_text + ("some of its runs did not finish: re-run the missing ones to get "
                            "an interval.")
    level = f"{round(d.confidence * 100)} %"
    if d.excludes_zero:
        # Say it from the winner's side: the interval of (winner - loser) is positive.
        if d.diff > 0:
            winner, loser, low, high = name_a, name_b, d.low, d.high
        else:
            winner, loser, low, high = name_b, name_a, -d.high, -d.low
        text = (f"{winner} beat {loser} by {_pts(abs(d.diff))} ± {_pts(d.half_width)} points "
                f"of {what} {seeds} ({level} confidence interval {_pts(low)} to {_pts(high)}).")
    else:
        text = (f"No clear winner on {what}: {name_a} minus {name_b} is {_pts(d.diff)} ± "
                f"{_pts(d.half_width)} points {seeds} ({level} confidence interval {_pts(d.low)} to "
                f"{_pts(d.high)}, which includes 0), so the "
                f"difference could be seed-to-seed luck. More seeds narrow the interval.")
    if not (math.isnan(std_a) or math.isnan(std_b)):
        if max(std_a, std_b) > 0 and min(std_a, std_b) <= 0.5 * max(std_a, std_b):
            steadier, shakier = (name_a, name_b) if std_a < std_b else (name_b, name_a)
            text += (f" {steadier} was also more stable across seeds (spread "
                     f"{_pts(min(std_a, std_b))} vs {_pts(max(std_a, std_b))} points).")
        else:
            text += (f" Both were about equally stable across seeds (spread {_pts(std_a)} vs "
                     f"{_pts(std_b)} points).")
        text += spread_caveat(min(d.n_a, d.n_b))
    return text


def spread_caveat(n: int) -> str:
    """A sentence on how little a spread from `n` seeds says ("" from STABLE_SPREAD_SEEDS
    on): the 95 % interval of the true standard deviation, as multiples of the measured one
    (chi-square with n - 1 degrees of freedom)."""
    if n >= STABLE_SPREAD_SEEDS or n < 2:
        return ""
    from scipy import stats

    low = math.sqrt((n - 1) / stats.chi2.ppf(0.975, n - 1))
    high = math.sqrt((n - 1) / stats.chi2.ppf(0.025, n - 1))
    return (f" But a spread from {n} seeds is itself uncertain (the true one could be "
            f"{low:.1f}x to {high:.1f}x the measured value), so read the stability "
            f"comparison as a hint, not a finding.")


def budget_caveats(results: Sequence[RecipeResult], metric: str,
                   difference: Difference) -> str:
    """Warnings to add to a verdict when the budget could not answer the question: a
    recipe near chance level, or an interval too wide to tell recipes apart."""
    notes = []
    for r in results:
        m, _ = r.stat(metric)
        chance = r.chance_pts
        if chance is not None and not math.isnan(m) and m - chance < NEAR_CHANCE_PTS:
            notes.append(f"{r.recipe.name} is near chance level ({_pts(m)} % against "
                         f"{_pts(chance)} % for guessing among {round(100 / chance)} classes): "
                         f"it barely learned, so this compares budgets more than recipes.")
    if difference.has_interval and difference.half_width > WIDE_INTERVAL_PTS:
        notes.append(f"The interval is ± {_pts(difference.half_width)} points wide: too wide to "
                     f"tell apart recipes that differ by a few points.")
    if notes:
        notes.append("Give the runs more images or epochs (or more seeds) to get an answer.")
    return "".join(" Warning: " + n if i == 0 else " " + n for i, n in enumerate(notes))


def estimated_seconds(recipes: Sequence[tuple[str, cfgmod.RunConfig]], n_seeds: int,
                      scan: Any, epoch_seconds: Any) -> float | None:
    """Estimated wall time of an experiment's runs, one after another (planning.plan_run's
    per-stage estimates; `scan` and `epoch_seconds` as it takes them). None when a stage
    cannot be estimated (no data folder yet)."""
    from core.analysis.planning import plan_run

    total = 0.0
    for _, cfg in recipes:
        for stage in plan_run(cfg, scan, [], 1, epoch_seconds).stages:
            if stage.stage_seconds is None:
                return None
            total += stage.stage_seconds
    return total * n_seeds


# ---------------------------------------------------------------- records


# Experiments are rows of the run store (RunStore.create_experiment, get_, list_, update_,
# delete_experiment); Experiment and Recipe are its entities (core.runs.entities).


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:40] or "recipe"


def validate_experiment(recipes: Sequence[tuple[str, cfgmod.RunConfig]], seeds: Sequence[int]) -> list[str]:
    """Every problem with an experiment, before anything is queued (all or nothing)."""
    errors: list[str] = []
    if len(recipes) < 2:
        errors.append("recipes: pick at least two recipes to compare")
    names = [n for n, _ in recipes]
    if len(set(names)) != len(names):
        errors.append("recipes: two recipes have the same name; rename one")
    if not seeds:
        errors.append("seeds: give at least one seed")
    elif len(set(seeds)) != len(seeds):
        errors.append("seeds: a seed is listed twice")
    elif len(seeds) > MAX_SEEDS:
        errors.append(f"seeds: at most {MAX_SEEDS} seeds per experiment")
    elif any(not isinstance(s, int) or s < 0 for s in seeds):
        errors.append("seeds: seeds are whole numbers, 0 or more")
    for name, cfg in recipes:
        errors += [f"{name}: {e}" for e in cfgmod.validate(cfg)]
    return errors


def submit_experiment(store: RunStore, recipes: Sequence[tuple[str, cfgmod.RunConfig]],
                      seeds: Sequence[int], name: str = "",
                      resources: RunResources | None = None,
                      started_by: str | None = None) -> Experiment:
    """Queue every (recipe, seed) run, grouped per recipe, and record the experiment, its
    runs started by `started_by` (see RunStore.create_run).
    `resources` (CPU threads and device per run, core.runs.jobs.RunResources) replace the
    recipes' own when given: on Ray, what each run reserves.
    The record is written before any run is queued, so a crash part-way leaves a record
    whose missing runs show as missing rather than runs that belong to nothing."""
    from core.runs import jobs  # spawns processes; imported here so reading results stays light

    if resources is not None:
        recipes = [(n, resources.apply(c)) for n, c in recipes]
    errors = validate_experiment(recipes, seeds) + cfgmod.text_limit_errors(name=name)
    if not errors:
        # Data and weights too, for every recipe, before anything is queued: a bad
        # second recipe must not leave the first one's runs behind.
        from core.runs.preflight import preflight

        for recipe_name, cfg in recipes:
            try:
                preflight(cfg, store)
            except cfgmod.ConfigError as exc:
                errors += [f"{recipe_name}: {e}" for e in exc.errors]
    if errors:
        raise cfgmod.ConfigError(errors)
    now = time.time()
    exp_id = f"exp-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{uuid.uuid4().hex[:4]}"
    exp = Experiment(
        id=exp_id, name=name.strip() or " vs ".join(n for n, _ in recipes), created_at=now,
        seeds=tuple(seeds),
        recipes=tuple(Recipe(n, f"{exp_id}-{_slug(n)}-{i}", c)
                      for i, (n, c) in enumerate(recipes, 1)))
    store.create_experiment(exp)
    for (recipe_name, cfg), recipe in zip(recipes, exp.recipes):
        jobs.submit_seeds(store, cfg, list(seeds), name=f"{exp.name}: {recipe_name}",
                          group=recipe.group, started_by=started_by)
    return exp


def load_experiment(store: RunStore, exp_id: str) -> Experiment:
    """The experiment `exp_id`, or ExperimentError saying why not."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", exp_id):
        raise ExperimentError(f"not an experiment id: {exp_id!r}")
    try:
        return store.get_experiment(exp_id)
    except ExperimentNotFound:
        raise ExperimentError(f"experiment {exp_id} does not exist") from None
    except ValueError as exc:
        raise ExperimentError(f"experiment {exp_id} cannot be read ({exc})") from None


def list_experiments(store: RunStore) -> list[Experiment]:
    """Experiments, newest first; unreadable records are skipped."""
    return store.list_experiments()


def annotate_experiment(store: RunStore, exp_id: str, note: str,
                        tags: Sequence[str]) -> Experiment:
    """Replace the experiment's note and tags (tags trimmed, repeats dropped, as on runs).
    Returns the experiment as stored."""
    if errors := cfgmod.text_limit_errors(note=note, tags=tags):
        raise ExperimentError("; ".join(errors))
    load_experiment(store, exp_id)  # a clear error for a bad or unknown id
    return store.update_experiment(exp_id, note=note, tags=tags)


def experiment_tags(experiments: Sequence[Experiment]) -> list[str]:
    """Every tag in use on these experiments, sorted (the page's filter choices)."""
    return sorted({t for e in experiments for t in e.tags})


def delete_experiment(store: RunStore, exp_id: str) -> None:
    """Forget the record (runs stay in the store)."""
    store.delete_experiment(load_experiment(store, exp_id).id)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RecipeResult:
    recipe: Recipe
    runs: tuple[Run, ...]
    # Accuracies of finished runs in percentage points (0..100), one per seed.
    val: tuple[float, ...]
    test: tuple[float, ...]
    counts: dict[str, int] = field(default_factory=dict)  # status -> number of runs

    @property
    def n_done(self) -> int:
        return len(self.val)

    @property
    def chance_pts(self) -> float | None:
        """Accuracy of guessing (100 / classes, points), from the classes a finished run
        trained on, else the recipe's class list; None when unknown."""
        classes = next((len(r.results.classes) for r in self.runs if r.results.classes),
                       len(self.recipe.config.classes))
        return 100.0 / classes if classes else None

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, sample std) of "val" or "test" in points; NaN where undefined."""
        xs = self.val if metric == "val" else self.test
        return (mean(xs) if xs else math.nan, sample_std(xs))


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    metric: str  # "val" or "test"
    difference: Difference
    text: str


@dataclass(frozen=True)
class ExperimentResults:
    experiment: Experiment
    recipes: tuple[RecipeResult, ...]
    comparisons: tuple[Comparison, ...]

    @property
    def active(self) -> int:
        return sum(r.counts.get("queued", 0) + r.counts.get("running", 0) for r in self.recipes)

    @property
    def total(self) -> int:
        return sum(len(r.runs) for r in self.recipes)

    @property
    def finished(self) -> int:
        return sum(r.counts.get("finished", 0) for r in self.recipes)


def latest_per_seed(runs: Sequence[Run]) -> tuple[Run, ...]:
    """One run per seed, the newest (a re-run replaces a cancelled or failed one), by seed."""
    newest: dict[int, Run] = {}
    for r in runs:
        if r.config.seed not in newest or r.created_at > newest[r.config.seed].created_at:
            newest[r.config.seed] = r
    return tuple(newest[s] for s in sorted(newest))


def missing_runs(res: ExperimentResults) -> list[tuple[Recipe, int]]:
    """(recipe, seed) pairs without a finished or active run: cancelled, failed, or never
    queued (a crash part-way through submitting)."""
    out = []
    for rr in res.recipes:
        by_seed = {r.config.seed: r for r in rr.runs}
        for seed in res.experiment.seeds:
            run = by_seed.get(seed)
            if run is None or not (run.is_active or run.status == "finished"):
                out.append((rr.recipe, seed))
    return out


def rerun_missing(store: RunStore, res: ExperimentResults) -> list[Run]:
    """Queue the missing (recipe, seed) runs again, in their recipe's group, so the
    experiment can reach its verdict. Returns the new runs."""
    from core.runs import jobs

    exp = res.experiment
    runs = [jobs.submit(store, replace(recipe.config, seed=seed),
                        name=f"{exp.name}: {recipe.name} seed {seed}", group=recipe.group,
                        start=False)
            for recipe, seed in missing_runs(res)]
    jobs.dispatch(store)
    return runs


def experiment_results(store: RunStore, exp: Experiment) -> ExperimentResults:
    """Statistics over the finished runs of each recipe, and every pairwise comparison
    (recipes in the order they were chosen)."""
    recipe_results = []
    for recipe in exp.recipes:
        runs = latest_per_seed(store.list_runs(group=recipe.group))
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        done = [r for r in runs if r.status == "finished" and r.best_val_acc is not None]
        val = tuple(100.0 * r.best_val_acc for r in done)  # type: ignore[operator]
        test = tuple(100.0 * r.test_acc for r in done if r.test_acc is not None)
        recipe_results.append(RecipeResult(recipe, runs, val, test, counts))
    comparisons = []
    for i, ra in enumerate(recipe_results):
        for rb in recipe_results[i + 1:]:
            for metric in ("val", "test"):
                xa = ra.val if metric == "val" else ra.test
                xb = rb.val if metric == "val" else rb.test
                if not xa or not xb:
                    continue
                d = welch_difference(xa, xb)
                busy = any(r.is_active for r in (*ra.runs, *rb.runs))
                text = verdict(ra.recipe.name, rb.recipe.name, d, METRICS[metric],
                               sample_std(xa), sample_std(xb), len(exp.seeds), busy)
                text += budget_caveats((ra, rb), metric, d)
                comparisons.append(Comparison(ra.recipe.name, rb.recipe.name, metric, d, text))
    return ExperimentResults(exp, tuple(recipe_results), tuple(comparisons))


def preset_recipes(names: Sequence[str], epochs: int, lr: float,
                   base: cfgmod.RunConfig) -> list[tuple[str, cfgmod.RunConfig]]:
    """Presets as recipes sharing every run-level field of `base` (data, resolution,
    batch size, weights, device): only the stage plan differs, so a comparison is fair."""
    return [(n, replace(base, stages=cfgmod.preset_stages(n, epochs=epochs, lr=lr))) for n in names]


def saved_run_recipes(runs: Sequence[Run], taken: Sequence[str] = ()
                      ) -> tuple[list[tuple[str, cfgmod.RunConfig]], list[str]]:
    """Earlier runs' configs as recipes named "config of <run>" (with the run id when the
    name is taken), and a problem per run whose config can no longer be used."""
    recipes: list[tuple[str, cfgmod.RunConfig]] = []
    problems: list[str] = []
    for run in runs:
        i = run.id
        try:
            label = f"config of {run.name}"
            if any(n == label for n in [*taken, *(n for n, _ in recipes)]):  # two runs with one name
                label += f" ({i})"
            if run.config_error:  # run.config is a placeholder then, not what it ran with
                raise cfgmod.ConfigError([run.config_error])
            recipes.append((label, cfgmod.check(run.config)))
        except cfgmod.ConfigError as exc:
            problems.append(f"run {i}: its config can no longer be used ({exc})")
    return recipes, problems
