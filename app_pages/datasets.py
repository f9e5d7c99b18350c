"""Datasets: bring your own images. Upload a zip of class folders (or pick a folder under
the data folders), see it validated (classes, counts, unreadable and skipped files) and
previewed per class, then use it in a new run.

Thin page: upload or pick -> core.engine.datasets (import, checks, preview) -> render.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages._common import HANDED_DATA_PATH, NEW_RUN_PAGE, forget_datasets, found_datasets
from core.engine.datasets import (
    DatasetSummary,
    ImportRejected,
    clean_dead_imports,
    import_zip,
    preview_samples,
    summarize_folder,
)
from core.engine.paths import PathNotAllowed, data_roots, resolve_user_path
from core.views.images import thumbnail
from core.views.text import md

log = logging.getLogger("finetune_lab.datasets")

P = "datasets."
CURRENT = P + "current"  # the DatasetSummary on show
PREVIEW_PER_CLASS = 6
CHECK_PER_CLASS = 100  # images decoded per class when checking an existing (maybe big) folder
THUMB_PX = 96


def suggested_name(filename: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(filename).stem).strip("-._")
    return stem[:64] or "my-data"


@st.cache_data(max_entries=500, show_spinner=False)
def preview_tile(path: str, mtime: float):
    """A preview tile of an image file (None if it cannot be read); keyed on its mtime."""
    from core.engine.data import DataError, open_image, to_rgb

    try:
        return thumbnail(to_rgb(open_image(path)), THUMB_PX)
    except DataError:
        return None


def upload_section() -> None:
    st.markdown("A zip with one folder of images per class (`cats/…`, `dogs/…`), optionally "
                "inside one top folder, or with `train/` and `test/` folders that each hold "
                "the class folders. A few hundred images per class give a useful model.")
    upload = st.file_uploader("Zip of class folders", type=["zip"], key=P + "zip",
                              help="Up to 1,000 MB (server.maxUploadSize in .streamlit/config.toml).")
    if upload is None:
        return
    if st.session_state.get(P + "zip_seen") != upload.file_id:
        st.session_state[P + "zip_seen"] = upload.file_id
        st.session_state[P + "name"] = suggested_name(upload.name)
    name = st.text_input("Name of the new data set", key=P + "name")
    if st.button("Import", type="primary", key=P + "import"):
        bar = st.progress(0.0, text="Unpacking…")
        try:
            summary = import_zip(upload, name, on_progress=lambda m, f: bar.progress(min(1.0, f), text=m))
        except ImportRejected as exc:
            st.error(f"Not imported: {md(exc)}")
            return
        except Exception as exc:  # never a traceback (or a server path) on the page
            log.exception("zip import failed")
            st.error(f"Not imported: the zip could not be unpacked ({type(exc).__name__}). "
                     f"Check that it opens on your computer and zip the folders again.")
            return
        finally:
            bar.empty()  # the progress never stays at "Unpacking…"
        forget_datasets()  # the new data set shows in the lists at once
        st.session_state[CURRENT] = summary
        st.success(f"Imported **{md(summary.name)}**: {summary.total_images:,} images in "
                   f"{len(summary.classes)} classes, saved in {md(summary.path)}.")


def folder_section() -> None:
    found = found_datasets()
    if found:
        labels = {f"{d.name}  ({d.path})": str(d.path) for d in found}
        choice = st.selectbox("Data sets found", list(labels), key=P + "found")
        if st.button("Check this data set", key=P + "check_found"):
            check_folder(labels[choice])
    else:
        st.caption("No data sets found under " + ", ".join(str(r) for r in data_roots()) + ".")
    text = st.text_input("Or a folder path", key=P + "path",
                         placeholder="e.g. ~/photos/flowers (one sub-folder per class)")
    if st.button("Check this folder", key=P + "check_path", disabled=not text.strip()):
        try:
            check_folder(str(resolve_user_path(text)))
        except PathNotAllowed as exc:
            st.error(str(exc))


def check_folder(path: str) -> None:
    with st.spinner("Checking the images…"):
        try:
            summary = summarize_folder(path, max_check_per_class=CHECK_PER_CLASS)
        except ImportRejected as exc:
            st.error(f"Cannot use {md(path)}: {md(exc)}")
            return
    st.session_state[CURRENT] = summary


def counts_table(summary: DatasetSummary) -> pd.DataFrame:
    rows = []
    for c in summary.classes:
        row = {"class": c}
        for part, counts in summary.counts.items():
            row["images" if part == "all" else f"{part} images"] = counts.get(c, 0)
        rows.append(row)
    return pd.DataFrame(rows)


def show_current(summary: DatasetSummary) -> None:
    st.subheader(md(summary.name))
    m = st.columns(4)
    m[0].metric("Classes", len(summary.classes))
    m[1].metric("Images", f"{summary.total_images:,}")
    m[2].metric("Unreadable", len(summary.corrupt))
    m[3].metric("Skipped (not images)", len(summary.non_images))
    st.caption(f"{md(summary.path)} — "
               + ("train/ and test/ folders" if summary.layout == "split"
                  else "one folder per class; the test split is carved out automatically"))
    for w in summary.warnings:
        st.warning(md(w))
    st.dataframe(counts_table(summary), hide_index=True)
    if summary.corrupt:
        with st.expander(f"Unreadable files ({len(summary.corrupt)})"):
            st.code("\n".join(summary.corrupt[:200]), language=None)
    if summary.non_images:
        with st.expander(f"Skipped files that are not images ({len(summary.non_images)})"):
            st.code("\n".join(summary.non_images[:200]), language=None)
    if summary.outside_links:
        with st.expander(f"Links to outside the data folders, not followed ({len(summary.outside_links)})"):
            st.code("\n".join(summary.outside_links[:200]), language=None)

    if st.button("Use in a new run", type="primary", key=P + "use"):
        st.session_state[HANDED_DATA_PATH] = str(summary.path)
        try:
            st.switch_page(NEW_RUN_PAGE)
        except Exception:  # the New run page is not registered (e.g. this page alone)
            st.info(f"Open **New run** and use the data folder {md(summary.path)}.")

    st.markdown("**Preview**")
    try:
        samples = preview_samples(summary.path, per_class=PREVIEW_PER_CLASS)
    except ImportRejected as exc:
        st.warning(md(exc))
        return
    for cls, paths in samples.items():
        cols = st.columns([1.2] + [1] * PREVIEW_PER_CLASS)
        cols[0].markdown(f"**{md(cls)}**")  # a class folder name from a zip: text
        for col, p in zip(cols[1:], paths):
            tile = preview_tile(str(p), p.stat().st_mtime)
            if tile is None:
                col.caption("unreadable")
            else:
                col.image(tile, width="stretch")


# ---------------------------------------------------------------- page



@st.cache_resource(show_spinner=False)
def cleaned_dead_imports() -> int:
    """Once per server process: remove what an import killed with the last server left."""
    return sum(len(clean_dead_imports(root)) for root in data_roots() if root.is_dir())


cleaned_dead_imports()
st.title("Datasets")
st.caption("Your own images as a data set: classes are the folder names.")
tab_upload, tab_folder = st.tabs(["Upload a zip", "Pick a folder"])
with tab_upload:
    upload_section()
with tab_folder:
    folder_section()
current = st.session_state.get(CURRENT)
if current is not None:
    st.divider()
    show_current(current)
