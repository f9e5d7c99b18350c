"""Overview: what the app does, the recipe as a picture, and the runs so far.

Thin page: the store's runs -> core.views (recipe chart, runs table) -> render.
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import SELECTED_RUN, get_store, new_run_link, no_runs_message, open_run
from core import config as cfgmod
from core.analysis import disk
from core.analysis.disk import fmt_bytes
from core.runs.store import Run, RunStore
from core.views import charts
from core.views.tables import ENDED_BADLY, run_label, runs_table

P = "overview."

INTRO = (
    "Fine-tune an ImageNet ResNet-18 on CIFAR-10 or your own images **in stages** — first only "
    "the new head and the last block, then deeper layers at a lower learning rate — and watch "
    "the curves as it trains. Compare recipes and seeds side by side, then classify new "
    "images with the best checkpoint.")


def recipe_panel() -> None:
    left, right = st.columns([3, 2], vertical_alignment="center")
    with left:
        recipe = cfgmod.preset_stages("Two-stage")
        st.plotly_chart(charts.recipe_figure(recipe), key=P + "recipe")
    with right:
        st.markdown(f"**Two-stage recipe.** {cfgmod.PRESET_DESCRIPTIONS['Two-stage']}")
        st.caption("`conv1`, `layer1` and `layer2` stay frozen: on small data their generic "
                   "ImageNet features are worth keeping. The claim to test: a few points of "
                   "validation accuracy over unfreezing everything at once, and steadier results "
                   "across seeds.")
        new_run_link("Start a new run")


def run_filters(store: RunStore) -> tuple[bool, str | None]:
    """(show failed and cancelled runs, tag to filter by or None)."""
    c = st.columns([2, 2, 3], vertical_alignment="bottom")
    show_ended = c[0].toggle("Show failed and cancelled runs", key=P + "show_ended",
                             help="Hidden by default: they rarely answer a question.")
    tags = store.all_tags()
    tag = c[1].selectbox("Tag", [None, *tags], key=P + "tag",
                         format_func=lambda t: "any tag" if t is None else t,
                         disabled=not tags, help="Add tags to a run on its Runs page.")
    return show_ended, tag


def runs_list(store: RunStore, runs: list[Run]) -> None:
    """The runs table with each run's size on disk, and a picker that opens one on the Runs
    page."""
    table = runs_table(runs)
    table.insert(3, "Tags", [", ".join(r.tags) for r in runs])
    table.insert(len(table.columns) - 1, "Size",
                 [fmt_bytes(disk.folder_bytes(store.files(r.id).folder)) for r in runs])
    st.dataframe(
        table, hide_index=True, key=P + "table", width="stretch",
        column_config={
            "Run": st.column_config.TextColumn("Run", width="medium"),
            "Status": st.column_config.TextColumn("Status", width="small"),
            "Progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0,
                                                        format="percent", width="small"),
            "Recipe": st.column_config.TextColumn("Recipe", width="large"),
            "Best at": st.column_config.TextColumn("Best at", width="medium"),
            "Started": st.column_config.TextColumn("Started", width="medium"),
            "Id": st.column_config.TextColumn("Id", width="medium"),
        })
    by_id = {r.id: r for r in runs}
    ids = list(by_id)
    current = st.session_state.get(SELECTED_RUN)
    pick_col, button_col = st.columns([4, 1], vertical_alignment="bottom")
    with pick_col:
        chosen = st.selectbox("Open a run", ids, index=ids.index(current) if current in ids else 0,
                              format_func=lambda i: run_label(by_id[i]), key=P + "pick")
    with button_col:
        if st.button("Open", key=P + "open", type="primary"):
            open_run(chosen)


def disk_panel(store: RunStore, runs: list[Run]) -> None:
    """Total disk use of the runs, and a clean-up of what finished runs no longer need."""
    total = sum(disk.folder_bytes(store.files(r.id).folder) for r in runs)
    finished = [r for r in runs if r.status == "finished"]
    with st.expander(f"Disk: the runs take {fmt_bytes(total)} in {store.root}"):
        st.markdown("Each run keeps `best.pt` (the best model: Classify, export and downloads "
                    "use it), `last.pt` (the last epoch with optimizer state: only a resume "
                    "needs it) and, for multi-stage runs, `stage1.pt` (the model after stage "
                    "1: Classify's *Before and after*).")
        stage_ends = st.checkbox("Also delete stage-end checkpoints (Classify then cannot show "
                                 "“Before and after”)", key=P + "clean_stage_ends")
        can_free = sum(sum(disk.file_bytes(p) for p in disk.freeable(r, store.files(r.id), stage_ends))
                       for r in finished)
        if st.button(f"Free {fmt_bytes(can_free)} from finished runs", key=P + "clean",
                     disabled=can_free == 0,
                     help="Deletes last.pt of finished runs (they never resume); best.pt "
                          "always stays."):
            freed = disk.clean_up(store, finished, stage_ends)
            st.toast(f"Freed {fmt_bytes(freed)}.", icon=":material/cleaning_services:")
            st.rerun()


# ---------------------------------------------------------------- page

st.title("Two-Stage Fine-Tuning Lab")
st.markdown(INTRO)
recipe_panel()
st.subheader("Runs")
store = get_store()
all_runs = store.list_runs()
if all_runs:
    show_ended, tag = run_filters(store)
    runs = [r for r in (store.list_runs(tag=tag) if tag else all_runs)
            if show_ended or r.status not in ENDED_BADLY]
    hidden = len(all_runs) - len(runs)
    if hidden:
        st.caption(f"{hidden} run{'s' * (hidden != 1)} hidden by the filters above.")
    if runs:
        runs_list(store, runs)
    disk_panel(store, all_runs)
else:
    no_runs_message()
