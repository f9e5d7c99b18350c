"""Experiments: test a recipe claim in one click (recipes x seeds, mean ± std, Welch 95 %
interval, a verdict in plain words) and look inside one run (what each stage added, which
layer groups moved, what it confuses, its most confident mistakes, export)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages._common import SELECTED_RUN, found_datasets, get_store
from core import config as cfgmod
from core.analysis import experiments as ex
from core.analysis import insights
from core.engine.paths import PathNotAllowed, resolve_user_path
from core.runs.store import Run, RunStore

P = "experiments."
REFRESH_S = 3  # seconds between result refreshes while an experiment's runs are active
DATA_KEY = "new_run_data_path"  # shared with the Datasets and New run pages
CIFAR = "CIFAR-10 (torchvision)"
OTHER = "Another folder…"
TOP_LOSSES = 12


def fmt_points(m: float, s: float) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


# ---------------------------------------------------------------- compare recipes


def data_fields(store: RunStore) -> tuple[dict, list[str]]:
    """Data widgets shared by every preset recipe -> (RunConfig fields, problems)."""
    found = {f"{d.name}  ({d.path})": str(d.path) for d in found_datasets()}
    options = list(found) + [OTHER, CIFAR]
    handed = st.session_state.get(DATA_KEY)
    if handed and P + "data" not in st.session_state:
        label = next((k for k, v in found.items() if v == handed), None)
        st.session_state[P + "data"] = label or OTHER
        st.session_state.setdefault(P + "path", handed)
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
    presets = c[0].multiselect("Presets", cfgmod.PRESETS, default=["Two-stage", "All at once"],
                               key=P + "presets")
    for name in presets:
        c[0].caption(f"**{name}**: {cfgmod.PRESET_DESCRIPTIONS[name]}")
    saved = [r for r in all_runs if r.status == "finished"]
    by_id = {r.id: r for r in saved}
    saved_ids = c[1].multiselect(
        "Configs of earlier runs (used as they were, seed aside)", list(by_id), key=P + "saved",
        format_func=lambda i: f"{by_id[i].name} ({i})",
        placeholder="no finished runs yet" if not saved else "optional")
    seeds_n = c[1].number_input("Seeds per recipe", min_value=1, max_value=ex.MAX_SEEDS, value=3,
                                key=P + "seeds", help="Runs use seeds 0, 1, … 5 seeds give a "
                                "useful interval; 1 seed gives no interval at all.")

    st.markdown("**Settings shared by the presets**")
    fields, problems = data_fields(store)
    s = st.columns(5)
    epochs = s[0].number_input("Epochs per stage", 1, 100, cfgmod.PRESET_EPOCHS, key=P + "epochs",
                               help="One-stage presets train for twice this, so every recipe "
                                    "gets the same number of epochs.")
    lr = s[1].select_slider("Learning rate", cfgmod.LR_GRID, value=cfgmod.PRESET_LR,
                            format_func=lambda v: f"{v:g}", key=P + "lr",
                            help="The first stage's; later stages scale it as the preset does.")
    cap = s[2].number_input("Training images cap (0 = all)", 0, 1_000_000, 2000, step=500,
                            key=P + "cap", help="Fewer images train faster; fine for a first look.")
    weights = s[3].selectbox("Starting weights", ("imagenet", "random"), key=P + "weights",
                             help="ImageNet weights are the normal choice; offline machines "
                                  "without them cached must use random.")
    device = s[4].selectbox("Device", cfgmod.DEVICES, key=P + "device")
    name = st.text_input("Experiment name (optional)", key=P + "name",
                         placeholder="e.g. does two-stage beat all at once on my photos?")

    base = cfgmod.RunConfig(max_train_images=int(cap), weights=weights, device=device, **fields)
    recipes = ex.preset_recipes(presets, int(epochs), float(lr), base)
    for i in saved_ids:
        try:
            label = f"config of {by_id[i].name}"
            if any(n == label for n, _ in recipes):  # two runs with one name
                label += f" ({i})"
            recipes.append((label, cfgmod.check(by_id[i].config)))
        except cfgmod.ConfigError as exc:
            problems.append(f"run {i}: its config can no longer be used ({exc})")
    seeds = list(range(int(seeds_n)))
    problems += ex.validate_experiment(recipes, seeds) if not problems else []
    n_runs = len(recipes) * len(seeds)
    st.caption(f"This queues {n_runs} run{'s' * (n_runs != 1)} ({len(recipes)} recipes × "
               f"{len(seeds)} seeds); they run one after another in the background.")
    if st.button("Run the experiment", type="primary", key=P + "submit",
                 disabled=bool(problems)):
        try:
            exp = ex.submit_experiment(store, recipes, seeds, name=name)
        except cfgmod.ConfigError as exc:
            problems = exc.errors
        else:
            st.session_state[P + "selected"] = exp.id
            st.success(f"Queued {n_runs} runs as experiment **{exp.name}**. Its results "
                       f"appear below as runs finish.")
    for p in problems:
        st.warning(p)


# ---------------------------------------------------------------- experiment results


def recipe_table(res: ex.ExperimentResults) -> pd.DataFrame:
    rows = []
    for r in res.recipes:
        vm, vs = r.stat("val")
        tm, ts = r.stat("test")
        rows.append({"recipe": r.recipe.name,
                     "finished": f"{r.n_done} of {len(r.runs)}",
                     "best val acc (%)": fmt_points(vm, vs),
                     "test acc (%)": fmt_points(tm, ts),
                     "val acc per seed (%)": ", ".join(f"{v:.1f}" for v in r.val),
                     "other": ", ".join(f"{n} {k}" for k, n in sorted(r.counts.items())
                                        if k != "finished")})
    return pd.DataFrame(rows)


def seed_figure(res: ex.ExperimentResults):
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in res.recipes:
        if r.val:
            fig.add_trace(go.Box(y=list(r.val), name=r.recipe.name, boxpoints="all", jitter=0.3,
                                 pointpos=0, boxmean=True))
    fig.update_layout(title="Best validation accuracy, one dot per seed", yaxis_title="%",
                      showlegend=False, height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig


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
    st.dataframe(recipe_table(res), hide_index=True, width="stretch")
    val = [c for c in res.comparisons if c.metric == "val"]
    test = [c for c in res.comparisons if c.metric == "test"]
    if not val:
        st.info("The verdict appears when each recipe has a finished run.")
    for c in val:
        (st.success if c.difference.excludes_zero else st.info)(c.text)
    if test:
        with st.expander("On the test set (touched once per run, at the end)"):
            for c in test:
                st.markdown(f"- {c.text}")
    if any(r.val for r in res.recipes):
        st.plotly_chart(seed_figure(res), key=P + f"fig.{exp.id}")
    st.caption("± after a mean is the spread across seeds (sample standard deviation); ± in "
               "a verdict is half the 95 % confidence interval of the difference (Welch's t).")


def results_section(store: RunStore) -> None:
    exps = ex.list_experiments(store)
    if not exps:
        st.info("No experiments yet. Pick recipes above and press **Run the experiment**.")
        return
    by_id = {e.id: e for e in exps}
    if st.session_state.get(P + "selected") not in by_id:
        st.session_state[P + "selected"] = exps[0].id
    exp_id = st.selectbox("Experiment", list(by_id), key=P + "selected",
                          format_func=lambda i: f"{by_id[i].name} — {len(by_id[i].recipes)} "
                                                f"recipes × {len(by_id[i].seeds)} seeds ({i})")
    active = ex.experiment_results(store, by_id[exp_id]).active > 0
    # While runs are active the results refresh themselves, without rerunning the page.
    st.fragment(run_every=REFRESH_S if active else None)(show_results)(exp_id)
    if st.button("Forget this experiment (its runs stay)", key=P + "forget"):
        ex.delete_experiment(store, exp_id)
        st.session_state.pop(P + "selected", None)
        st.rerun()


# ---------------------------------------------------------------- run insights


@st.cache_data(max_entries=4, show_spinner="Looking for the most confident mistakes…")
def cached_top_losses(root: str, run_id: str, checkpoint: str, mtime: float) -> list:
    """Top losses of a run; keyed on the checkpoint file's mtime so a new best is picked up."""
    store = RunStore(root)
    run = store.get_run(run_id)
    return insights.top_losses(store, run, k=TOP_LOSSES)  # type: ignore[arg-type]


def enlarge(image, size: int = 128):
    """A small image scaled up with visible pixels (32 px CIFAR images are tiny on screen)."""
    from PIL import Image

    img = Image.fromarray(image)
    if img.width < size:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return img


def weight_change_figure(changes: list):
    """Grouped bars: one group of bars per layer group (input side first), one bar per stage;
    frozen groups show as empty (0)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in sorted({c.stage for c in changes}):
        rows = [c for c in changes if c.stage == s]
        fig.add_trace(go.Bar(x=[c.group for c in rows], y=[100 * c.relative_change for c in rows],
                             name=f"stage {s}",
                             customdata=["trained" if c.trained else "frozen" for c in rows],
                             hovertemplate="%{x}: %{y:.2f} %% (%{customdata})<extra>stage " + str(s)
                                           + "</extra>"))
    fig.update_layout(barmode="group", height=300, yaxis_title="relative change (%)",
                      xaxis=dict(categoryorder="array", categoryarray=list(cfgmod.LAYER_GROUPS)),
                      margin=dict(l=10, r=10, t=10, b=10), legend_title_text="")
    return fig


def attribution(store: RunStore, run: Run) -> None:
    gains = insights.stage_attribution(store, run)
    st.markdown("**What each stage added to validation accuracy**")
    if not gains:
        st.caption("This run has no stages recorded.")
        return
    table = pd.DataFrame(insights.stage_attribution_table(gains))
    st.dataframe(table, hide_index=True, width="stretch")
    parts = []
    for g in gains:
        if g.gain is not None:
            base = "chance level" if g.stage == 1 else f"stage {g.stage - 1}"
            parts.append(f"stage {g.stage} ({g.trains}) added {100 * g.gain:+.1f} points over {base}")
    if parts:
        st.markdown("In words: " + "; ".join(parts) + ".")

    changes = insights.weight_changes(run)
    st.markdown("**How far each layer group's weights moved in each stage**")
    if not changes:
        st.caption("Not recorded for this run (it predates weight-change tracking, or no "
                   "stage completed).")
        return
    st.plotly_chart(weight_change_figure(changes), key=P + f"wc.{run.id}")
    notes = []
    for s in sorted({c.stage for c in changes}):
        moved = sorted((c for c in changes if c.stage == s and c.trained),
                       key=lambda c: -c.relative_change)
        if moved:
            notes.append(f"stage {s}: " + ", ".join(f"{c.group} {100 * c.relative_change:.1f} %"
                                                    for c in moved))
    st.caption("Change = ‖W_end − W_start‖ / ‖W_start‖ over the group's weights; frozen groups "
               "stay at 0. A trained group that barely moved learned little. "
               + "; ".join(notes))


def confusion(run: Run) -> None:
    st.markdown("**Most confused classes (test set)**")
    pairs = insights.confused_pairs(run.results, k=5)
    if not pairs:
        st.caption("No confusions recorded" + (" — every test image was right." if
                                               run.results.confusion else "."))
        return
    for p in pairs:
        st.markdown(f"- **{p.true}** taken for **{p.predicted}**: {p.count} time"
                    f"{'s' * (p.count != 1)} ({100 * p.rate:.0f} % of the {p.true} test images)")


def mistakes(store: RunStore, run: Run) -> None:
    st.markdown("**The test images it got wrong most confidently**")
    if not st.toggle("Show the gallery (loads the test images and runs the model)",
                     key=P + f"losses.{run.id}"):
        return
    ckpt = run.best_checkpoint or ""
    try:
        mtime = Path(ckpt).stat().st_mtime if ckpt else 0.0
        losses = cached_top_losses(str(store.root), run.id, ckpt, mtime)
    except (insights.InsightError, OSError) as exc:
        st.warning(str(exc))
        return
    if not losses:
        st.success("It got every test image right.")
        return
    cols = st.columns(6)
    for i, t in enumerate(losses):
        cols[i % 6].image(enlarge(t.image), width="stretch",
                          caption=f"is {t.true}, said {t.predicted} ({100 * t.confidence:.0f} %)")


def export_section(store: RunStore, run: Run) -> None:
    st.markdown("**Export the best model**")
    st.caption("TorchScript and ONNX files, a README on loading them, the class names and the "
               "metrics as CSV, in one zip.")
    if st.button("Export", key=P + f"export.{run.id}"):
        from core.analysis.export import ExportError, export_run

        with st.spinner("Exporting and checking the exported models…"):
            try:
                result = export_run(store, run)
            except ExportError as exc:
                st.warning(str(exc))
                return
            except OSError as exc:  # disk full, permissions, a vanished run folder
                st.error(f"The export could not be written to {store.run_dir(run.id)}: "
                         f"{exc.strerror or exc}. Free some disk space and try again.")
                return
        st.session_state[P + "exported"] = (run.id, str(result.zip_path), result.notes)
    done = st.session_state.get(P + "exported")
    if done and done[0] == run.id and Path(done[1]).is_file():
        for note in done[2]:
            st.info(note)
        zip_path = Path(done[1])
        # A callable: the zip (tens of MB) is read only when the button is clicked.
        st.download_button("Download the export (zip)", data=lambda: zip_path.read_bytes(),
                           file_name=zip_path.name, mime="application/zip",
                           key=P + f"download.{run.id}", on_click="ignore")


def insights_section(store: RunStore, all_runs: list[Run]) -> None:
    runs = [r for r in all_runs if r.best_checkpoint or r.status == "finished"]
    if not runs:
        st.info("Insights appear here once a run has finished an epoch.")
        return
    by_id = {r.id: r for r in runs}
    preferred = st.session_state.get(SELECTED_RUN)
    if st.session_state.get(P + "run") not in by_id:
        st.session_state[P + "run"] = preferred if preferred in by_id else runs[0].id
    run_id = st.selectbox("Run", list(by_id), key=P + "run",
                          format_func=lambda i: f"{by_id[i].name} ({by_id[i].status}, {i})")
    run = by_id[run_id]
    attribution(store, run)
    confusion(run)
    if run.status == "finished":
        mistakes(store, run)
        export_section(store, run)
    else:
        st.caption("The mistakes gallery and export need a finished run.")


store = get_store()
all_runs = store.list_runs()  # read once per rerun, shared by the tabs
st.title("Experiments")
tab_new, tab_results, tab_insights = st.tabs(["Compare recipes", "Results", "Run insights"])
with tab_new:
    compare_form(store, all_runs)
with tab_results:
    results_section(store)
with tab_insights:
    insights_section(store, all_runs)
