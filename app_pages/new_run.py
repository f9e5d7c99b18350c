"""New run: preset, stages as a stage-by-group grid, advanced settings, live summary, Start.

Widgets -> RunConfig -> core.analysis.planning.plan_run -> core.runs.jobs.submit. Widget
values live in session state under "new_run.*" keys derived from the config fields
(core.config.form_state / from_form); a preset writes its values there.
"""

from __future__ import annotations

import os
import time
from typing import Any

import streamlit as st

from app_pages._common import (
    DATASETS_PAGE,
    HANDED_DATA_PATH,
    access,
    epoch_estimate,
    get_store,
    open_run,
    page_link,
    scan_image_folder,
)
from app_pages._forms import CONFIG_FOR_NEW_RUN, keep_form, restore_form
from app_pages._pickers import data_folder_picker, weights_file_picker
from app_pages._tool_jobs import active_job
from core import config as cfgmod
from core.analysis import lr_finder, planning, speed
from core.config import LAYER_GROUPS, MAX_STAGES, RunConfig, StageConfig
from core.engine.paths import DATA_ROOTS_ENV, PathNotAllowed, cifar10_dir, data_roots, resolve_user_path
from core.runs import jobs
from core.runs.entities import TRAINING_KINDS
from core.runs.preflight import PreflightError, available_memory
from core.runs.store import RunStore, StoreError
from core.views import charts
from core.views.tables import fmt_count, fmt_duration, run_label
from core.views.text import md

P = "new_run."  # session-state prefix of this page
# Column widths of the stage grid; Schedule is wide enough for "cosine decay" uncut.
STAGE_GRID = [1.1] + [0.8] * len(LAYER_GROUPS) + [1.1, 2.3, 2.2]


def stage_prefix(i: int) -> str:
    return f"{P}s{i}."


def put_stage(i: int, stage: StageConfig) -> None:
    st.session_state.update(cfgmod.form_state(stage, stage_prefix(i)))


def read_stage(i: int) -> StageConfig:
    return cfgmod.from_form(StageConfig, st.session_state, stage_prefix(i))


def apply_preset() -> None:
    stages = cfgmod.preset_stages(st.session_state[f"{P}preset"])
    for i, stage in enumerate(stages):
        put_stage(i, stage)
    st.session_state[f"{P}n_stages"] = len(stages)


def form_defaults() -> dict[str, Any]:
    """Every key of the form with its first-visit value: the default run config with the
    Two-stage preset's stages (stages beyond the preset repeat its last one)."""
    stages = cfgmod.preset_stages("Two-stage")
    out = {f"{P}preset": "Two-stage", f"{P}n_stages": len(stages),
           **cfgmod.form_state(RunConfig(), P), f"{P}name": "", f"{P}repeats": 1,
           f"{P}note": "", f"{P}tags": []}
    for i in range(MAX_STAGES):
        out.update(cfgmod.form_state(stages[min(i, len(stages) - 1)], stage_prefix(i)))
    return out


FORM = form_defaults()


def load_config(cfg: RunConfig) -> None:
    """Fill the form with `cfg` (Run again, Load a config); the preset picker is left as it
    was, as its stages were changed."""
    st.session_state.update(cfgmod.form_state(cfg, P))
    for i, stage in enumerate(cfg.stages):
        put_stage(i, stage)
    st.session_state[f"{P}n_stages"] = len(cfg.stages)


def ensure_defaults() -> None:
    """Every visit: the values the form held when last left this session (leaving the page
    drops widget state), else the defaults; then a data folder or config handed over."""
    restore_form("new_run", FORM)
    handed = st.session_state.pop(HANDED_DATA_PATH, None)
    if handed:
        st.session_state[f"{P}data_source"] = "folder"
        st.session_state[f"{P}data_path"] = handed
    if text := st.session_state.pop(CONFIG_FOR_NEW_RUN, None):
        load_config(cfgmod.from_json(text))


def config_upload() -> None:
    """Load a config: the JSON the Runs page downloads (or `python -m core run` reads)."""
    upload = st.session_state.get(f"{P}config_file")
    if upload is None:
        return
    try:
        cfg = cfgmod.from_json(upload.getvalue())
    except cfgmod.ConfigError as exc:
        st.session_state[f"{P}config_problem"] = f"{upload.name} is not a run config: " + "; ".join(exc.errors)
    else:
        load_config(cfg)
        st.session_state[f"{P}config_problem"] = ""
        st.toast(f"Loaded {md(upload.name)} into the form.", icon=":material/upload_file:")


def field_input(where: Any, cls: type, name: str, prefix: str = P, **options: Any) -> Any:
    """The widget of one config field, as its FieldSpec describes it."""
    spec = cfgmod.field_spec(cls, name)
    key = cfgmod.field_key(prefix, name)
    kw = {"label": spec.label, "key": key, "help": spec.help or None, **options}
    if spec.widget == "number":
        return where.number_input(min_value=spec.low, max_value=spec.high, step=spec.step,
                                  format=spec.number_format, **kw)
    if spec.widget == "slider":
        return where.slider(min_value=spec.low, max_value=spec.high, step=spec.step, **kw)
    if spec.widget == "select_slider":
        return where.select_slider(options=spec.options(st.session_state[key]),
                                   format_func=spec.choice_label, **kw)
    if spec.widget == "select":
        return where.selectbox(options=spec.choices, format_func=spec.choice_label, **kw)
    if spec.widget == "radio":
        return where.radio(options=spec.choices, format_func=spec.choice_label, horizontal=True,
                           **kw)
    if spec.widget == "checkbox":
        return where.checkbox(**kw)
    return where.text_input(**kw)


def user_path(text: str, what: str, errors: list[str]) -> str:
    """A typed path resolved inside the allowed roots; "" (and an error) when refused."""
    if not text.strip():
        return ""
    try:
        return str(resolve_user_path(text.strip()))
    except PathNotAllowed as exc:
        errors.append(f"{what}: {exc}")
        return ""


def estimates_of(store: RunStore) -> tuple[planning.EpochEstimate, dict]:
    """(seconds per epoch for plan_run, the estimates it asked for by stage groups): the
    summary says how sure each stage's figure is."""
    made: dict[tuple[str, ...], speed.EpochEstimate] = {}

    def seconds(groups: tuple[str, ...], *shape: Any) -> float:
        made[groups] = epoch_estimate(groups, *shape, str(store.root))
        return made[groups].seconds

    return seconds, made


def train_all_groups() -> None:
    """The fix for random weights with frozen layers: one stage that trains everything."""
    st.session_state[f"{P}preset"] = "All at once"
    apply_preset()


def use_random_weights() -> None:
    st.session_state[f"{P}weights"] = "random"


def use_weights(choice: str) -> None:
    """The offline fixes that keep the recipe: a weights file, or a run's checkpoint."""
    st.session_state[f"{P}weights"] = choice


def offline_notes(cfg: RunConfig) -> None:
    """Before Start: what the defaults need from the internet, with the fix that works
    offline; and random weights under frozen layers, in plain words, with its fix."""
    needed = planning.needs_download(cfg)  # Experiments asks the same before queuing
    if "imagenet" in needed:
        st.info("The ImageNet weights are not on this machine yet: they will be downloaded "
                "(45 MB) when the run starts, which fails without internet. Offline? Start "
                "from a weights file (upload one) or another run's best checkpoint, which "
                "keep this recipe; the picker is under **Advanced**, *Starting weights*. "
                "Random weights suit only the *All at once* preset.", icon=":material/cloud_off:")
        fix = st.columns(3)
        fix[0].button("Use a weights file", key=f"{P}fix_file", on_click=use_weights,
                      args=("file",))
        fix[1].button("Use another run's checkpoint", key=f"{P}fix_run", on_click=use_weights,
                      args=("run",))
        fix[2].button("Use random weights instead", key=f"{P}fix_weights",
                      on_click=use_random_weights)
    if "cifar10" in needed:
        st.info(f"CIFAR-10 is not in {cifar10_dir(cfg.data_path)}: it will be downloaded "
                f"(170 MB) when the run starts, which fails without internet. Offline? Copy "
                f"`{planning.CIFAR10_FOLDER}/` there (the README's *Offline use* steps), or add "
                f"an image folder on the **Datasets** page and train on it (data source "
                f"under **Advanced**).", icon=":material/cloud_off:")
        page_link(DATASETS_PAGE, "Add a data set on Datasets", ":material/folder_open:",
                  "Datasets")
    frozen = sorted({g for s in cfg.stages for g in LAYER_GROUPS if g not in s.groups},
                    key=LAYER_GROUPS.index)
    if cfg.weights == "random" and frozen:
        st.warning(f"Random weights with frozen layers: {', '.join(frozen)} stay frozen in at "
                   f"least one stage, so there they keep random values and the layers after "
                   f"them learn from noise. Train every layer instead (the *All at once* "
                   f"preset), or start from ImageNet weights or another run's checkpoint.",
                   icon=":material/warning:")
        st.button("Train every layer (All at once)", key=f"{P}fix_frozen",
                  on_click=train_all_groups)


def stages_grid(n_stages: int) -> None:
    st.caption("Tick the layer groups that train in each stage; the rest stay frozen. Groups "
               "run from the input (conv1) to the new classification head (fc).")
    for col, text in zip(st.columns(STAGE_GRID), ["", *LAYER_GROUPS, "Epochs", "Learning rate",
                                                  "Schedule"]):
        col.markdown(f"**{text}**" if text else "")
    for i in range(n_stages):
        row = st.columns(STAGE_GRID, vertical_alignment="center")
        row[0].markdown(f"**Stage {i + 1}**")
        for j, g in enumerate(LAYER_GROUPS):
            row[1 + j].toggle(g, key=cfgmod.field_key(stage_prefix(i), "groups", g),
                              label_visibility="collapsed", help=f"Train {g} in stage {i + 1}")
        for col, name in zip(row[1 + len(LAYER_GROUPS):], ("epochs", "lr", "schedule")):
            field_input(col, StageConfig, name, stage_prefix(i), label_visibility="collapsed")


def advanced_stages(n_stages: int) -> None:
    st.markdown("**Per stage**")
    for i in range(n_stages):
        # Two rows: in one row of seven, "SGD + momentum" and the BatchNorm choice were cut off.
        first = st.columns([0.8, 2, 1.3, 1.3, 1.3], vertical_alignment="bottom")
        first[0].markdown(f"Stage {i + 1}")
        for col, name in zip(first[1:], ("optimizer", "weight_decay", "warmup_epochs",
                                         "plateau_patience")):
            field_input(col, StageConfig, name, stage_prefix(i))
        second = st.columns([0.8, 2, 1.3, 1.3, 1.3], vertical_alignment="bottom")
        for col, name in zip(second[1:], ("bn_policy", "group_lr_mult", "feature_cache")):
            field_input(col, StageConfig, name, stage_prefix(i))


def data_settings(errors: list[str]) -> tuple[str, planning.FolderScan | None]:
    """Data widgets -> (resolved data path, the folder's scan for a folder run)."""
    st.markdown("**Data**")
    d = st.columns([1.3, 2])
    field_input(d[0], RunConfig, "data_source")
    folder = st.session_state[f"{P}data_source"] == "folder"
    if folder:
        data_folder_picker(d[0], f"{P}data_pick", f"{P}data_path")
    field_input(d[1], RunConfig, "data_path",
                label="Data folder" if folder else "CIFAR-10 folder (blank = default)",
                placeholder="folder with train/ and test/ class folders" if folder
                else "where CIFAR-10 is (or will be downloaded)")
    data_path = user_path(st.session_state[f"{P}data_path"], "data folder", errors)
    scan = scan_image_folder(data_path) if folder and data_path else None
    if scan and not scan.error:
        split = scan.has_test_split
        st.caption(f"{len(scan.classes)} classes, {scan.total_train_images} "
                   f"{'training ' if split else ''}images"
                   f"{'' if split else ' (a test split is held out)'}.")
    options = planning.class_options(st.session_state[f"{P}data_source"], scan)
    st.session_state[f"{P}classes"] = [c for c in st.session_state[f"{P}classes"] if c in options]
    st.multiselect(cfgmod.field_spec(RunConfig, "classes").label, options, key=f"{P}classes",
                   placeholder="all classes" if options else "enter a data folder first")
    d2 = st.columns(4)
    for col, name in zip(d2, ("val_fraction", "max_train_images", "batch_size", "resolution")):
        field_input(col, RunConfig, name)
    return data_path, scan


def weights_settings(store: RunStore, device_col: Any, errors: list[str]) -> tuple[str, str]:
    """Starting-weights and device widgets -> (resolved weights file, donor run id)."""
    st.markdown("**Starting weights and device**")
    w = st.columns([2, 2])
    field_input(w[0], RunConfig, "weights", help=None)  # its help is the CLI's
    weights = st.session_state[f"{P}weights"]
    weights_path = weights_run = ""
    if weights == "file":
        picked = weights_file_picker(w[1], f"{P}weights_path",
                                     cfgmod.field_spec(RunConfig, "weights_path").label)
        weights_path = user_path(picked, "weights file", errors)
    elif weights == "run":
        donors = {r.id: r for r in store.list_runs(statuses=("finished",), kinds=TRAINING_KINDS)
                  if r.best_checkpoint}
        if st.session_state[f"{P}weights_run"] not in donors:
            st.session_state[f"{P}weights_run"] = next(iter(donors), None)
        w[1].selectbox(cfgmod.field_spec(RunConfig, "weights_run").label, list(donors),
                       key=f"{P}weights_run", format_func=lambda i: run_label(donors[i]),
                       placeholder="no finished runs yet")
        weights_run = st.session_state[f"{P}weights_run"] or ""
    field_input(device_col, RunConfig, "device")
    return weights_path, weights_run


def use_lr(i: int, lr: float) -> None:
    """Button callback: the LR finder's suggestion becomes stage i's learning rate."""
    st.session_state[cfgmod.field_key(stage_prefix(i), "lr")] = lr


def lr_finder_section(store: RunStore, cfg: RunConfig, n_stages: int) -> None:
    """Per stage: a short LR range test on exactly the groups that stage trains, run as a
    background job (progress, cancel), its plot, and one click to use the suggestion when
    the curve clearly gives one (core.analysis.lr_finder)."""
    with st.expander("LR finder: find a learning rate for a stage"):
        st.caption("A short background job (100 steps, in the job queue like a run) raises the "
                   "learning rate exponentially while training only the stage's layer groups, "
                   "and suggests where the loss falls fastest, when it clearly does. Each test "
                   "is recorded as a run named “LR finder · …”.")
        errors = cfgmod.validate(cfg)
        for i in range(n_stages):
            lr_finder_stage(store, cfg, i, bool(errors))
        if errors:
            st.caption("Fix the config first: " + "; ".join(errors))


def lr_finder_stage(store: RunStore, cfg: RunConfig, i: int, config_invalid: bool) -> None:
    """Stage i's (0-based) range test: the button, the job while it runs, then its result."""
    key = f"{P}lr_find.{i}"
    cols = st.columns([1, 2], vertical_alignment="bottom")
    start_ckpt = None
    if i > 0:  # a later stage starts from the previous stage's result
        donors = {r.id: r for r in store.list_runs(statuses=("finished",), kinds=TRAINING_KINDS)
                  if store.files(r.id).stage_end(i).exists()}
        pick = cols[1].selectbox(
            f"Stage {i + 1} starts from", ["", *donors], key=f"{key}.from",
            format_func=lambda r: (run_label(donors[r]) + f" (end of stage {i})" if r
                                   else "the starting weights (approximation)"),
            help=f"Stage {i + 1} will start from stage {i}'s result: a finished run's "
                 f"stage {i} checkpoint stands in for it.")
        start_ckpt = str(store.files(pick).stage_end(i)) if pick else None
    # This session's last test of the stage, else the newest for exactly this config.
    job = store.get_run(st.session_state.get(key) or "") or lr_finder.latest_job(store, cfg, i + 1)
    busy = job is not None and job.is_active
    if cols[0].button(f"Find LR for stage {i + 1}", key=f"{key}.go",
                      disabled=config_invalid or busy):
        try:
            job = lr_finder.submit(store, cfg, lr_finder.LrFinderRequest(i + 1, start_ckpt))
        except (cfgmod.ConfigError, PreflightError) as exc:
            st.error(f"The LR finder could not start: {md(str(exc))}")
            return
        st.session_state[key] = job.id
        st.rerun()  # drawn again with the button held while the job runs
    tested = job.config.stages[i].trains if job is not None and i < len(job.config.stages) else None
    if job is None or tested != cfg.stages[i].trains:  # a test of other layer groups
        return
    if job.is_active:
        active_job(job.id, key, "The range test")
        return
    if job.status != "finished":
        st.warning(f"The last range test of stage {i + 1} {job.status}"
                   + (f": {md(job.error)}" if job.error else "."))
        return
    c = lr_finder.curve_of(store, job.id)
    suggestion = c.suggestion
    st.plotly_chart(charts.lr_find_figure(c.lrs, c.losses, c.smoothed, suggestion.lr,
                                          f"LR finder, stage {i + 1} ({cfg.stages[i].trains})"),
                    key=f"{key}.chart")
    st.caption(f"Started from {md(job.results.weights)}."
               f"{' Stopped early: the loss diverged.' if c.diverged else ''}")
    if suggestion.lr is None:
        st.info(suggestion.why, icon=":material/info:")
    else:
        st.button(f"Use {suggestion.lr:.2g} for stage {i + 1}", key=f"{key}.use",
                  on_click=use_lr, args=(i, suggestion.lr))
        st.caption(suggestion.why)


def summary(plan: planning.RunPlan, cfg: RunConfig,
            estimates: dict[tuple[str, ...], speed.EpochEstimate]) -> None:
    st.subheader("Summary")
    st.dataframe([{
        "Stage": f"Stage {i}", "Trains": s.trains,
        "Trainable parameters": f"{fmt_count(s.trainable_parameters)} "
                                f"({100 * s.trainable_parameters / s.total_parameters:.1f} %)",
        "Epochs": s.epochs, "Learning rate": f"{s.lr:g}",
        "Est. time per epoch": fmt_duration(s.epoch_seconds) if s.epoch_seconds is not None else "—",
        "Est. stage time": fmt_duration(s.stage_seconds) if s.stage_seconds is not None else "—",
    } for i, s in enumerate(plan.stages, 1)], hide_index=True, key=f"{P}summary")
    st.caption(f"Estimated on this machine for about {plan.train_images:,} training images"
               f"{'' if plan.train_images else ' (enter a data folder to estimate)'} at "
               f"{cfg.resolution} px; {plan.num_classes} classes. The first run of a data set "
               f"also decodes and caches the images.")
    sure = [f"stage {i} {estimates[s.groups].describe()}"
            for i, s in enumerate(cfg.stages, 1) if s.groups in estimates]
    if sure:  # each with how sure it is
        st.caption("Time per epoch: " + "; ".join(sure) + ".")
    offline_notes(cfg)
    for e in plan.errors:
        st.error(e)
    for c in plan.cautions:
        st.warning(c, icon=":material/memory:")
    if any(e.startswith(("data folder:", "weights file:")) and DATA_ROOTS_ENV in e
           for e in plan.errors):
        roots = os.pathsep.join(str(r) for r in data_roots())
        st.info(f"The app reads only folders under its data folders. To allow another, "
                f"start it with that folder added, e.g. `{DATA_ROOTS_ENV}=\"{roots}"
                f"{os.pathsep}/path/to/your/data\" bash scripts/start.sh`, or copy the data "
                f"under {data_roots()[0]}.", icon=":material/folder_managed:")


def start(store: RunStore, cfg: RunConfig, plan: planning.RunPlan, button_col: Any) -> None:
    label = "Start" if len(plan.seeds) == 1 else f"Start {len(plan.seeds)} runs"
    if not button_col.button(label, type="primary", disabled=bool(plan.errors), key=f"{P}start"):
        return
    s = st.session_state
    name = s[f"{P}name"].strip() or f"{s[f'{P}preset']} {time.strftime('%m-%d %H:%M:%S')}"
    try:
        if len(plan.seeds) == 1:
            runs = [jobs.submit(store, cfg, name=name, started_by=access().started_by)]
        else:
            runs = jobs.submit_seeds(store, cfg, list(plan.seeds), name=name, group=name,
                                     started_by=access().started_by)
        for run in runs:  # the note and tags written before Start
            if s[f"{P}note"].strip():
                store.set_note(run.id, s[f"{P}note"])
            if s[f"{P}tags"]:
                store.set_tags(run.id, list(s[f"{P}tags"]))
    except (cfgmod.ConfigError, StoreError, OSError) as exc:
        st.error(f"Could not start the run: {exc}")
    else:
        open_run(runs[0].id)  # where its progress and results are, with the run in the URL


def note_and_tags(store: RunStore) -> None:
    """A note and tags given before Start (Overview and Compare filter by tag)."""
    c = st.columns([3, 2])
    c[0].text_area("Note (optional)", key=f"{P}note", height=68, max_chars=cfgmod.NOTE_MAX_CHARS,
                   placeholder="what you are trying, what you expect")
    c[1].multiselect("Tags (optional)", sorted(set(store.all_tags()) | set(st.session_state[f"{P}tags"])),
                     key=f"{P}tags", accept_new_options=True,
                     placeholder="type a tag, press Enter")


# ---------------------------------------------------------------- page

ensure_defaults()
store = get_store()
st.title("New run")
st.caption("Pick a recipe, adjust the stages, and start. Training runs in the background: "
           "you can close the tab and come back.")
top = st.columns([2, 1, 1])
top[0].selectbox("Preset", cfgmod.PRESETS, key=f"{P}preset", on_change=apply_preset,
                 help="Fills in the stages; change anything afterwards.")
top[0].caption(cfgmod.PRESET_DESCRIPTIONS[st.session_state[f"{P}preset"]])
with st.expander("Load a config (the JSON a run's page downloads)"):
    st.file_uploader("Config file", type=["json"], key=f"{P}config_file", on_change=config_upload,
                     help="Fills in the form; change anything before Start.")
    if problem := st.session_state.get(f"{P}config_problem"):
        st.error(problem)
top[1].number_input("Stages", min_value=1, max_value=MAX_STAGES, step=1, key=f"{P}n_stages")
top[2].text_input("Run name", key=f"{P}name", placeholder="automatic", max_chars=cfgmod.NAME_MAX_CHARS)
n_stages = int(st.session_state[f"{P}n_stages"])

st.subheader("Stages")
stages_grid(n_stages)
path_errors: list[str] = []
with st.expander("Advanced: optimizer, data, weights, device"):
    advanced_stages(n_stages)
    data_path, scan = data_settings(path_errors)
    d3 = st.columns(4)
    field_input(d3[0], RunConfig, "augment")
    field_input(d3[1], RunConfig, "seed")
    weights_path, weights_run = weights_settings(store, d3[2], path_errors)
    field_input(d3[3], RunConfig, "early_stop_patience")

cfg = cfgmod.from_form(RunConfig, st.session_state, P,
                       stages=tuple(read_stage(i) for i in range(n_stages)), data_path=data_path,
                       weights_path=weights_path, weights_run=weights_run)
lr_finder_section(store, cfg, n_stages)
summary_area = st.container()  # drawn once the plan (which needs the seed count) exists
note_and_tags(store)
repeat_cols = st.columns([1, 1, 3], vertical_alignment="bottom")
repeats = repeat_cols[0].number_input(
    "Repeat with N seeds", min_value=1, max_value=10, step=1, key=f"{P}repeats",
    help="Queue N runs with seeds seed, seed+1, ... as one group: Compare draws them as mean ± std.")
epoch_seconds, estimates = estimates_of(store)
plan = planning.plan_run(cfg, scan, path_errors, int(repeats), epoch_seconds, available_memory())
with summary_area:
    summary(plan, cfg, estimates)
start(store, cfg, plan, repeat_cols[1])
if plan.errors:
    repeat_cols[2].caption("Fix the problems above to start.")
with st.expander("Config as JSON"):
    st.code(cfgmod.to_json(cfg), language="json")
keep_form("new_run", FORM)
