"""Overview: what the app does, the recipe as a picture, and the runs so far.

Thin page: the store's runs -> core.views (recipe chart, runs table) -> render.
"""

from __future__ import annotations

import streamlit as st

from app_pages._common import SELECTED_RUN, get_store, new_run_link, no_runs_message, open_run
from core import config as cfgmod
from core.runs.store import Run
from core.views import charts
from core.views.tables import run_label, runs_table

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


def runs_list(runs: list[Run]) -> None:
    """The runs table, and a picker that opens one on the Runs page."""
    st.dataframe(
        runs_table(runs), hide_index=True, key=P + "table",
        column_config={
            "Progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0,
                                                        format="percent"),
            "Id": st.column_config.TextColumn("Id", width="small"),
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


# ---------------------------------------------------------------- page

st.title("Two-Stage Fine-Tuning Lab")
st.markdown(INTRO)
recipe_panel()
st.subheader("Runs")
runs = get_store().list_runs()
if runs:
    runs_list(runs)
else:
    no_runs_message()
