"""Entry point: `streamlit run streamlit_app.py`. Navigation over the pages plus the shared
sidebar with running and queued jobs. Pages are thin; all logic lives in core/.

Who gets what is decided in one place, core.access (asked through app_pages._common.access):
the lab gets every page; a viewer (FINETUNE_LAB_MODE=viewer, or not signed in when an identity
provider is configured in .streamlit/secrets.toml) gets only the presenter view and the
read-only pages the owner allows. A page that is not registered cannot be opened by its URL:
Streamlit serves the default page instead. The lab is refused on a non-loopback address
without sign-in or viewer mode."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `from app_pages._common import ...` and `import core` in pages
    sys.path.insert(0, str(HERE))

from app_pages._common import APP_TITLE, access, render_sidebar, serving_refusal  # noqa: E402
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
    ("app_pages/present.py", "Present", ":material/co_present:"),
)
PRESENT_PAGE = "app_pages/present.py"  # a viewer's home page
# The read-only pages a viewer may be given (core.access.READ_ONLY_PAGES), by file.
VIEWER_PAGE_FILES = {"overview": "app_pages/overview.py", "runs": "app_pages/runs.py",
                     "compare": "app_pages/compare.py"}


def sign_in_bar(you) -> None:
    """Sign in / sign out with Streamlit's own st.login against the configured provider."""
    if not you.sign_in_available:
        return
    where = st.sidebar if you.lab and st.query_params.get("present") != "1" else st
    if you.visitor.signed_in:
        where.text(you.reason)  # an e-mail is shown as text, never markdown
        if where.button("Sign out", key="app.sign_out"):
            st.logout()
    elif where.button("Sign in", key="app.sign_in"):
        st.login()


# An image icon is served by the app itself; a material or emoji page icon would be fetched
# from the internet (fonts.gstatic.com) and be missing offline.
st.set_page_config(page_title=APP_TITLE, page_icon=app_icon(), layout="wide")
you = access()
refusal = serving_refusal()
if refusal:
    st.error(refusal)
else:
    presenting = st.query_params.get("present") == "1"
    if you.lab:
        pages = list(PAGES)
    else:  # what is not registered here cannot be opened, not even by its URL
        offered = {PRESENT_PAGE} | {VIEWER_PAGE_FILES[name] for name in you.pages}
        pages = sorted((p for p in PAGES if p[0] in offered), key=lambda p: p[0] != PRESENT_PAGE)
    entries = [st.Page(path, title=title, icon=icon, default=(i == 0))
               for i, (path, title, icon) in enumerate(pages)]
    hide_nav = presenting or len(entries) == 1
    nav = st.navigation(entries, position="hidden" if hide_nav else
                        ("sidebar" if you.lab else "top"))
    sign_in_bar(you)
    nav.run()
    # The sidebar's job panel (a fragment that refreshes itself every few seconds) is drawn
    # after the page, so a run that leaves the page (st.switch_page, e.g. Start on New run)
    # never registers its timer. Drawn first, its timer could fire while the switch was under
    # way; Streamlit then ran that refresh after the new page with the old page's id, the
    # browser went back to the old page's empty layout, the next live-view update had nowhere
    # to go ("Bad delta path index"), and the whole page went white for good (issue 12.7;
    # tests/test_e2e_loaded.py). Pages therefore end early with `return`, never st.stop().
    # A viewer and the presenter view get no sidebar: no run names, no jobs.
    if you.lab and not presenting and nav.url_path != "present":
        render_sidebar()
