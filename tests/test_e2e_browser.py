"""End to end in a real browser: Debian chromium driven by Playwright, the app served by
`streamlit run` on localhost with a temporary run store and a generated tiny image folder.

The new user's path: the offline notices on New run, the LR finder of a stage (plot,
suggestion, one click to use it), a run started from the form (folder data, random weights)
whose curve streams in until it finishes, an experiment of two recipes that reaches a
verdict, Compare, Overview, Classify on an uploaded image, a run whose stage ended on a
plateau (the chart says where and why) and the cancel of a live run. Screenshots go to
test-artifacts/ (git-ignored).

Run alone:  .venv/bin/python -m pytest -q -m browser tests/test_e2e_browser.py
README screenshots:  FINETUNE_LAB_SCREENSHOTS=docs/screenshots (same command) also writes the
screenshots of the new and fixed screens there (new-run-offline.png, lr-finder.png, ...),
from slightly larger runs. run.png, compare.png and classify.png come from real CIFAR-10 runs
(scripts/screenshots.py): this test never overwrites them.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from core import config as cfgmod
from core.analysis.lr_finder import is_lr_find_run
from core.runs import jobs
from core.runs.store import RunStore
from tests.browser_support import (
    DOCS_DIR,
    UI_TIMEOUT_MS,
    browser_page,
    require_browser,
    serve_app,
    shot,
    stop_active_runs,
    use_image_folder,
    wait_idle,
)
from tests.conftest import make_image_folder, wait_for

RUN_TIMEOUT_S = 600  # a tiny run to finish on a shared 2-core machine (worker start included)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, store, image folder): the app served on a free localhost port."""
    require_browser()
    base = tmp_path_factory.mktemp("e2e")
    big = bool(DOCS_DIR)
    folder = make_image_folder(base / "datasets" / "colors", per_class=40 if big else 12)
    store = RunStore(base / "runs")
    env = {**os.environ, "FINETUNE_LAB_DATA": str(store.root),
           "FINETUNE_LAB_DATA_ROOTS": str(base / "datasets"),
           "TORCH_HOME": str(base / "torch-home"),  # no ImageNet weights: never downloads
           "FINETUNE_LAB_MAX_JOBS": "2"}  # the experiment's runs two at a time
    try:
        with serve_app(env, "streamlit-server.log") as url:
            yield url, store, folder
    finally:
        stop_active_runs(store)  # a failed test mid-run


@pytest.fixture(scope="module")
def page(served):
    with browser_page() as pg:
        yield pg


def set_number(pg, label: str, value: int) -> None:
    box = pg.get_by_role("spinbutton", name=label)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(pg)


def choose(pg, label: str, option: str) -> None:
    pg.get_by_role("combobox", name=label).click()
    pg.get_by_role("option", name=option, exact=True).click()
    wait_idle(pg)


THUMB = '[data-testid="stSliderThumbValue"]'  # the value a Streamlit slider shows


def slider_value(slider) -> str:
    return slider.locator(THUMB).inner_text()


def plateau_config(folder: Path) -> cfgmod.RunConfig:
    """Stage 1 trains the head at an LR too small to change a prediction, so validation
    accuracy is flat from its first epoch: with a patience of 1 the stage ends after epoch 2
    of its 4."""
    return cfgmod.RunConfig(
        stages=(cfgmod.StageConfig(groups=("fc",), epochs=4, lr=1e-12, plateau_patience=1),
                cfgmod.StageConfig(groups=("layer4", "fc"), epochs=1, lr=0.01)),
        data_source="folder", data_path=str(folder), weights="random", batch_size=8,
        val_fraction=0.25, threads=1, device="cpu")


def test_new_user_path(served, page):
    from playwright.sync_api import expect

    url, store, folder = served
    big = bool(DOCS_DIR)

    # Overview with an empty store says what to do next.
    page.goto(url)
    page.get_by_text("No runs yet — start one on").wait_for()
    # The tab icon is served by the app itself (a material icon is fetched from the internet).
    icons = page.locator('link[rel~="icon"]').evaluate_all("ls => ls.map(l => l.href)")
    assert icons and all(i.startswith(url) for i in icons), icons
    assert page.title() == "Two-Stage Fine-Tuning Lab"
    shot(page, "overview-empty")

    # New run: folder data, random weights, from the form.
    page.goto(url + "/new_run")
    page.get_by_text("Estimated on this machine").wait_for()
    # Offline first run: the defaults' downloads are named before Start, with the fixes.
    page.get_by_text(re.compile(r"^CIFAR-10 is not in .* fails without internet")).wait_for()
    page.get_by_text(re.compile(r"^The ImageNet weights are not on this machine")).wait_for()
    page.get_by_role("button", name="Use random weights instead").wait_for()
    page.get_by_role("combobox", name="Preset").wait_for()
    wait_idle(page)
    shot(page, "new-run-offline", "new-run-offline.png", height=1400)
    use_image_folder(page, folder)
    n_train = 40 * 3 if big else 12 * 3
    page.get_by_text(f"3 classes, {n_train} training images.").wait_for()
    page.get_by_text("Random (from scratch)", exact=True).click()
    wait_idle(page)
    # Random weights under the Two-stage preset's frozen layers: said plainly, fix offered.
    page.get_by_text(re.compile(r"^Random weights with frozen layers")).wait_for()
    expect(page.get_by_role("button", name="Train every layer (All at once)")).to_be_visible()
    # Small batches: more steps for the curves, and cheap steps for the LR finder's 100.
    batch = page.locator(".stSlider").filter(has_text="Batch size").get_by_role("slider")
    batch.focus()
    for _ in range(3 if big else 4):  # 128 -> 64 -> 32 -> 16 (-> 8)
        batch.press("ArrowLeft")
    wait_idle(page)
    if big:  # more epochs for curves worth a screenshot
        for i in (0, 1):
            box = page.locator(".stNumberInput input").nth(1 + i)  # 0 is "Stages"
            box.fill("4")
            box.press("Enter")
            wait_idle(page)
    page.get_by_text("Advanced: optimizer, data, weights, device").click()  # fold it again

    # The LR finder of stage 1: a range test on exactly the groups stage 1 trains, its plot
    # with the suggestion, and one click that makes the suggestion the stage's LR.
    stage1_lr = page.locator(".stSlider").first  # the stage grid comes first: stage 1's LR
    assert float(slider_value(stage1_lr)) == 0.01  # the preset's
    page.get_by_text("LR finder: find a learning rate for a stage").click()
    finder = page.locator('[data-testid="stExpander"]').filter(
        has_text="LR finder: find a learning rate for a stage")
    finder.get_by_role("button", name="Find LR for stage 1").click()
    use = finder.get_by_role("button", name=re.compile(r"^Use \S+ for stage 1$"))
    use.wait_for(timeout=RUN_TIMEOUT_S * 1000)
    # The plot (SVG text): its title names the groups, the suggestion is marked.
    expect(finder.get_by_text("LR finder, stage 1 (layer4+fc)")).to_be_attached()
    expect(finder.get_by_text(re.compile(r"^suggested \S+ \(steepest descent\)"))).to_be_attached()
    suggested = float(re.fullmatch(r"Use (\S+) for stage 1", use.inner_text()).group(1))
    wait_idle(page)
    shot(page, "lr-finder", "lr-finder.png", height=1400, element=finder)
    use.click()
    expect(stage1_lr.locator(THUMB)).not_to_have_text("0.01")  # the rerun has drawn it
    assert float(slider_value(stage1_lr)) == pytest.approx(suggested, rel=0.05)
    # The test is recorded like any run.
    finder_runs = [r for r in store.list_runs() if is_lr_find_run(r)]
    assert [r.status for r in finder_runs] == ["finished"], finder_runs

    name = page.get_by_role("textbox", name="Run name")
    name.fill("browser run")
    name.press("Enter")
    wait_idle(page)
    start = page.get_by_role("button", name="Start", exact=True)
    expect(start).to_be_enabled()
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.all_inner_texts()
    shot(page, "new-run-form", height=1800)
    start.click()

    # The live view opens on the run's own URL; the loss curve streams in without a reload;
    # the tab title carries the progress; a toast says when it finished.
    page.wait_for_url(re.compile(r"/runs\?run=[\w-]+$"))
    run_id = page.url.rsplit("=", 1)[1]
    page.get_by_role("heading", name="Runs").wait_for()
    page.get_by_text("Loss: training and validation").first.wait_for(timeout=RUN_TIMEOUT_S * 1000)
    picker = page.get_by_role("combobox", name="Run", exact=True)  # its value is the label
    page.wait_for_function(  # the tab title: "37 % browser run · ..." while it trains
        "() => /^\\d+ % browser run/.test(document.title) || !/queued|running/.test("
        "document.querySelector('input[aria-label=\"Run\"]').value)", timeout=UI_TIMEOUT_MS)
    assert "(queued" not in picker.input_value()  # the picker follows the run's status
    shot(page, "run-live")
    page.get_by_text(re.compile(r"browser run finished: best validation")).wait_for(
        timeout=RUN_TIMEOUT_S * 1000)
    page.get_by_text("Best validation accuracy").wait_for(timeout=RUN_TIMEOUT_S * 1000)
    page.get_by_text("Confusion matrix (test set)").wait_for()
    runs = [r for r in store.list_runs() if not is_lr_find_run(r)]
    assert [r.status for r in runs] == ["finished"], [(r.status, r.error) for r in runs]
    assert runs[0].name == "browser run"
    cfg = cfgmod.check(runs[0].config)
    assert cfg.data_source == "folder" and cfg.weights == "random"
    assert cfg.stages[0].lr == pytest.approx(suggested, rel=0.05)  # the LR finder's
    wait_idle(page)
    assert page.title() == "Two-Stage Fine-Tuning Lab"  # nothing runs any more
    assert picker.input_value().startswith(f"browser run · {run_id[-6:]} (finished")
    page.get_by_text(re.compile(r"^Disk: ")).click()  # its size and what each file is for
    page.get_by_text(re.compile(r"best\.pt \(.*\): the best model")).wait_for()
    shot(page, "run-finished", height=1900)

    # "Insights and export" opens that run on Run insights, in the URL too.
    page.get_by_role("button", name="Insights and export →").click()
    page.wait_for_url(re.compile(r"/insights\?run=" + run_id))
    page.get_by_role("heading", name="Run insights").wait_for()
    assert run_id[-6:] in page.get_by_role("combobox", name="Run", exact=True).input_value()

    # An experiment from its form: Two-stage against All at once, two seeds each, on the
    # data set the page lists, with random weights (offline).
    page.goto(url + "/experiments")
    page.get_by_text("Settings shared by the presets").wait_for()
    assert "colors" in page.get_by_role("combobox", name="Data set").input_value()
    set_number(page, "Epochs per stage", 2 if big else 1)
    set_number(page, "Seeds per recipe", 2)
    choose(page, "Starting weights", "Random (from scratch)")
    exp_name = page.get_by_role("textbox", name="Experiment name (optional)")
    exp_name.fill("browser experiment")
    exp_name.press("Enter")
    wait_idle(page)
    # .first: while the page reruns, the caption of the run before may still stand beside it.
    page.get_by_text("This queues 4 runs (2 recipes × 2 seeds)").first.wait_for()
    page.get_by_role("button", name="Run the experiment").click()
    # It opens on its Results tab, in the URL too.
    page.get_by_text(re.compile(r"^\d of 4 runs finished")).wait_for()
    page.wait_for_url(re.compile(r"[?&]experiment=exp-"))
    # Queued behind it: a run whose stage 1 ends on a plateau, and a long one to cancel.
    plateau = jobs.submit(store, plateau_config(folder), name="plateau run")
    long_cfg = replace(plateau_config(folder),
                       stages=cfgmod.preset_stages("All at once", epochs=200))
    to_cancel = jobs.submit(store, long_cfg, name="run to cancel")
    # The verdict: who beat whom (or no clear winner), with an interval from two seeds.
    verdict = page.get_by_text(re.compile(
        r"^(Two-stage beat All at once|All at once beat Two-stage|No clear winner on best "
        r"validation accuracy)"))
    verdict.wait_for(timeout=RUN_TIMEOUT_S * 1000)
    assert "over 2 seeds" in verdict.inner_text(), verdict.inner_text()
    page.get_by_text("4 of 4 runs finished").wait_for()
    # A link (the URL) opens the same experiment and verdict; drawn once, with none of its
    # runs active, it is not refreshing (faded) while the screenshot is taken.
    page.reload()
    page.get_by_text("4 of 4 runs finished").wait_for()
    verdict.wait_for()
    page.get_by_text("Best validation accuracy, one dot per seed").wait_for()
    wait_idle(page)
    shot(page, "experiment-verdict", "experiment-verdict.png", height=1300)

    # Compare: the form's run against the experiment's All-at-once seeds.
    page.goto(url + "/compare")
    page.get_by_text("Pick two or more runs or groups").wait_for()
    page.locator(".stMultiSelect").nth(0).click()
    page.get_by_role("option", name=re.compile(r"^browser run")).click()
    page.keyboard.press("Escape")
    page.wait_for_url(re.compile(r"[?&]runs=" + run_id))  # picked (a rerun could drop it)
    wait_idle(page)
    page.locator(".stMultiSelect").nth(1).click()
    page.get_by_role("option", name=re.compile(r"All at once \(2 runs\)$")).click()
    page.keyboard.press("Escape")
    wait_idle(page)
    page.get_by_text("Config differences").wait_for()
    # The recipes differ in what trains (grid cells are drawn on a canvas: attached, hidden).
    expect(page.get_by_text("stage 1.groups")).to_be_attached()
    page.get_by_text("Stage 2 starts").first.wait_for()
    assert re.search(r"[?&]runs=" + run_id, page.url), page.url  # a link opens this view
    # Aligned at stage 2, the one-stage recipe is left out (and said so), not mis-plotted.
    page.get_by_text("Align at the start of stage 2").click()
    page.get_by_text(re.compile(r"^Left out of the aligned chart")).wait_for()
    shot(page, "compare-aligned", "compare-aligned.png", height=1400)
    page.get_by_text("Align at the start of stage 2").click()
    wait_idle(page)
    shot(page, "compare", height=1400)

    # Overview: the runs with their sizes, nothing cut; the disk total.
    page.goto(url)
    page.get_by_text(re.compile(r"^Disk: the runs take")).wait_for()
    shot(page, "overview-runs", "overview.png", height=1400)

    # Classify: upload an image of a training class and read the top class.
    image = next((folder / "test" / "red").glob("*.png"))
    page.goto(url + "/classify")
    # What the model knows and which checkpoint answers, on the page itself.
    page.get_by_text(re.compile(r"^This model knows 3 classes: ")).wait_for()
    page.get_by_text(re.compile(r"^The verdict comes from best\.pt")).wait_for()
    page.locator('input[type="file"]').set_input_files(str(image))
    guess = page.get_by_text(re.compile(r"^Best guess:"))
    guess.wait_for()
    text = guess.inner_text()
    assert re.search(r"red|green|blue", text, re.IGNORECASE), text
    page.get_by_text("Warm colours (yellow, red)").wait_for()  # the explanation
    page.get_by_text("Details", exact=True).wait_for()  # the page's last element
    wait_idle(page)
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    shot(page, "classify", height=1400)

    # The plateau run: its charts mark where stage 1 ended (epoch 2 of 4) and why.
    wait_for(lambda: store.get_run(plateau.id).status not in ("queued", "running"),
             timeout_s=RUN_TIMEOUT_S, what="the plateau run to end")
    assert store.get_run(plateau.id).status == "finished", store.get_run(plateau.id).error
    page.goto(url + f"/runs?run={plateau.id}")
    page.get_by_text("Best validation accuracy").wait_for()
    mark = page.get_by_text("stage 1 ended: plateau", exact=True)
    mark.first.wait_for()
    assert mark.count() == 2  # on the loss and on the accuracy chart
    ends = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].flatMap("
                         "d => (d.layout.shapes || []).filter(s => s.line && s.line.dash === "
                         "'dot').map(s => s.x0))")
    assert ends == [2, 2], ends
    wait_idle(page)
    shot(page, "plateau", "plateau.png", height=1300)

    # Cancel a live run: it stops, says so, and offers to resume.
    wait_for(lambda: store.get_run(to_cancel.id).status == "running", timeout_s=RUN_TIMEOUT_S,
             what="the run to cancel to start")
    page.goto(url + f"/runs?run={to_cancel.id}")
    cancel = page.get_by_role("button", name="Cancel run")
    cancel.click()
    page.get_by_text(re.compile(r"^This run was cancelled")).wait_for(timeout=RUN_TIMEOUT_S * 1000)
    expect(page.get_by_role("button", name=re.compile(r"^Resume"))).to_be_visible()
    assert store.get_run(to_cancel.id).status == "cancelled"
    assert picker.input_value().startswith(f"run to cancel · {to_cancel.id[-6:]} (cancelled")
    shot(page, "run-cancelled")


def finished_training_run(store: RunStore, folder: Path):
    """A finished training run of the store (the new user's "browser run"); one is trained
    when this test runs alone."""
    done = [r for r in store.list_runs(statuses=("finished",), kinds=("training",))]
    if done:
        return done[0]
    run = jobs.submit(store, replace(plateau_config(folder),
                                     stages=cfgmod.preset_stages("Two-stage")), name="tiny")
    wait_for(lambda: not store.get_run(run.id).is_active, timeout_s=RUN_TIMEOUT_S,
             what="a tiny run to finish")
    return store.get_run(run.id)


def test_second_hour(served, page, tmp_path):
    """Issue 20, the new user's second hour: Experiments offline says why before queuing
    anything; the form remembers across pages; New run's offline fixes are pickers (a
    weights file uploaded and stored, a data set picked); "Run again with this config"
    fills New run with a run's config."""
    import torch
    from playwright.sync_api import expect

    from core.engine.model import build_resnet18

    url, store, folder = served
    before = len(store.list_runs())

    # Experiments with ImageNet weights left as they are, on a machine without them: said
    # before anything is queued, and nothing can be queued until that is settled.
    page.goto(url + "/experiments")
    page.get_by_text("Settings shared by the presets").wait_for()
    warning = page.get_by_text(re.compile(r"^Every run would download the ImageNet weights"))
    warning.wait_for()
    run_button = page.get_by_role("button", name="Run the experiment")
    expect(run_button).to_be_disabled()
    wait_idle(page)
    shot(page, "experiments-offline", "experiments-offline.png", height=1300)
    assert len(store.list_runs()) == before
    # The form remembers: leave for another page and come back.
    choose(page, "Starting weights", "Random (from scratch)")
    set_number(page, "Seeds per recipe", 3)
    page.get_by_role("link", name="Overview").click()
    page.get_by_role("heading", name="Two-Stage Fine-Tuning Lab").wait_for()
    page.get_by_role("link", name="Experiments").click()
    page.get_by_text("Settings shared by the presets").wait_for()
    wait_idle(page)
    assert page.get_by_role("combobox", name="Starting weights").input_value() == \
        "Random (from scratch)"
    assert page.get_by_role("spinbutton", name="Seeds per recipe").input_value() == "3"
    expect(warning).to_have_count(0)

    # New run offline: a weights file uploaded (checked, stored under the data folder) and
    # picked, instead of a typed absolute path.
    weights = tmp_path / "my weights.pth"
    torch.save(build_resnet18(3).state_dict(), weights)
    page.goto(url + "/new_run")
    page.get_by_text("Estimated on this machine").wait_for()  # drawn (torch imported)
    wait_idle(page)
    page.get_by_role("button", name="Use a weights file").click()
    wait_idle(page)
    page.get_by_text("Advanced: optimizer, data, weights, device").click()
    uploader = page.locator('[data-testid="stFileUploader"]').filter(
        has_text="Upload a weights file")
    uploader.locator('input[type="file"]').set_input_files(str(weights))
    picked = page.get_by_role("combobox", name="Weights file (.pth)")
    expect(picked).to_have_value("my-weights.pth", timeout=UI_TIMEOUT_MS)
    page.get_by_text("Image folder", exact=True).click()
    wait_idle(page)
    page.get_by_role("combobox", name="Pick a data set").wait_for()  # (AppTest picks one)
    data_input = page.get_by_role("textbox", name="Data folder")
    data_input.fill(str(folder))
    data_input.press("Enter")
    wait_idle(page)
    page.get_by_text(re.compile(r"^3 classes, \d+ training images\.")).wait_for()
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.all_inner_texts()
    advanced = page.locator('[data-testid="stExpander"]').filter(
        has_text="Advanced: optimizer, data, weights, device")
    shot(page, "new-run-pickers", "new-run-pickers.png", height=1400, element=advanced)

    # Run again with this config: New run opens filled in with the run's config.
    run = finished_training_run(store, folder)
    page.goto(url + f"/runs?run={run.id}")
    page.get_by_role("button", name="Run again with this config").click()
    page.get_by_role("heading", name="New run").wait_for()
    page.get_by_text("Advanced: optimizer, data, weights, device").click()
    expect(page.get_by_role("textbox", name="Data folder")).to_have_value(run.config.data_path)
    batch = page.locator(".stSlider").filter(has_text="Batch size")
    assert slider_value(batch) == str(run.config.batch_size)
    wait_idle(page)
    shot(page, "run-again", height=1400)
