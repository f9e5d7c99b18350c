"""Experiments: test a recipe claim in one click (recipes x seeds, mean ± std, Welch 95 %
interval, a verdict in plain words). Looking inside one run is the Run insights page.

Thin page: form widgets -> core.analysis.experiments (recipes, validation, submit,
statistics) -> render the table, the verdicts and the seed chart.
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import (
    HANDED_DATA_PATH,
    INSIGHTS_PAGE,
    access,
    epoch_estimate,
    found_datasets,
    get_store,
    page_link,
    scan_image_folder,
)
from app_pages._forms import keep_form, restore_form
from app_pages._pickers import weights_file_picker
from core import config as cfgmod
from core.analysis import experiments as ex
from core.analysis import planning
from core.engine.paths import PathNotAllowed, resolve_user_path
from core.runs.entities import TRAINING_KINDS
from core.runs.store import Run, RunStore
from core.views import charts
from core.views.tables import recipe_results_table
from core.views.text import md

P = "experiments."
# Keys bound to URL query parameters (so they are short words, not "experiments.*").
SELECTED, TAB = "experiment", "tab"
SUBMITTED = P + "submitted"  # the form fingerprint last queued
OPEN_RESULTS = P + "open_results"  # set by a submit: open the Results tab (before st.tabs)
NEW_TAB, RESULTS_TAB = "Compare recipes", "Results"
REFRESH_S = 3  # seconds between result refreshes while an experiment's runs are active
CIFAR = "CIFAR-10 (torchvision)"
OTHER = "Another folder…"
# Every key of the form with its first-visit value (the data set's: the first listed); the
# form keeps its values for the session (app_pages._forms).
FORM = {P + "presets": ["Two-stage", "All at once"], P + "saved": [], P + "seeds": ex.DEFAULT_SEEDS,
        P + "data": None, P + "path": "", P + "epochs": ex.DEFAULT_EPOCHS_PER_STAGE,
        P + "lr": cfgmod.PRESET_LR, P + "cap": ex.DEFAULT_IMAGE_CAP, P + "weights": "imagenet",
        P + "weights_path": "", P + "weights_run": None, P + "device": cfgmod.DEVICES[0],
        P + "name": "", P + "online": False}


# ---------------------------------------------------------------- compare recipes


def data_fields(store: RunStore) -> tuple[dict, list[str]]:
    """Data widgets shared by every preset recipe -> (RunConfig fields, problems)."""
    found = {f"{d.name}  ({d.path})": str(d.path) for d in found_datasets()}
    options = list(found) + [OTHER, CIFAR]
    handed = st.session_state.get(HANDED_DATA_PATH)
    if handed and st.session_state[P + "data"] is None:  # the form's first visit
        label = next((k for k, v in found.items() if v == handed), None)
        st.session_state[P + "data"] = label or OTHER
        st.session_state[P + "path"] = handed
    if st.session_state.get(P + "data") not in options:  # first visit, or the set is gone
        st.session_state[P + "data"] = options[0]
    choice = st.selectbox("Data set", options, key=P + "data",
                          help="Image folders under the data folders are listed; add one on "
                               "the Datasets page.")
    problems: list[str] = []
    if choice == CIFAR:
        return {"data_source": "cifar10", "data_path": ""}, problems
    path = found.get(choice, "")
    if choice == OTHER:
        text = st.text_input("Data folder", key=P + "path",
                             placeholder="folder with one sub-folder of images per class")
        if not text.strip():
            problems.append("data: type a data folder or pick a data set")
        else:
            try:
                path = str(resolve_user_path(text))
            except PathNotAllowed as exc:
                problems.append(f"data: {exc}")
    return {"data_source": "folder", "data_path": path}, problems


def compare_form(store: RunStore, all_runs: list[Run]) -> None:
    st.markdown("Pick two or more recipes and a number of seeds. Every recipe runs once per "
                "seed on the same data; when they finish you get each recipe's mean ± spread "
                "and whether the difference is bigger than seed-to-seed luck.")
    c = st.columns([3, 3])
    presets = c[0].multiselect("Presets", cfgmod.PRESETS, key=P + "presets")
    for name in presets:
        c[0].caption(f"**{name}**: {cfgmod.PRESET_DESCRIPTIONS[name]}")
    saved = [r for r in all_runs if r.status == "finished"]
    by_id = {r.id: r for r in saved}
    st.session_state[P + "saved"] = [i for i in st.session_state[P + "saved"] if i in by_id]
    saved_ids = c[1].multiselect(
        "Configs of earlier runs (used as they were, seed aside)", list(by_id), key=P + "saved",
        format_func=lambda i: f"{by_id[i].name} ({i})",
        placeholder="no finished runs yet" if not saved else "optional")
    seeds_n = c[1].number_input("Seeds per recipe", min_value=1, max_value=ex.MAX_SEEDS,
                                key=P + "seeds", help="Runs use seeds 0, 1, … 5 seeds give a "
                                "useful interval; 1 seed gives no interval at all.")

    st.markdown("**Settings shared by the presets**")
    fields, problems = data_fields(store)
    s = st.columns(5)
    epochs = s[0].number_input("Epochs per stage", 1, 100, key=P + "epochs",
                               help="One-stage presets train for twice this, so every recipe "
                                    "gets the same number of epochs.")
    lr = s[1].select_slider("Learning rate", cfgmod.LR_GRID, format_func=lambda v: f"{v:g}", key=P + "lr",
                            help="The preset's learning rate; each stage scales it as the preset says.")
    cap = s[2].number_input("Training images cap (0 = all)", 0, 1_000_000, step=500,
                            key=P + "cap",
                            help="Fewer images train faster, but too few (or too few epochs) "
                                 "leave recipes near chance and the answer buried in noise.")
    weight_fields = weights_choice(s[3], store, all_runs, problems)
    device = s[4].selectbox("Device", cfgmod.DEVICES, key=P + "device")
    name = st.text_input("Experiment name (optional)", key=P + "name", max_chars=cfgmod.NAME_MAX_CHARS,
                         placeholder="e.g. does two-stage beat all at once on my photos?")

    base = cfgmod.RunConfig(max_train_images=int(cap), device=device, **weight_fields, **fields)
    recipes = ex.preset_recipes(presets, int(epochs), float(lr), base)
    saved_recipes, saved_problems = ex.saved_run_recipes([by_id[i] for i in saved_ids],
                                                         taken=[n for n, _ in recipes])
    estimate_caption(store, recipes + saved_recipes, int(seeds_n))
    all_recipes = recipes + saved_recipes
    problems = problems + saved_problems
    problems += ex.validate_experiment(all_recipes, list(range(int(seeds_n)))) if not problems else []
    ready = not problems and queue_checks(store, [c for _, c in all_recipes], P + "online")
    submit(store, all_recipes, list(range(int(seeds_n))), name, problems, ready)


def form_fingerprint(recipes: list[tuple[str, cfgmod.RunConfig]], seeds: list[int],
                     name: str) -> str:
    """What the form would queue, as text: the button stays disabled while it equals what
    was just queued, so a second click cannot queue a duplicate experiment."""
    return repr((name.strip(), seeds, [(n, cfgmod.to_json(c)) for n, c in recipes]))


def weights_choice(where, store: RunStore, all_runs: list[Run], problems: list[str]) -> dict:
    """Every starting-weights choice of a run (the config schema's), with the file path or
    donor run it needs -> RunConfig fields."""
    spec = cfgmod.field_spec(cfgmod.RunConfig, "weights")
    weights = where.selectbox(spec.label, spec.choices, key=P + "weights",
                              format_func=spec.choice_label,
                              help="ImageNet weights are the normal choice; offline machines "
                                   "without them cached can use random, a weights file or "
                                   "another run's best checkpoint.")
    if weights == "file":
        picked = weights_file_picker(st, P + "weights_path",
                                     cfgmod.field_spec(cfgmod.RunConfig, "weights_path").label)
        try:
            path = str(resolve_user_path(picked)) if picked else ""
        except PathNotAllowed as exc:
            problems.append(f"weights file: {exc}")
            path = ""
        return {"weights": "file", "weights_path": path}
    if weights == "run":
        donors = {r.id: r for r in all_runs if r.status == "finished" and r.best_checkpoint}
        if st.session_state[P + "weights_run"] not in donors:
            st.session_state[P + "weights_run"] = next(iter(donors), None)
        donor = st.selectbox(cfgmod.field_spec(cfgmod.RunConfig, "weights_run").label,
                             list(donors), key=P + "weights_run",
                             format_func=lambda i: f"{donors[i].name} ({i})",
                             placeholder="no finished runs yet")
        return {"weights": "run", "weights_run": donor or ""}
    return {"weights": weights}


def estimate_caption(store: RunStore, recipes: list[tuple[str, cfgmod.RunConfig]],
                     n_seeds: int) -> None:
    from core.views.tables import fmt_duration

    if not recipes:
        return
    cfg = recipes[0][1]
    scan = scan_image_folder(cfg.data_path) if cfg.data_source == "folder" and cfg.data_path else None
    seconds = ex.estimated_seconds(recipes, n_seeds, scan,
                                   lambda *shape: epoch_estimate(*shape, str(store.root)).seconds)
    st.caption("Estimated time on this machine: "
               + (f"about {fmt_duration(seconds)} for all runs." if seconds is not None
                  else "known once the data set is chosen."))


@st.cache_data(ttl=15, show_spinner="Checking the data and starting weights…")
def preflight_of(cfg_json: str, store_root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(problems, notes) of New run's preflight (core.runs.preflight: data, weights, disk,
    memory) for one config; cached 15 s as it lists the data folder."""
    from core.runs.preflight import preflight

    try:
        report = preflight(cfgmod.from_json(cfg_json), RunStore(store_root))
    except cfgmod.ConfigError as exc:
        return tuple(exc.errors), ()
    return (), tuple(report.notes)


DOWNLOADS = {"imagenet": "the ImageNet weights (45 MB)", "cifar10": "CIFAR-10 (170 MB)"}


def queue_checks(store: RunStore, configs: list[cfgmod.RunConfig], online_key: str) -> bool:
    """New run's checks before anything is queued, for every config the experiment would
    run: the preflight's problems (shown; they block), its notes, and what the runs would
    download when they start, which fails offline (blocks until the user says the machine
    is online). True when the runs can be queued."""
    problems: list[str] = []
    notes: list[str] = []
    needed: list[str] = []
    for cfg in configs:
        found, said = preflight_of(cfgmod.to_json(cfg), str(store.root))
        problems += [p for p in found if p not in problems]
        notes += [n for n in said if n not in notes]
        needed += [d for d in planning.needs_download(cfg) if d not in needed]
    for p in problems:
        st.error(p)
    for n in notes:
        if not ("imagenet" in needed and n.startswith("ImageNet weights")):  # said below
            st.caption(n)
    if needed:
        what = " and ".join(DOWNLOADS[d] for d in needed)
        st.warning(f"Every run would download {what} when it starts, which fails without "
                   f"internet, so offline each run would fail within seconds. Offline? "
                   + ("Pick a *Weights file* or *Another run's best checkpoint* under "
                      "**Starting weights** (or *Random*, best with *All at once*). "
                      if "imagenet" in needed else "")
                   + ("Pick an image folder as the **Data set** (add one on Datasets). "
                      if "cifar10" in needed else ""),
                   icon=":material/cloud_off:")
        online = st.checkbox("This machine is online: download when the first run starts",
                             key=online_key)
        return not problems and online
    return not problems


def submit(store: RunStore, recipes: list[tuple[str, cfgmod.RunConfig]], seeds: list[int],
           name: str, problems: list[str], ready: bool) -> None:
    """What the experiment queues, the button that queues it (enabled when `ready`: the
    checks passed), and every problem in the way."""
    n_runs = len(recipes) * len(seeds)
    st.caption(f"This queues {n_runs} run{'s' * (n_runs != 1)} ({len(recipes)} recipes × "
               f"{len(seeds)} seeds); they run one after another in the background.")
    fingerprint = form_fingerprint(recipes, seeds, name)
    last = st.session_state.get(SUBMITTED)  # (fingerprint, experiment name, runs) or None
    queued = last is not None and last[0] == fingerprint
    if st.button("Run the experiment", type="primary", key=P + "submit",
                 disabled=bool(problems) or not ready or queued,
                 help="Queued: change the form to queue another." if queued else None):
        try:
            exp = ex.submit_experiment(store, recipes, seeds, name=name,
                                       started_by=access().started_by)
        except cfgmod.ConfigError as exc:
            problems = exc.errors
        else:
            st.session_state[SUBMITTED] = (fingerprint, exp.name, n_runs)
            st.session_state[SELECTED] = exp.id
            st.session_state[OPEN_RESULTS] = True  # the next run opens the Results tab
            st.rerun()
    if queued:
        st.success(f"Queued {last[2]} runs as experiment **{md(last[1])}**. Its results are on "
                   f"the **Results** tab (open now) as runs finish. Change the form to queue "
                   f"another experiment.")
    for p in problems:
        st.warning(p)


# ---------------------------------------------------------------- experiment results


def show_results(exp_id: str) -> None:
    store = get_store()
    try:
        exp = ex.load_experiment(store, exp_id)
    except ex.ExperimentError as exc:
        st.warning(str(exc))
        return
    res = ex.experiment_results(store, exp)
    st.progress(res.finished / max(1, res.total),
                text=f"{res.finished} of {res.total} runs finished"
                     + (f", {res.active} queued or running" if res.active else ""))
    st.dataframe(recipe_results_table(res), hide_index=True, width="stretch")
    failure_reasons(res)
    val = [c for c in res.comparisons if c.metric == "val"]
    test = [c for c in res.comparisons if c.metric == "test"]
    if not val:
        st.info("The verdict appears when each recipe has a finished run.")
    missing = ex.missing_runs(res)
    if missing and not res.active:
        st.warning(f"{len(missing)} run{'s' * (len(missing) != 1)} of this experiment did not "
                   f"finish (cancelled or failed), so its verdict is missing or rests on fewer "
                   f"seeds than planned.")
        ready = queue_checks(store, [recipe.config for recipe, _ in missing],
                             P + f"rerun_online.{exp.id}")
        if st.button(f"Re-run the {len(missing)} missing run{'s' * (len(missing) != 1)}",
                     key=P + f"rerun.{exp.id}", type="primary", disabled=not ready):
            try:
                ex.rerun_missing(store, res)
            except cfgmod.ConfigError as exc:
                for e in exc.errors:
                    st.error(e)
            else:
                st.rerun()
    for c in val:
        (st.success if c.difference.excludes_zero else st.info)(c.text)
    if test:
        with st.expander("On the test set (touched once per run, at the end)"):
            for c in test:
                st.markdown(f"- {c.text}")
    if any(r.val for r in res.recipes):
        st.plotly_chart(charts.seed_box_figure([(r.recipe.name, r.val) for r in res.recipes]),
                        key=P + f"fig.{exp.id}")
    st.caption("± after a mean is the spread across seeds (sample standard deviation); ± in "
               "a verdict is half the 95 % confidence interval of the difference (Welch's t).")


def failure_reasons(res: ex.ExperimentResults) -> None:
    """Why runs failed, under the table where their results would be: one message per
    reason, naming the runs it stopped (seed by seed, recipe by recipe)."""
    by_reason: dict[str, list[str]] = {}
    for rr in res.recipes:
        for run in rr.runs:
            if run.status == "failed":
                reason = run.error or "no reason was recorded; see the run's log on Runs"
                by_reason.setdefault(reason, []).append(f"{rr.recipe.name} seed {run.config.seed}")
    for reason, where in by_reason.items():
        st.error(f"Failed ({md(', '.join(where))}): {md(reason)}", icon=":material/error:")


def notes_and_tags(store: RunStore, exp: ex.Experiment, all_tags: list[str]) -> None:
    """Edit the experiment's note and tags (the picker above filters by tag)."""
    with st.expander("Note and tags" + (f": {', '.join(md(t) for t in exp.tags)}" if exp.tags else ""),
                     expanded=bool(exp.note)):
        with st.form(P + f"annotate.{exp.id}", border=False):
            note = st.text_area("Note", value=exp.note, key=P + f"note.{exp.id}",
                                max_chars=cfgmod.NOTE_MAX_CHARS,
                                placeholder="the question, what you concluded", height=80)
            tags = st.multiselect("Tags", sorted(set(all_tags) | set(exp.tags)),
                                  default=list(exp.tags), key=P + f"tags.{exp.id}",
                                  accept_new_options=True, placeholder="type a tag, press Enter")
            if st.form_submit_button("Save note and tags"):
                try:
                    ex.annotate_experiment(store, exp.id, note, tags)
                except (ex.ExperimentError, OSError) as exc:
                    st.error(f"Could not save: {exc}")
                else:
                    st.toast("Saved.", icon=":material/check:")
                    st.rerun()


COMPARE_PAGE = "app_pages/compare.py"


def open_in_compare(store: RunStore, exp: ex.Experiment) -> None:
    """Compare with the experiment's recipes as groups of seeds (mean ± std curves, the
    config diff), in the URL too (?group=...), so the link can be shared."""
    groups = [r.group for r in exp.recipes if store.list_runs(group=r.group)]
    if st.button("Open in Compare", key=P + "compare", disabled=len(groups) < 1,
                 icon=":material/compare_arrows:",
                 help="Each recipe's runs as one group: their curves as mean ± std, and how "
                      "the configs differ."):
        st.session_state["compare.runs"] = []  # Compare's pickers: the groups, no single runs
        st.session_state["compare.groups"] = groups
        st.switch_page(COMPARE_PAGE, query_params={"group": groups})


def results_section(store: RunStore) -> None:
    exps = ex.list_experiments(store)
    if not exps:
        st.info("No experiments yet. Pick recipes above and press **Run the experiment**.")
        return
    tags = ex.experiment_tags(exps)
    if tags:
        tag = st.columns([1, 2])[0].selectbox(
            "Only experiments tagged", [None, *tags], key=P + "tag",
            format_func=lambda t: "any tag" if t is None else t)
        if tag:
            exps = [e for e in exps if tag in e.tags]
    by_id = {e.id: e for e in exps}
    if st.session_state.get(SELECTED) not in by_id:
        linked = st.query_params.get(SELECTED)
        st.session_state[SELECTED] = linked if linked in by_id else exps[0].id
    exp_id = st.selectbox("Experiment", list(by_id), key=SELECTED,
                          format_func=lambda i: f"{by_id[i].name} — {len(by_id[i].recipes)} "
                                                f"recipes × {len(by_id[i].seeds)} seeds ({i})")
    # In the URL (?experiment=id), always (a bound widget drops its default value from the
    # URL, and the default changes when a newer experiment is queued).
    st.query_params[SELECTED] = exp_id
    notes_and_tags(store, by_id[exp_id], tags)
    active = ex.experiment_results(store, by_id[exp_id]).active > 0
    # While runs are active the results refresh themselves, without rerunning the page.
    st.fragment(run_every=REFRESH_S if active else None)(show_results)(exp_id)
    open_in_compare(store, by_id[exp_id])
    if st.button("Forget this experiment (its runs stay)", key=P + "forget"):
        ex.delete_experiment(store, exp_id)
        st.session_state.pop(SELECTED, None)
        st.rerun()


# ---------------------------------------------------------------- page

st.title("Experiments")
store = get_store()
# Bound to the URL (?tab=Results) and to session state, so submitting can open Results
# (a widget's state is set before the widget is drawn, hence the flag).
if st.session_state.pop(OPEN_RESULTS, False):
    st.session_state[TAB] = RESULTS_TAB
tab_new, tab_results = st.tabs([NEW_TAB, RESULTS_TAB], key=TAB, bind="query-params")
restore_form("experiments", FORM)
with tab_new:
    compare_form(store, store.list_runs(kinds=TRAINING_KINDS))
keep_form("experiments", FORM)
with tab_results:
    results_section(store)
page_link(INSIGHTS_PAGE, "Look inside one run: Run insights", ":material/insights:", "Run insights")
