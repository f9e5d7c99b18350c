"""Data-side hardening (issue 22): messages about an uploaded zip name the zip, not the
hidden folder it is unpacked into."""

from __future__ import annotations

import io
import zipfile

import pytest

from core.engine import datasets as di
from tests.conftest import make_image_folder


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
