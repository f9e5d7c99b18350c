"""Classify's uploader takes any file and the page says in words why one is refused (HEIC,
SVG, PDF, another file type, over 20 MB): the browser's red mark on the upload chip, with
the reason in a tooltip, is not where a user looks. AppTest, against a random-weight model."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.analysis.inference import MAX_UPLOAD_BYTES
from core.runs.store import RunStore
from tests.conftest import make_image_folder, tiny_config
from tests.test_classify_page import FIVE, add_model_run, png_bytes

PAGE = str(Path(__file__).resolve().parent.parent / "app_pages" / "classify.py")

HEIC = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 2000
AVIF = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + b"\0" * 2000
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
REFUSED = {
    "IMG_0001.HEIC": (HEIC, "is a HEIC photo"),
    "photo.avif": (AVIF, "is an AVIF photo"),
    "logo.svg": (SVG, "is an SVG drawing"),
    "scan.pdf": (b"%PDF-1.7\n" + b"x" * 500, "is a PDF document"),
    "notes.docx": (b"PK\x03\x04" + b"\0" * 500, "is a .docx file, not a picture"),
    "big.png": (png_bytes() + b"\0" * MAX_UPLOAD_BYTES, "is too big"),
}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    data = make_image_folder(root / "colors5", per_class=4, classes=FIVE)
    add_model_run(RunStore(root / "runs"), tiny_config(data, classes=FIVE), "model", 0.5)
    return root / "runs"


def test_the_uploader_accepts_any_file_up_to_the_server_limit(monkeypatch, store_root):
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(store_root))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    proto = at.file_uploader(key="classify.upload").proto
    assert list(proto.type) == []  # no extension filter in the browser
    assert proto.max_upload_size_mb > MAX_UPLOAD_BYTES // 1024**2  # core says "too big"


def test_refused_uploads_say_why_on_the_page(monkeypatch, store_root):
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(store_root))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    for name, (data, words) in REFUSED.items():
        at.file_uploader(key="classify.upload").set_value((name, data, "application/octet-stream")).run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1 and words in at.error[0].value, (name, [e.value for e in at.error])
        assert f"“{name}”" in at.error[0].value
        assert not at.header  # no verdict
    # The content decides, not the name: a PNG called .dat is classified.
    at.file_uploader(key="classify.upload").set_value(("photo.dat", png_bytes(), "application/octet-stream")).run()
    assert not at.exception and not at.error
    assert at.header[0].value.startswith(("Pretty sure this is", "Not sure"))
