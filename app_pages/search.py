"""Search: find the staged recipe (Optuna over stages, layer groups, learning rates, epochs,
schedule, BatchNorm policy), watch it live, and confirm the winner with an experiment.

Thin page: form widgets -> core.analysis.search (space, spec, create, stop, confirm) ->
core.views.search_charts (table, best so far, parallel coordinates, importances).
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import RUNS_PAGE, found_datasets, get_store, open_run
from core import config as cfgmod
from core.analysis import search as searchmod
from core.engine.paths import PathNotAllowed, resolve_user_path
from core.runs import search_driver
from core.runs.store import RunStore
from core.views import search_charts

P = "search."
SELECTED = "search"  # bound to the URL (?search=id)
CONFIRMED = P + "confirmed"  # (search id, experiment id, runs queued) of the last Confirm
REFRESH_S = 3  # seconds between refreshes of a running search's view
EXPERIMENTS_PAGE = "app_pages/experiments.py"
OTHER = "Another folder…"
CIFAR = "CIFAR-10 (torchvision)"


# ---------------------------------------------------------------- the form


def data_and_weights() -> tuple[cfgmod.RunConfig, list[str]]:
    """The run-level fields every trial shares -> (base config, problems)."""
    problems: list[str] = []
    found = {f"{d.name}  ({d.path})": str(d.path) for d in found_datasets()}
    c = st.columns([3, 2, 1, 1, 1])
    choice = c[0].selectbox("Data set", [*found, OTHER, CIFAR], key=P + "data",
                            help="Image folders under the data folders are listed; add one "
                                 "on the Datasets page.")
    fields: dict = {"data_source": "cifar10", "data_path": ""}
    if choice != CIFAR:
        path = found.get(choice, "")
        if choice == OTHER:
            text = c[0].text_input("Data folder", key=P + "path")
            try:
                path = str(resolve_user_path(text)) if text.strip() else ""
            except PathNotAllowed as exc:
                problems.append(f"data: {exc}")
            if not text.strip():
                problems.append("data: type a data folder or pick a data set")
        fields = {"data_source": "folder", "data_path": path}
    weights = cfgmod.field_spec(cfgmod.RunConfig, "weights")
    choices = [w for w in weights.choices if w in ("imagenet", "random", "file")]
    fields["weights"] = c[1].selectbox(weights.label, choices, key=P + "weights",
                                       format_func=weights.choice_label)
    if fields["weights"] == "file":
        text = c[1].text_input(cfgmod.field_spec(cfgmod.RunConfig, "weights_path").label,
                               key=P + "weights_path")
        try:
            fields["weights_path"] = str(resolve_user_path(text)) if text.strip() else ""
        except PathNotAllowed as exc:
            problems.append(f"weights file: {exc}")
    cap = cfgmod.field_spec(cfgmod.RunConfig, "max_train_images")
    fields["max_train_images"] = int(c[2].number_input(cap.label, 0, 10_000_000, 2000, step=500,
                                                       key=P + "cap", help=cap.help))
    res = cfgmod.field_spec(cfgmod.RunConfig, "resolution")
    fields["resolution"] = int(c[3].number_input(res.label, res.low, res.high, 32,
                                                 step=res.step, key=P + "res"))
    dev = cfgmod.field_spec(cfgmod.RunConfig, "device")
    fields["device"] = c[4].selectbox(dev.label, dev.choices, key=P + "device",
                                      format_func=dev.choice_label)
    return cfgmod.RunConfig(**fields), problems


def space_form() -> searchmod.SearchSpace:
    """One widget per dimension, from its FieldSpec: a range slider (a range of one value
    fixes it) or a multiselect of choices (one choice fixes it)."""
    space = searchmod.SearchSpace()
    cols = st.columns(2)
    for i, dim in enumerate(searchmod.DIMENSIONS):
        where = cols[i % 2]
        spec = dim.spec
        default = space.of(dim.name)
        label = spec.label + (" (each stage)" if dim.per_stage else "")
        if dim.kind == "choice":
            picked = where.multiselect(label, list(dim.bounds), default=list(default),
                                       key=P + "dim." + dim.name,
                                       format_func=spec.choice_label, help=spec.help or None)
            space = space.with_range(dim.name, tuple(picked))
        elif dim.kind == "log":
            grid = list(spec.suggested)
            low, high = where.select_slider(label, grid, value=default,
                                            key=P + "dim." + dim.name,
                                            format_func=lambda v: f"{v:g}",
                                            help="searched on a log scale")
            space = space.with_range(dim.name, (low, high))
        elif dim.name == "groups":
            low, high = where.select_slider(label, list(range(1, 7)), value=default,
                                            key=P + "dim." + dim.name,
                                            format_func=searchmod.group_range, help=spec.help)
            space = space.with_range(dim.name, (low, high))
        else:
            top = min(spec.high, 20) if dim.name == "epochs" else spec.high
            kind = int if dim.kind == "int" else float
            low, high = where.slider(label, kind(spec.low), kind(top), tuple(map(kind, default)),
                                     step=kind(spec.step or 1), key=P + "dim." + dim.name,
                                     help=spec.help or None)
            space = space.with_range(dim.name, (low, high))
    return space


def new_search(store: RunStore) -> None:
    st.markdown("Give the data and a budget; the search tries staged recipes, stops the "
                "hopeless ones early, and recommends one. Every trial is an ordinary run.")
    base, problems = data_and_weights()
    c = st.columns([1, 1, 3])
    trials = int(c[0].number_input("Trials", 1, 1000, 12, key=P + "trials",
                                   help="how many recipes to try"))
    minutes = float(c[1].number_input("Time limit (minutes, 0 = none)", 0.0, 10080.0, 0.0,
                                      step=10.0, key=P + "minutes",
                                      help="no new trial starts after this"))
    name = c[2].text_input("Search name (optional)", key=P + "name")
    with st.expander("Search space: fix a dimension or narrow its range"):
        space = space_form()
    spec = searchmod.SearchSpec(name=name, base=base, space=space, trials=trials,
                                minutes=minutes or None)
    problems += searchmod.validate_spec(spec)
    if st.button("Start the search", type="primary", key=P + "start", disabled=bool(problems)):
        try:
            sid = searchmod.create_search(store, spec)
        except cfgmod.ConfigError as exc:
            problems = exc.errors
        else:
            st.session_state[SELECTED] = sid
            st.rerun()
    for p in problems:
        st.warning(p)


# ---------------------------------------------------------------- a search, live


def show_search(search_id: str, live: bool) -> None:
    """The search's live part (a fragment that refreshes itself while `live`)."""
    store = get_store()
    try:
        found = searchmod.summary(store, search_id)
    except searchmod.SearchError as exc:
        st.warning(str(exc))
        return
    if live and found.state != "running":
        st.rerun(scope="app")  # it ended: redraw the whole page (Stop goes, Confirm opens)
    status = found.to_status()
    done = status["finished"] + status["pruned"] + status["failed"] + status["stopped"]
    st.progress(min(1.0, done / max(1, found.spec.trials)),
                text=f"{found.state}: {done} of {found.spec.trials} trials done "
                     f"({status['finished']} finished, {status['pruned']} pruned, "
                     f"{status['failed']} failed, {status['running']} running)")
    m = st.columns(3)
    best = found.best
    m[0].metric("Best val accuracy", search_charts.fmt_pct(best.val_acc) if best else "—")
    m[1].metric("Trial-epochs run", f"{found.trial_epochs_run} of {found.trial_epochs_planned}",
                help="what pruning saved: epochs the trials ran, of those they would have "
                     "run without it")
    m[2].metric("Search", found.state)
    if not found.trials:
        st.info("The first trial is being set up; it appears here as a run once it is queued.")
        return
    st.dataframe(search_charts.trials_table(found), hide_index=True, width="stretch")
    if best is not None and best.config is not None:
        st.subheader("Recommended recipe")
        st.success(searchmod.describe_recipe(best.config))
        st.caption(f"Trial {best.number}, best validation accuracy "
                   f"{search_charts.fmt_pct(best.val_acc)}.")
    figure = search_charts.parcoords_figure(found)
    if figure is not None:
        st.plotly_chart(figure, key=P + "parcoords." + search_id)
    if found.best_so_far():
        st.plotly_chart(search_charts.best_so_far_figure(found), key=P + "best." + search_id)
    importance = search_charts.importance_figure(searchmod.importances(store, search_id))
    if importance is not None:
        st.plotly_chart(importance, key=P + "importance." + search_id)


def confirm_section(store: RunStore, found: searchmod.SearchSummary) -> None:
    st.subheader("Confirm, don't trust the winner")
    st.markdown("The recommended recipe won on validation accuracy among many tries, so its "
                "figure is optimistic: some of its lead is luck. **Confirm** runs it and a "
                "baseline again over fresh seeds and judges them on the test split, with a "
                "95 % interval, on the Experiments page.")
    c = st.columns([2, 1, 2])
    baseline = c[0].selectbox("Baseline", cfgmod.PRESETS,
                              index=cfgmod.PRESETS.index("Two-stage"), key=P + "baseline")
    n_seeds = int(c[1].number_input("Fresh seeds", 2, 20, len(searchmod.CONFIRM_SEEDS),
                                    key=P + "seeds"))
    if c[2].button("Confirm", type="primary", key=P + "confirm", disabled=found.best is None,
                   help=None if found.best else "available once a trial has finished"):
        seeds = [searchmod.CONFIRM_SEEDS[0] + i for i in range(n_seeds)]
        try:
            exp = searchmod.confirm(store, found.id, baseline, seeds)
        except (cfgmod.ConfigError, searchmod.SearchError) as exc:
            st.error(str(exc))
        else:
            st.session_state[CONFIRMED] = (found.id, exp.id, len(exp.recipes) * len(seeds))
    confirmed = st.session_state.get(CONFIRMED)
    if confirmed and confirmed[0] == found.id:
        st.success(f"Queued {confirmed[2]} runs as a confirming experiment; its verdict is on "
                   f"the Experiments page as they finish.")
        try:
            st.page_link(EXPERIMENTS_PAGE, label="Open the confirming experiment",
                         icon=":material/science:",
                         query_params={"experiment": confirmed[1], "tab": "Results"})
        except Exception:  # the page is served alone (page tests): no navigation
            st.markdown("Open **Experiments** in the navigation.")


def searches_section(store: RunStore) -> None:
    search_driver.ensure_drivers(store)  # after a restart nothing else drives them
    ids = searchmod.list_searches(store)
    if not ids:
        st.info("No searches yet. Fill in the form above and press **Start the search**.")
        return
    names = {i: searchmod.summary(store, i).spec.name for i in ids}
    if st.session_state.get(SELECTED) not in ids:
        linked = st.query_params.get(SELECTED)
        st.session_state[SELECTED] = linked if linked in ids else ids[0]
    sid = st.selectbox("Search", ids, key=SELECTED, format_func=lambda i: f"{names[i]} ({i})")
    st.query_params[SELECTED] = sid
    found = searchmod.summary(store, sid)
    running = found.state == "running"
    st.fragment(run_every=REFRESH_S if running else None)(show_search)(sid, running)
    c = st.columns([1, 1, 2])
    if running and c[0].button("Stop the search", key=P + "stop",
                               help="no new trial starts; running trials are cancelled"):
        searchmod.request_stop(store, sid)
        st.rerun()
    run_ids = [t.run_id for t in found.trials if t.run_id]
    if run_ids:
        picked = c[1].selectbox("Trial run", run_ids, key=P + "run", label_visibility="collapsed")
        if c[2].button("Open this trial's run", key=P + "open"):
            open_run(picked, RUNS_PAGE)
    confirm_section(store, found)


# ---------------------------------------------------------------- page

st.title("Search")
store = get_store()
with st.expander("New search", expanded=not searchmod.list_searches(store)):
    new_search(store)
searches_section(store)
