"""Overview: what the app does, the recipe as a picture, and the runs so far."""

from __future__ import annotations

import streamlit as st

from app_pages._common import SELECTED_RUN, get_store, no_runs_message, open_run
from core import config as cfgmod
from core.views import charts
from core.views.tables import run_label, runs_table

st.title("Two-Stage Fine-Tuning Lab")
st.markdown(
    "Fine-tune an ImageNet ResNet-18 on CIFAR-10 or your own images **in stages** — first only "
    "the new head and the last block, then deeper layers at a lower learning rate — and watch "
    "the curves as it trains. Compare recipes and seeds side by side, then classify new "
    "images with the best checkpoint.")

left, right = st.columns([3, 2], vertical_alignment="center")
with left:
    recipe = cfgmod.preset_stages("Two-stage")
    st.plotly_chart(charts.recipe_figure(recipe), key="overview.recipe")
with right:
    st.markdown(f"**Two-stage recipe.** {cfgmod.PRESET_DESCRIPTIONS['Two-stage']}")
    st.caption("`conv1`, `layer1` and `layer2` stay frozen: on small data their generic "
               "ImageNet features are worth keeping. The claim to test: a few points of "
               "validation accuracy over unfreezing everything at once, and steadier results "
               "across seeds.")
    st.page_link("app_pages/new_run.py", label="Start a new run", icon=":material/add_circle:")

st.subheader("Runs")
store = get_store()
runs = store.list_runs()
if not runs:
    no_runs_message()
else:
    st.dataframe(
        runs_table(runs), hide_index=True, key="overview.table",
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
                              format_func=lambda i: run_label(by_id[i]), key="overview.pick")
    with button_col:
        if st.button("Open", key="overview.open", type="primary"):
            open_run(chosen)
