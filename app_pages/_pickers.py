"""Pickers instead of typed paths (issue 20.2), shared by New run and Experiments: a weights
file uploaded (stored under the data folder) or picked from the ones stored, and a data set
picked from those found under the data roots.

Each picker writes a path into a form key (`key`) from a callback, so the form's own
widgets and its memory (app_pages._forms) see it as if it had been typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from app_pages._common import found_datasets
from core.analysis import weights_files


def _store_upload(key: str) -> None:
    """Callback of the weights uploader: store and check the file, then pick it."""
    upload = st.session_state.get(key + ".upload")
    if upload is None:
        return
    try:
        path = weights_files.store_weights_upload(upload.name, upload.getvalue())
    except weights_files.WeightsRejected as exc:
        st.session_state[key + ".problem"] = f"Not stored: {exc}"
    else:
        st.session_state[key] = str(path)
        st.session_state[key + ".problem"] = ""


def weights_file_picker(where: Any, key: str, label: str) -> str:
    """A weights file: one stored under the data folder, picked from a list, or uploaded now
    (checked, then stored and picked). Returns the picked file's path ("" when none)."""
    stored = [str(p) for p in weights_files.stored_weights()]
    current = st.session_state.get(key) or ""
    options = stored + ([current] if current and current not in stored else [])
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0] if options else None
    picked = where.selectbox(label, options, key=key, format_func=lambda p: Path(p).name,
                             placeholder="upload one below",
                             help=f"Weights files stored in {weights_files.weights_folder()}; "
                                  f"upload another below.")
    where.file_uploader("Upload a weights file (.pt or .pth: a ResNet-18 state dict or a "
                        "checkpoint of this app)", type=["pt", "pth"], key=key + ".upload",
                        on_change=_store_upload, args=(key,))
    if problem := st.session_state.get(key + ".problem"):
        where.error(problem)
    return picked or ""


def _use_dataset(picker_key: str, path_key: str) -> None:
    if path := st.session_state.get(picker_key):
        st.session_state[path_key] = path


def data_folder_picker(where: Any, picker_key: str, path_key: str) -> None:
    """The data sets found under the data roots; picking one fills the form's folder
    (`path_key`) instead of typing it."""
    found = {str(d.path): d for d in found_datasets()}
    if not found:
        where.caption("No data sets found under the data folders yet: add one on Datasets.")
        return
    current = st.session_state.get(path_key)
    st.session_state[picker_key] = current if current in found else None
    where.selectbox("Pick a data set", list(found), key=picker_key,
                    format_func=lambda p: f"{found[p].name}  ({p})",
                    placeholder="or pick one found under the data folders",
                    on_change=_use_dataset, args=(picker_key, path_key),
                    help="Image folders under the data folders; add one on the Datasets page.")
