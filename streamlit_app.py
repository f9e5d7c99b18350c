"""Entry point: `streamlit run streamlit_app.py`. Navigation over the pages plus the shared
sidebar with running and queued jobs. Pages are thin; all logic lives in core/."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `from app_pages._common import ...` and `import core` in pages
    sys.path.insert(0, str(HERE))

from app_pages._common import APP_TITLE, render_sidebar  # noqa: E402
from core.views.images import app_icon  # noqa: E402

PAGES = (  # (file, title, icon); the first is the home page
    ("app_pages/overview.py", "Overview", ":material/home:"),
    ("app_pages/new_run.py", "New run", ":material/add_circle:"),
    ("app_pages/runs.py", "Runs", ":material/monitoring:"),
    ("app_pages/compare.py", "Compare", ":material/compare_arrows:"),
    ("app_pages/insights.py", "Run insights", ":material/insights:"),
    ("app_pages/classify.py", "Classify", ":material/image_search:"),
    ("app_pages/experiments.py", "Experiments", ":material/science:"),
    ("app_pages/search.py", "Search", ":material/travel_explore:"),
    ("app_pages/datasets.py", "Datasets", ":material/folder_open:"),
)

# An image icon is served by the app itself; a material or emoji page icon would be fetched
# from the internet (fonts.gstatic.com) and be missing offline.
st.set_page_config(page_title=APP_TITLE, page_icon=app_icon(),
                   layout="wide")
nav = st.navigation([st.Page(path, title=title, icon=icon, default=(i == 0))
                     for i, (path, title, icon) in enumerate(PAGES)])
nav.run()
# The sidebar's job panel (a fragment that refreshes itself every few seconds) is drawn
# after the page, so a run that leaves the page (st.switch_page, e.g. Start on New run)
# never registers its timer. Drawn first, its timer could fire while the switch was under
# way; Streamlit then ran that refresh after the new page with the old page's id, the
# browser went back to the old page's empty layout, the next live-view update had nowhere
# to go ("Bad delta path index"), and the whole page went white for good (issue 12.7;
# tests/test_e2e_loaded.py). Pages therefore end early with `return`, never st.stop().
render_sidebar()
