"""Data-side hardening (issue 22): messages about an uploaded zip name the zip, not the
hidden folder it is unpacked into; what a killed writer left (a decoded-image cache temp, a
zip import's unpack folder) is removed at the next start, a live writer's never."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from core.engine import datasets as di
from core.engine.data import Preprocess, load_folder_tree
from tests.conftest import make_image_folder, wait_for


def test_a_one_class_zip_names_the_uploaded_zip_not_a_temp_folder(tmp_path):
    folder = make_image_folder(tmp_path / "src", per_class=3, split=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((folder / "red").iterdir()):
            z.write(p, arcname=f"red/{p.name}")
    upload = io.BytesIO(buf.getvalue())
    upload.name = "my-photos.zip"  # as Streamlit's UploadedFile carries it
    with pytest.raises(di.ImportRejected) as refused:
        di.import_zip(upload, "oneclass", root=tmp_path / "ds")
    message = str(refused.value)
    assert "my-photos.zip has 1 class folder(s)" in message, message
    assert ".import-" not in message and str(tmp_path) not in message
    assert not list((tmp_path / "ds").iterdir())  # and nothing left behind


# ---------------------------------------------------------------- leftovers of killed writers

WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
ready = Path({ready!r})
{body}
"""

CACHE_WRITER = """
from core.atomic import atomic_write

def write(tmp):
    tmp.write_bytes(b"x" * 1000)
    ready.touch()
    time.sleep(600)  # killed here, mid-write

atomic_write(Path({target!r}), write)
"""

IMPORT_WRITER = """
import io
from core.engine.datasets import import_zip

def progress(message, fraction):
    ready.touch()
    time.sleep(600)  # killed here, mid-unpack

import_zip(io.BytesIO(Path({zip!r}).read_bytes()), "photos", root=Path({root_dir!r}),
           on_progress=progress)
"""


def _writer(tmp_path, name, body, **values):
    """A process that starts writing and then waits (to be killed): (process, ready file)."""
    ready = tmp_path / f"{name}.ready"
    code = WRITER.format(root=str(Path(__file__).resolve().parent.parent), ready=str(ready),
                         body=body.format(**values))
    proc = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: ready.exists() or proc.poll() is not None, timeout_s=120,
             what=f"the {name} writer to start writing")
    assert proc.poll() is None, f"the {name} writer exited early"
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_killed_cache_writers_temp_is_removed_at_the_next_load_and_a_live_ones_kept(tmp_path):
    cache = tmp_path / "cache"
    folder = make_image_folder(tmp_path / "data", per_class=2, split=False)
    dead = _writer(tmp_path, "dead", CACHE_WRITER, target=str(cache / "decoded-aaaa.pt"))
    _kill(dead)
    live = _writer(tmp_path, "live", CACHE_WRITER, target=str(cache / "decoded-bbbb.pt"))
    try:
        temps = sorted(p.name for p in cache.glob(".decoded-*.tmp"))
        assert len(temps) == 2, temps
        load_folder_tree(folder, Preprocess(32), cache_dir=cache)  # a run starts or resumes
        left = [p.name for p in cache.glob(".decoded-*.tmp")]
        assert len(left) == 1 and left[0].startswith(".decoded-bbbb.pt."), left  # the live one
    finally:
        _kill(live)


def test_a_killed_zip_imports_folder_is_removed_at_the_next_start_and_a_live_ones_kept(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3, split=False)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, arcname=p.relative_to(src).as_posix())
    roots = [tmp_path / "ds-dead", tmp_path / "ds-live"]
    dead = _writer(tmp_path, "dead-import", IMPORT_WRITER, zip=str(archive), root_dir=str(roots[0]))
    _kill(dead)
    live = _writer(tmp_path, "live-import", IMPORT_WRITER, zip=str(archive), root_dir=str(roots[1]))
    try:
        assert [len(list(r.glob(".import-*"))) for r in roots] == [1, 1]
        assert [p.name for p in di.clean_dead_imports(roots[0])][0].startswith(".import-photos-")
        assert di.clean_dead_imports(roots[1]) == []  # a live import is never touched
        assert [len(list(r.glob(".import-*"))) for r in roots] == [0, 1]
    finally:
        _kill(live)
    # The next import cleans up by itself too (here: the live writer's, now killed).
    di.import_zip(io.BytesIO(archive.read_bytes()), "again", root=roots[1])
    assert list(roots[1].glob(".import-*")) == []


# ---------------------------------------------------------------- data roots and the pages

def test_pages_show_no_images_from_outside_the_data_roots(tmp_path, monkeypatch, finished_run):
    """The command line may train on any folder; Classify's examples and Run insights'
    images come only from folders under the data roots (also through a symlinked root)."""
    from dataclasses import replace

    from core.analysis import inference, insights

    store, run = finished_run
    inside, outside = tmp_path / "roots", tmp_path / "elsewhere"
    folder = make_image_folder(outside / "colors", per_class=3)
    inside.mkdir()
    (inside / "linked").symlink_to(folder)  # a root-side link that leads outside
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(inside))
    classes = ["red", "green", "blue"]
    for path in (folder, inside / "linked", inside / "linked" / ".." / "colors"):
        items, note = inference.gallery("folder", str(path), classes)
        assert items == [] and "outside the app's data folders" in note, (path, note)
        assert "FINETUNE_LAB_DATA_ROOTS" in note
    moved = replace(run, config=replace(run.config, data_path=str(folder)))
    with pytest.raises(insights.InsightError, match="outside the app's data folders"):
        insights.top_losses(store, moved)
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(outside))
    items, _ = inference.gallery("folder", str(folder), classes)
    assert items  # the same folder under a root is shown
