"""New run: preset, stages as a stage-by-group grid, advanced settings, live summary, Start.

Widgets -> RunConfig -> core.config.validate -> core.runs.jobs.submit. Widget values live in
session state under "new_run.*" keys; a preset writes its values there.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from app_pages._common import SELECTED_RUN, get_store
from core import config as cfgmod
from core.config import LAYER_GROUPS, MAX_STAGES, RunConfig, StageConfig
from core.engine.image_types import train_test_folders
from core.engine.model_info import imagenet_weights_path, resnet18_parameters
from core.engine.paths import PathNotAllowed, resolve_user_path
from core.runs import jobs
from core.runs.store import RunStore, StoreError
from core.views.tables import fmt_count, fmt_duration, run_label

P = "new_run."  # widget-key prefix of this page
# Learning-rate choices on a log scale: 1, 2, 3, 5 per decade from 1e-5 to 1.
LR_CHOICES = tuple(round(m * 10.0 ** e, 10) for e in range(-5, 0) for m in (1, 2, 3, 5)) + (1.0,)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_TRAIN_IMAGES_PER_CLASS = 5000
DATA_LABELS = {"cifar10": "CIFAR-10 (torchvision)", "folder": "Image folder"}
WEIGHT_LABELS = {"imagenet": "ImageNet", "random": "Random (from scratch)",
                 "file": "Weights file", "run": "Another run's best checkpoint"}
SCHEDULE_LABELS = {"constant": "constant", "cosine": "cosine decay", "step": "step decay",
                   "onecycle": "one-cycle"}
DEVICE_LABELS = {"auto": "auto (GPU if any)", "cpu": "CPU", "cuda": "CUDA GPU", "mps": "Apple MPS"}


def nearest_lr(lr: float) -> float:
    """The LR choice closest on a log scale (presets use lr/3, which is not on the grid)."""
    import math

    return min(LR_CHOICES, key=lambda c: abs(math.log(c) - math.log(max(lr, 1e-12))))


def put_stage(i: int, stage: StageConfig) -> None:
    """Write one stage's values into its widgets' session-state keys."""
    for g in LAYER_GROUPS:
        st.session_state[f"{P}s{i}.g.{g}"] = g in stage.groups
    st.session_state[f"{P}s{i}.epochs"] = stage.epochs
    st.session_state[f"{P}s{i}.lr"] = nearest_lr(stage.lr)
    st.session_state[f"{P}s{i}.schedule"] = stage.schedule
    st.session_state[f"{P}s{i}.optimizer"] = stage.optimizer
    st.session_state[f"{P}s{i}.weight_decay"] = stage.weight_decay
    st.session_state[f"{P}s{i}.warmup"] = float(stage.warmup_epochs)
    st.session_state[f"{P}s{i}.bn"] = stage.bn_policy
    st.session_state[f"{P}s{i}.mult"] = stage.group_lr_mult
    st.session_state[f"{P}s{i}.feature_cache"] = stage.feature_cache


def apply_preset() -> None:
    stages = cfgmod.preset_stages(st.session_state[f"{P}preset"])
    for i, stage in enumerate(stages):
        put_stage(i, stage)
    st.session_state[f"{P}n_stages"] = len(stages)


def ensure_defaults() -> None:
    """First visit (or back after leaving the page, which drops widget state): the default
    run config and the Two-stage preset."""
    if f"{P}preset" not in st.session_state:
        st.session_state[f"{P}preset"] = "Two-stage"
        apply_preset()
    run = RunConfig()
    defaults = {
        "data_source": run.data_source, "data_path": "", "classes": [], "classes_text": "",
        "weights": run.weights, "weights_path": "", "weights_run": None,
        "batch_size": run.batch_size, "resolution": run.resolution, "augment": run.augment,
        "seed": run.seed, "val_fraction": run.val_fraction, "max_train_images": run.max_train_images,
        "device": run.device, "name": "", "repeats": 1,
    }
    for k, v in defaults.items():
        st.session_state.setdefault(P + k, v)
    handed = st.session_state.pop("new_run_data_path", None)  # from Datasets: "use in a new run"
    if handed:
        st.session_state[f"{P}data_source"] = "folder"
        st.session_state[f"{P}data_path"] = handed
    for i in range(MAX_STAGES):
        if f"{P}s{i}.epochs" not in st.session_state:  # a stage added beyond the preset
            prev = read_stage(i - 1) if i > 0 else StageConfig()
            put_stage(i, prev)


def read_stage(i: int) -> StageConfig:
    s = st.session_state
    return StageConfig(
        groups=tuple(g for g in LAYER_GROUPS if s.get(f"{P}s{i}.g.{g}")),
        epochs=int(s[f"{P}s{i}.epochs"]), optimizer=s[f"{P}s{i}.optimizer"],
        lr=float(s[f"{P}s{i}.lr"]), group_lr_mult=float(s[f"{P}s{i}.mult"]),
        weight_decay=float(s[f"{P}s{i}.weight_decay"]), schedule=s[f"{P}s{i}.schedule"],
        warmup_epochs=float(s[f"{P}s{i}.warmup"]), bn_policy=s[f"{P}s{i}.bn"],
        feature_cache=bool(s[f"{P}s{i}.feature_cache"]))


def trainable_counts(groups_per_stage: list[tuple[str, ...]], num_classes: int) -> list[tuple[int, int]]:
    """(trainable, total) parameters per stage, from a constant table (no model built)."""
    total = resnet18_parameters(LAYER_GROUPS, num_classes)
    return [(resnet18_parameters(groups, num_classes), total) for groups in groups_per_stage]


@st.cache_data(ttl=30, show_spinner=False)
def epoch_seconds(groups: tuple[str, ...], n_images: int, resolution: int, feature_cache: bool,
                  device: str | None, store_root: str) -> float:
    """Estimated seconds per epoch; the measured-speed lookup reads the run store, so it is
    cached for 30 s per stage shape instead of repeated on every rerun."""
    from core.analysis.speed import estimate_epoch_seconds  # no torch; fast

    return estimate_epoch_seconds(groups, n_images, resolution, feature_cache,
                                  store=RunStore(store_root), device=device)


@st.cache_data(ttl=30, show_spinner="Scanning the image folder…")
def scan_image_folder(path: str) -> tuple[list[str], dict[str, int], bool, str]:
    """(classes, training images per class, has train/test split, error) of a folder."""
    from core.engine.data import DataError, scan_folder

    root = Path(path)
    parts = train_test_folders(root)
    split = parts is not None
    try:
        classes, per_class, _ = scan_folder(parts[0] if parts else root)
    except DataError as exc:
        return [], {}, split, str(exc)
    except OSError as exc:
        return [], {}, split, f"cannot read {root}: {exc.strerror}"
    return classes, {c: len(f) for c, f in zip(classes, per_class)}, split, ""


@st.cache_data(ttl=60)
def imagenet_weights_cached() -> bool:
    return imagenet_weights_path().exists()


# ---------------------------------------------------------------- page

ensure_defaults()
store = get_store()
st.title("New run")
st.caption("Pick a recipe, adjust the stages, and start. Training runs in the background: "
           "you can close the tab and come back.")

top = st.columns([2, 1, 1])
with top[0]:
    st.selectbox("Preset", cfgmod.PRESETS, key=f"{P}preset", on_change=apply_preset,
                 help="Fills in the stages; change anything afterwards.")
    st.caption(cfgmod.PRESET_DESCRIPTIONS[st.session_state[f"{P}preset"]])
with top[1]:
    st.number_input("Stages", min_value=1, max_value=MAX_STAGES, step=1, key=f"{P}n_stages")
with top[2]:
    st.text_input("Run name", key=f"{P}name", placeholder="automatic")
n_stages = int(st.session_state[f"{P}n_stages"])

st.subheader("Stages")
st.caption("Tick the layer groups that train in each stage; the rest stay frozen. Groups run "
           "from the input (conv1) to the new classification head (fc).")
head = st.columns([1.1] + [1] * len(LAYER_GROUPS) + [1.2, 2.6, 1.6])
for col, text in zip(head, ["", *LAYER_GROUPS, "Epochs", "Learning rate", "Schedule"]):
    col.markdown(f"**{text}**" if text else "")
for i in range(n_stages):
    row = st.columns([1.1] + [1] * len(LAYER_GROUPS) + [1.2, 2.6, 1.6], vertical_alignment="center")
    row[0].markdown(f"**Stage {i + 1}**")
    for j, g in enumerate(LAYER_GROUPS):
        row[1 + j].toggle(g, key=f"{P}s{i}.g.{g}", label_visibility="collapsed",
                          help=f"Train {g} in stage {i + 1}")
    k = 1 + len(LAYER_GROUPS)
    row[k].number_input("Epochs", min_value=1, max_value=1000, step=1, key=f"{P}s{i}.epochs",
                        label_visibility="collapsed")
    row[k + 1].select_slider("Learning rate", options=LR_CHOICES, key=f"{P}s{i}.lr",
                             format_func=lambda v: f"{v:g}", label_visibility="collapsed")
    row[k + 2].selectbox("Schedule", cfgmod.SCHEDULES, key=f"{P}s{i}.schedule",
                         format_func=SCHEDULE_LABELS.get, label_visibility="collapsed")

path_errors: list[str] = []
with st.expander("Advanced: optimizer, data, weights, device"):
    st.markdown("**Per stage**")
    for i in range(n_stages):
        c = st.columns([0.8, 1, 1, 1, 1, 1.2, 1], vertical_alignment="bottom")
        c[0].markdown(f"Stage {i + 1}")
        c[1].selectbox("Optimizer", cfgmod.OPTIMIZERS, key=f"{P}s{i}.optimizer",
                       format_func={"sgd": "SGD + momentum", "adamw": "AdamW"}.get)
        c[2].number_input("Weight decay", min_value=0.0, max_value=1.0, step=1e-4, format="%.5f",
                          key=f"{P}s{i}.weight_decay")
        c[3].number_input("Warm-up (epochs)", min_value=0.0, max_value=100.0, step=0.5,
                          key=f"{P}s{i}.warmup")
        c[4].selectbox("Frozen BatchNorm", cfgmod.BN_POLICIES, key=f"{P}s{i}.bn",
                       format_func={"eval": "eval (fixed stats)", "train": "train (stats drift)"}.get,
                       help="What BatchNorm layers in frozen groups do. 'eval' keeps their "
                            "running statistics fixed; with 'train' they keep updating even "
                            "though their weights are frozen.")
        c[5].slider("Per-group LR multiplier", min_value=0.1, max_value=1.0, step=0.05,
                    key=f"{P}s{i}.mult", help="Each group one step further from the head "
                    "trains at lr × this. 1 = one learning rate for all.")
        c[6].checkbox("Feature cache", key=f"{P}s{i}.feature_cache",
                      help="Compute the frozen layers' outputs once and train on them: much "
                           "faster when only the last groups train; no augmentation then.")

    st.markdown("**Data**")
    d = st.columns([1.3, 2])
    d[0].radio("Data source", cfgmod.DATA_SOURCES, key=f"{P}data_source",
               format_func=DATA_LABELS.get, horizontal=True)
    source = st.session_state[f"{P}data_source"]
    d[1].text_input("Data folder" if source == "folder" else "CIFAR-10 folder (blank = default)",
                    key=f"{P}data_path",
                    placeholder="folder with train/ and test/ class folders" if source == "folder"
                    else "where CIFAR-10 is (or will be downloaded)")
    data_path_text = st.session_state[f"{P}data_path"].strip()
    data_path = ""
    if data_path_text:
        try:
            data_path = str(resolve_user_path(data_path_text))
        except PathNotAllowed as exc:
            path_errors.append(f"data folder: {exc}")
    folder_classes: list[str] = []
    folder_counts: dict[str, int] = {}
    folder_split = False
    if source == "folder" and data_path:
        folder_classes, folder_counts, folder_split, scan_error = scan_image_folder(data_path)
        if scan_error:
            path_errors.append(f"data folder: {scan_error}")
        else:
            st.caption(f"{len(folder_classes)} classes, {sum(folder_counts.values())} "
                       f"{'training ' if folder_split else ''}images"
                       f"{'' if folder_split else ' (a test split is held out)'}.")
    class_options = list(CIFAR10_CLASSES) if source == "cifar10" else folder_classes
    st.session_state[f"{P}classes"] = [c for c in st.session_state[f"{P}classes"] if c in class_options]
    st.multiselect("Classes (none = all)", class_options, key=f"{P}classes",
                   placeholder="all classes" if class_options else "enter a data folder first")
    d2 = st.columns(4)
    d2[0].slider("Validation fraction", min_value=0.05, max_value=0.5, step=0.05,
                 key=f"{P}val_fraction", help="Share of the training images held out to pick "
                 "the best epoch. The test set is used once, at the end.")
    d2[1].number_input("Training-image cap (0 = all)", min_value=0, step=100,
                       key=f"{P}max_train_images", help="Train on a stratified sample: quick demos.")
    d2[2].select_slider("Batch size", options=[8, 16, 32, 64, 128, 256, 512], key=f"{P}batch_size")
    d2[3].number_input("Resolution (pixels)", min_value=cfgmod.MIN_RESOLUTION,
                       max_value=cfgmod.MAX_RESOLUTION, step=16, key=f"{P}resolution")
    d3 = st.columns(4)
    d3[0].checkbox("Augmentation (crop + flip)", key=f"{P}augment")
    d3[1].number_input("Seed", min_value=0, step=1, key=f"{P}seed")

    st.markdown("**Starting weights and device**")
    w = st.columns([2, 2])
    w[0].radio("Starting weights", cfgmod.WEIGHT_SOURCES, key=f"{P}weights",
               format_func=WEIGHT_LABELS.get, horizontal=True)
    weights = st.session_state[f"{P}weights"]
    weights_path = ""
    if weights == "file":
        w[1].text_input("Weights file (.pth)", key=f"{P}weights_path")
        text = st.session_state[f"{P}weights_path"].strip()
        if text:
            try:
                weights_path = str(resolve_user_path(text))
            except PathNotAllowed as exc:
                path_errors.append(f"weights file: {exc}")
    elif weights == "run":
        donors = [r for r in store.list_runs(statuses=("finished",)) if r.best_checkpoint]
        donor_ids = [r.id for r in donors]
        if st.session_state[f"{P}weights_run"] not in donor_ids:
            st.session_state[f"{P}weights_run"] = donor_ids[0] if donor_ids else None
        w[1].selectbox("Start from run", donor_ids, key=f"{P}weights_run",
                       format_func=lambda i: run_label(next(r for r in donors if r.id == i)),
                       placeholder="no finished runs yet")
    d3[2].selectbox("Device", cfgmod.DEVICES, key=f"{P}device", format_func=DEVICE_LABELS.get)

# ---------------------------------------------------------------- config, checks, summary

s = st.session_state
cfg = RunConfig(
    stages=tuple(read_stage(i) for i in range(n_stages)), data_source=source,
    data_path=data_path, classes=tuple(s[f"{P}classes"]),
    val_fraction=float(s[f"{P}val_fraction"]), max_train_images=int(s[f"{P}max_train_images"]),
    resolution=int(s[f"{P}resolution"]), batch_size=int(s[f"{P}batch_size"]),
    augment=bool(s[f"{P}augment"]), seed=int(s[f"{P}seed"]), weights=weights,
    weights_path=weights_path, weights_run=(s[f"{P}weights_run"] or "") if weights == "run" else "",
    device=s[f"{P}device"])
errors = path_errors + [e for e in cfgmod.validate(cfg)
                        if not (path_errors and e.startswith(("data_path", "weights_path")))]

st.subheader("Summary")
n_classes = len(cfg.classes) or (len(folder_classes) if source == "folder" else 10) or 10
if source == "cifar10":
    n_train_all = CIFAR10_TRAIN_IMAGES_PER_CLASS * n_classes
else:
    counts = [folder_counts[c] for c in (cfg.classes or folder_classes) if c in folder_counts]
    n_train_all = int(sum(counts) * (1 if folder_split else 1 - cfg.test_fraction))
if cfg.max_train_images:
    n_train_all = min(n_train_all, cfg.max_train_images)
n_train = int(n_train_all * (1 - cfg.val_fraction))

counts_per_stage = trainable_counts([st_.groups for st_ in cfg.stages], n_classes)
summary_rows = []
for i, (stage, (trainable, total)) in enumerate(zip(cfg.stages, counts_per_stage), 1):
    # Measured speeds from earlier runs on the same kind of device count; "auto" uses any.
    est = (epoch_seconds(tuple(stage.groups), n_train, cfg.resolution, stage.feature_cache,
                         None if cfg.device == "auto" else cfg.device, str(store.root))
           if n_train and stage.groups else None)
    summary_rows.append({
        "Stage": f"Stage {i}", "Trains": stage.trains or "nothing",
        "Trainable parameters": f"{fmt_count(trainable)} ({100 * trainable / total:.1f} %)",
        "Epochs": stage.epochs, "Learning rate": f"{stage.lr:g}",
        "Est. time per epoch": fmt_duration(est) if est is not None else "—",
        "Est. stage time": fmt_duration(est * stage.epochs) if est is not None else "—",
    })
st.dataframe(summary_rows, hide_index=True, key=f"{P}summary")
st.caption(f"Estimated on this machine for about {n_train:,} training images"
           f"{'' if n_train else ' (enter a data folder to estimate)'} at {cfg.resolution} px; "
           f"{n_classes} classes. The first run of a data set also decodes and caches the images.")

if weights == "imagenet" and not imagenet_weights_cached():
    st.info("The ImageNet weights are not on this machine yet: they will be downloaded "
            "(45 MB) when the run starts. Offline? Under **Advanced**, pick *Random*, a "
            "*Weights file*, or *Another run's best checkpoint*.")
if source == "cifar10" and not data_path:
    st.caption("CIFAR-10 is downloaded (170 MB) on first use if it is not in the default folder.")

for e in errors:
    st.error(e)

repeat_cols = st.columns([1, 1, 3], vertical_alignment="bottom")
repeats = repeat_cols[0].number_input("Repeat with N seeds", min_value=1, max_value=10, step=1,
                                      key=f"{P}repeats",
                                      help="Queue N runs with seeds seed, seed+1, ... as one "
                                           "group: Compare draws them as mean ± std.")
label = "Start" if repeats == 1 else f"Start {repeats} runs"
if repeat_cols[1].button(label, type="primary", disabled=bool(errors), key=f"{P}start"):
    name = s[f"{P}name"].strip() or f"{s[f'{P}preset']} {time.strftime('%m-%d %H:%M:%S')}"
    try:
        if repeats == 1:
            run = jobs.submit(store, cfg, name=name)
        else:
            seeds = [cfg.seed + k for k in range(int(repeats))]
            run = jobs.submit_seeds(store, cfg, seeds, name=name, group=name)[0]
    except (cfgmod.ConfigError, StoreError, OSError) as exc:
        st.error(f"Could not start the run: {exc}")
    else:
        st.session_state[SELECTED_RUN] = run.id
        st.switch_page("app_pages/runs.py")
if errors:
    repeat_cols[2].caption("Fix the problems above to start.")
with st.expander("Config as JSON"):
    st.code(cfgmod.to_json(cfg), language="json")
