"""Overview: what the app does, the recipe as a picture, and the runs so far.

Thin page: the store's runs -> core.views (recipe chart, runs table) -> render.
"""

from __future__ import annotations

import time

import streamlit as st

from app_pages._common import SELECTED_RUN, access, get_store, new_run_link, no_runs_message, open_run
from core import config as cfgmod
from core.analysis import disk
from core.analysis.disk import fmt_bytes
from core.runs.entities import TRAINING_KINDS
from core.runs.store import Run, RunStore
from core.views import charts
from core.views.tables import ENDED_BADLY, recipe_short, run_label, runs_table, short_id

P = "overview."
REFRESH_S = 3  # seconds between refreshes of the runs list while a run is queued or running

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
    # Fewer, narrower columns than runs_table offers, so none is cut at a laptop's content
    # width (about 950 px): "Best at" and "Group" are on the run's page and on Compare,
    # Progress shows only while a run is active, Tags only once a run has one.
    table = runs_table(runs).drop(columns=["Best at", "Group"])
    if not any(r.is_active for r in runs):
        table = table.drop(columns=["Progress"])
    if any(r.tags for r in runs):
        table.insert(2, "Tags", [", ".join(r.tags) for r in runs])
    table["Recipe"] = [recipe_short(r.config) for r in runs]
    table["Started"] = [time.strftime("%m-%d %H:%M", time.localtime(r.created_at)) for r in runs]
    table["Id"] = [short_id(r.id) for r in runs]
    table.insert(len(table.columns) - 1, "Size",
                 [fmt_bytes(disk.folder_bytes(store.files(r.id).folder)) for r in runs])
    # The Run column fits the longest name (about 7.5 px a character; seed groups' names end
    # in "seed N", which a fixed 200 px cut off), up to 330 px.
    px = {"Run": int(min(330, max(200, 7.5 * max(len(r.name) for r in runs)))), "Status": 75, "Tags": 70, "Progress": 90, "Recipe": 150,
          "Best val acc": 80, "Test acc": 75, "Started": 85, "Duration": 75, "Size": 70, "Id": 65}
    columns = {c: st.column_config.Column(c, width=w) for c, w in px.items()}
    columns["Progress"] = st.column_config.ProgressColumn("Progress", min_value=0.0,
                                                          max_value=1.0, format="percent",
                                                          width=px["Progress"])
    columns["Id"] = st.column_config.Column("Id", width=px["Id"], help="The end of the run's id")
    st.dataframe(table, hide_index=True, key=P + "table", column_config=columns)
    by_id = {r.id: r for r in runs}
    ids = list(by_id)
    current = st.session_state.get(SELECTED_RUN)
    pick_col, button_col = st.columns([4, 1], vertical_alignment="bottom")
    with pick_col:
        chosen = st.selectbox("Open a run", ids, index=ids.index(current) if current in ids else 0,
                              format_func=lambda i: run_label(by_id[i]), key=P + "pick")
    with button_col:
        if access().offers("runs") and st.button("Open", key=P + "open", type="primary"):
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
def runs_section(refreshing: bool) -> None:
    """The runs list. While runs are active it refreshes itself (a fragment on a timer), so
    a run that ends shows as ended (it stayed "running 90.91 %" after its finish notice);
    `refreshing`: whether this drawing is on the timer, which stops once nothing is active."""
    store = get_store()
    # Training runs only: tools' records (LR range tests, exports) are reached from their tool.
    all_runs = store.list_runs(kinds=TRAINING_KINDS)
    if refreshing and not any(r.is_active for r in all_runs):
        st.rerun()  # the last one ended: redraw the page once, without the timer
    if not all_runs:
        no_runs_message()
        return
    show_ended, tag = run_filters(store)
    runs = [r for r in (store.list_runs(tag=tag, kinds=TRAINING_KINDS) if tag else all_runs)
            if show_ended or r.status not in ENDED_BADLY]
    hidden = len(all_runs) - len(runs)
    if hidden:
        st.caption(f"{hidden} run{'s' * (hidden != 1)} hidden by the filters above.")
    if runs:
        runs_list(store, runs)
    if access().may_change():  # paths and a delete: not for a viewer (core.access)
        disk_panel(store, store.list_runs())  # every kind takes disk space


st.subheader("Runs")
active = any(r.is_active for r in get_store().list_runs(kinds=TRAINING_KINDS))
st.fragment(run_every=REFRESH_S if active else None)(runs_section)(active)
