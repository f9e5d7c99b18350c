"""Issue 10's "done when" in a real browser: the app served with the Ray executor and a
PostgreSQL store (FINETUNE_LAB_EXECUTOR=ray, RAY_ADDRESS, FINETUNE_LAB_DB). On the Experiments
page a user picks Two-stage and All at once, 3 seeds, on a tiny image folder, watches the
runs progress and gets the verdict; every run ran as a Ray job and its metrics are in
PostgreSQL. Then one run started from New run is cancelled from the Runs page.

Needs a Ray head (FINETUNE_LAB_TEST_RAY, its job-submission URL) and a PostgreSQL server
(FINETUNE_LAB_TEST_PG); scripts/with_services.sh starts both on loopback:

  flock /tmp/services.lock bash scripts/with_services.sh \\
      .venv/bin/python -m pytest -q -m browser tests/test_e2e_cluster.py

Skipped without them; in CI (CI set) a missing one fails instead.
"""

from __future__ import annotations

import os
import re

import pytest

from core.runs import jobs, supervisor
from core.runs.store import RunStore
from tests.browser_support import (
    browser_page,
    require_browser,
    serve_app,
    shot,
    stop_active_runs,
    use_image_folder,
    wait_idle,
)
from tests.conftest import make_image_folder, postgres_database, wait_for
from tests.ray_support import write_pgpass

RAY_ENV, PG_ENV = "FINETUNE_LAB_TEST_RAY", "FINETUNE_LAB_TEST_PG"
RUN_TIMEOUT_S = 240  # the whole experiment (6 tiny Ray jobs, one at a time on a 1-CPU head)
RECIPES, SEEDS = ("Two-stage", "All at once"), 3
# The experiment's progress bar text, e.g. "2 of 6 runs finished, 4 queued or running".
PROGRESS_JS = """() => [...document.querySelectorAll('[data-testid="stProgress"]')]
    .map(e => e.innerText).join(' | ')"""
VERDICT = re.compile(r"(beat .* points of (best )?validation|^No clear winner on (best )?validation)")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]


def _cluster_urls() -> tuple[str, str]:
    """(Ray job-submission URL, PostgreSQL server URL), or skip (fail in CI) without them."""
    missing = [name for name in (RAY_ENV, PG_ENV) if not os.environ.get(name)]
    if missing:
        message = (f"{' and '.join(missing)} not set: run under scripts/with_services.sh, which "
                   f"starts a Ray head and PostgreSQL on loopback")
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the cluster browser test: {message}", pytrace=False)
        pytest.skip(message)
    return os.environ[RAY_ENV], os.environ[PG_ENV]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, store, image folder, Ray URL): the app on a free localhost port, running
    its runs as Ray jobs with the store in a fresh PostgreSQL database."""
    ray_url, _ = _cluster_urls()
    require_browser()
    base = tmp_path_factory.mktemp("e2e-cluster")
    folder = make_image_folder(base / "datasets" / "colors", per_class=12)
    with postgres_database() as db_url, pytest.MonkeyPatch.context() as mp:
        # The jobs get the store's password from a pgpass file, never from their environment.
        cluster = {jobs.EXECUTOR_ENV: "ray", "RAY_ADDRESS": ray_url, "FINETUNE_LAB_DB": db_url,
                   "PGPASSFILE": str(write_pgpass(db_url, base))}
        for name, value in cluster.items():  # this process stops leftover runs through them
            mp.setenv(name, value)
        store = RunStore(base / "runs", url=db_url)
        env = {**os.environ, **cluster, "FINETUNE_LAB_DATA": str(store.root),
               "FINETUNE_LAB_DATA_ROOTS": str(base / "datasets"),
               "TORCH_HOME": str(base / "torch-home")}  # no ImageNet weights: never downloads
        with serve_app(env, "streamlit-server-cluster.log") as url:
            try:
                yield url, store, folder, ray_url
            finally:
                stop_active_runs(store)
                wait_for(lambda: not supervisor.is_running(store), 60, "the supervisor to exit")


@pytest.fixture(scope="module")
def page(served):
    with browser_page() as pg:
        yield pg


def _pick(page, box, option: str) -> None:
    """Open a select box or multiselect and click one option, as a user does."""
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")
    wait_idle(page)


def _fill(page, name: str, value: str) -> None:
    box = page.get_by_label(name, exact=True)
    box.fill(value)
    box.press("Enter")
    wait_idle(page)


def test_experiment_on_ray_and_postgres_then_cancel_a_run(served, page):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect
    from ray.job_submission import JobSubmissionClient

    url, store, folder, ray_url = served
    ray = JobSubmissionClient(ray_url)

    # Experiments: pick the two recipes (the defaults are cleared first), 3 seeds, the tiny
    # folder, random weights, 1 epoch per stage.
    page.goto(url + "/experiments")
    page.get_by_role("heading", name="Experiments").wait_for()
    presets = page.locator(".stMultiSelect").nth(0)
    presets.locator("input").focus()
    for _ in RECIPES:  # Backspace removes the last chosen preset
        page.keyboard.press("Backspace")
    wait_idle(page)
    expect(page.get_by_text(re.compile(r"^This queues 0 runs"))).to_be_visible()
    for recipe in RECIPES:
        _pick(page, presets, recipe)
    _fill(page, "Seeds per recipe", str(SEEDS))
    _pick(page, page.get_by_role("combobox", name="Data set"), f"colors  ({folder})")
    _fill(page, "Epochs per stage", "1")
    _pick(page, page.get_by_role("combobox", name="Starting weights"), "Random (from scratch)")
    _fill(page, "Experiment name (optional)", "cluster check")
    n_runs = len(RECIPES) * SEEDS
    # .first: while the page reruns, the caption of the run before may still stand beside it.
    page.get_by_text(f"This queues {n_runs} runs (2 recipes × {SEEDS} seeds)").first.wait_for()
    start = page.get_by_role("button", name="Run the experiment")
    expect(start).to_be_enabled()
    start.click()

    # Results open by themselves and refresh while runs are active: the progress moves.
    page.get_by_text(re.compile(rf"^\d of {n_runs} runs finished")).wait_for()
    assert "queued or running" in page.evaluate(PROGRESS_JS)
    # Some runs finished, others still queued or running: seen without a reload.
    page.get_by_text(re.compile(rf"^[1-{n_runs - 1}] of {n_runs} runs finished, \d queued or "
                                rf"running")).wait_for(timeout=RUN_TIMEOUT_S * 1000)
    shot(page, "cluster-experiment-live", height=1200)
    page.get_by_text(f"{n_runs} of {n_runs} runs finished", exact=True).wait_for(
        timeout=RUN_TIMEOUT_S * 1000)
    wait_idle(page)
    shot(page, "cluster-experiment-verdict", height=1400)
    try:
        page.get_by_text(VERDICT).first.wait_for(timeout=10_000)
    except PlaywrightTimeout:
        pytest.fail("no verdict on the results: " + page.inner_text("body"), pytrace=False)

    runs = store.list_runs()
    assert len(runs) == n_runs
    assert [r.status for r in runs] == ["finished"] * n_runs, [(r.status, r.error) for r in runs]
    assert {r.config.seed for r in runs} == set(range(SEEDS))
    assert not store.is_sqlite and not store.layout.database.exists()  # no SQLite fallback
    for run in runs:
        assert run.executor == "ray" and run.job_id == run.id and run.host, run
        assert {m.stage for m in store.metrics(run.id, keys=["val/acc"])} >= {1}, run.id
        wait_for(lambda r=run: ray.get_job_status(r.job_id).value != "RUNNING", 60,
                 "the job to end")
        assert ray.get_job_status(run.job_id).value == "SUCCEEDED", run.id

    # New run: a long run on the same cluster, watched live, cancelled from the Runs page.
    page.goto(url + "/new_run")
    page.get_by_text("Estimated on this machine").wait_for()
    use_image_folder(page, folder)
    page.get_by_text("3 classes, 36 training images.").wait_for()
    page.get_by_text("Random (from scratch)", exact=True).click()
    wait_idle(page)
    for i in (0, 1):  # epochs of stage 1 and 2: long enough to be cancelled while training
        box = page.locator(".stNumberInput input").nth(1 + i)  # 0 is "Stages"
        box.fill("100")
        box.press("Enter")
        wait_idle(page)
    _fill(page, "Run name", "cancel me")
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(re.compile(r"/runs\?run=[\w-]+$"))
    run_id = page.url.rsplit("=", 1)[1]
    page.get_by_text("Loss: training and validation").first.wait_for(
        timeout=RUN_TIMEOUT_S * 1000)
    page.get_by_text(re.compile(rf"Where: ray job {run_id} on ")).wait_for()
    assert store.get_run(run_id).status == "running"
    shot(page, "cluster-run-live", height=1200)
    page.get_by_role("button", name="Cancel run").click()
    page.get_by_text(re.compile(r"^This run was cancelled")).wait_for(
        timeout=RUN_TIMEOUT_S * 1000)
    wait_idle(page)
    shot(page, "cluster-run-cancelled")
    cancelled = store.get_run(run_id)
    assert cancelled.status == "cancelled", cancelled.error
    assert (cancelled.executor, cancelled.job_id) == ("ray", run_id)
    assert cancelled.ended_at is not None
    wait_for(lambda: ray.get_job_status(run_id).value in ("SUCCEEDED", "STOPPED"), 60,
             "the cancelled job to end")
