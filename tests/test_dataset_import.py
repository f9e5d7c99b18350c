"""Zip import of your own data: good zips, nested top folders, non-images, corrupt files,
path traversal / absolute / symlink entries, zip-bomb limits; folder listing and preview."""

from __future__ import annotations

import io
import re
import stat
import zipfile
from pathlib import Path

import pytest

from core.engine import datasets as di
from tests.conftest import make_image_folder


def _zip_folder(folder: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, arcname=prefix + p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def flat_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "src", per_class=4, split=False)


def test_good_zip_imports_and_validates(tmp_path, flat_folder):
    root = tmp_path / "datasets"
    summary = di.import_zip(io.BytesIO(_zip_folder(flat_folder)), "colors", root=root)
    assert summary.path == root / "colors" and summary.path.is_dir()
    assert summary.classes == ["blue", "green", "red"] and summary.layout == "single"
    assert summary.counts == {"all": {"blue": 4, "green": 4, "red": 4}}
    assert summary.total_images == 12 and summary.corrupt == [] and summary.non_images == []
    assert any("few images" in w for w in summary.warnings)
    assert not [p for p in root.iterdir() if p.name.startswith(".import")]
    # The imported folder is usable as data for a run.
    from core.engine.data import Preprocess, load_splits

    splits = load_splits("folder", str(summary.path), Preprocess(32), val_fraction=0.25)
    assert splits.classes == summary.classes


def test_nested_top_folder_split_layout_and_non_images(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3, split=True)
    data = _zip_folder(src, prefix="my-photos/", extra={
        "my-photos/train/red/notes.txt": b"hello", "__MACOSX/._x.png": b"junk",
        "my-photos/train/red/.DS_Store": b"junk", "my-photos/README.md": b"readme"})
    summary = di.import_zip(io.BytesIO(data), "nested", root=tmp_path / "ds")
    assert summary.layout == "split"
    assert sorted((summary.path).iterdir())[0].name in ("test", "train")
    assert summary.counts["train"] == {"blue": 3, "green": 3, "red": 3}
    assert summary.counts["test"] == {"blue": 2, "green": 2, "red": 2}
    assert sorted(summary.non_images) == ["my-photos/README.md", "my-photos/train/red/notes.txt"]
    assert summary.ignored == 2
    assert not (summary.path / "train" / "red" / "notes.txt").exists()


def test_corrupt_images_are_counted_and_left_out(tmp_path, flat_folder):
    data = _zip_folder(flat_folder, extra={"red/broken.png": b"\x89PNG not really",
                                           "green/empty.jpg": b""})
    summary = di.import_zip(io.BytesIO(data), "with-corrupt", root=tmp_path / "ds")
    assert sorted(c.split(":")[0] for c in summary.corrupt) == ["green/empty.jpg", "red/broken.png"]
    assert summary.counts["all"] == {"blue": 4, "green": 4, "red": 4}
    assert not (summary.path / "red" / "broken.png").exists()


@pytest.mark.parametrize("bad_name", ["../evil.png", "red/../../evil.png", "/abs/evil.png",
                                      "C:/win/evil.png", "red\\..\\..\\evil.png"])
def test_path_traversal_and_absolute_entries_reject_the_zip(tmp_path, flat_folder, bad_name):
    root = tmp_path / "ds" / "inner"
    data = _zip_folder(flat_folder, extra={bad_name: b"x"})
    with pytest.raises(di.ImportRejected):
        di.import_zip(io.BytesIO(data), "evil", root=root)
    assert not (tmp_path / "ds" / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    assert list(root.iterdir()) == []  # nothing imported, no temp folder left


def test_symlink_entry_rejects_the_zip(tmp_path, flat_folder):
    buf = io.BytesIO(_zip_folder(flat_folder))
    with zipfile.ZipFile(buf, "a") as z:
        info = zipfile.ZipInfo("red/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    buf.seek(0)
    with pytest.raises(di.ImportRejected, match="symbolic link"):
        di.import_zip(buf, "links", root=tmp_path / "ds")
    assert list((tmp_path / "ds").iterdir()) == []


def test_zip_bomb_limits(tmp_path, flat_folder):
    data = _zip_folder(flat_folder, extra={"red/huge.png": b"\0" * 200_000})
    with pytest.raises(di.ImportRejected, match="larger than"):
        di.import_zip(io.BytesIO(data), "bomb1", root=tmp_path / "ds",
                      limits=di.Limits(max_file_bytes=100_000))
    with pytest.raises(di.ImportRejected, match="more than"):
        di.import_zip(io.BytesIO(data), "bomb2", root=tmp_path / "ds",
                      limits=di.Limits(max_total_bytes=150_000))
    with pytest.raises(di.ImportRejected, match="files"):
        di.import_zip(io.BytesIO(data), "bomb3", root=tmp_path / "ds", limits=di.Limits(max_files=5))
    assert list((tmp_path / "ds").iterdir()) == []


def test_lying_size_header_is_caught_while_reading(tmp_path, flat_folder):
    # A header that under-reports the size: the cap must count bytes really decompressed.
    big = b"\0" * 300_000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("red/a.png", big)
    raw = bytearray(buf.getvalue())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # patch uncompressed size in both headers
        i = raw.find(sig)
        off = i + (22 if sig == b"PK\x03\x04" else 24)
        raw[off:off + 4] = (10).to_bytes(4, "little")
    with pytest.raises(di.ImportRejected):
        di.import_zip(io.BytesIO(bytes(raw)), "liar", root=tmp_path / "ds",
                      limits=di.Limits(max_file_bytes=100_000))
    assert list((tmp_path / "ds").iterdir()) == []


def test_bad_inputs_give_plain_messages(tmp_path, flat_folder):
    ds = tmp_path / "ds"
    with pytest.raises(di.ImportRejected, match="not a valid zip"):
        di.import_zip(io.BytesIO(b"not a zip"), "x", root=ds)
    with pytest.raises(di.ImportRejected, match="data set name"):
        di.import_zip(io.BytesIO(_zip_folder(flat_folder)), "../up", root=ds)
    only_text = io.BytesIO()
    with zipfile.ZipFile(only_text, "w") as z:
        z.writestr("a/readme.txt", "x")
    with pytest.raises(di.ImportRejected, match="no image files"):
        di.import_zip(io.BytesIO(only_text.getvalue()), "x", root=ds)
    loose = io.BytesIO()
    with zipfile.ZipFile(loose, "w") as z:
        z.write(next(flat_folder.rglob("*.png")), "loose.png")
    with pytest.raises(di.ImportRejected, match="class folder"):
        di.import_zip(io.BytesIO(loose.getvalue()), "x", root=ds)
    one_class = _zip_folder(flat_folder / "red", prefix="red/")
    with pytest.raises(di.ImportRejected, match="at least two"):
        di.import_zip(io.BytesIO(one_class), "x", root=ds)
    di.import_zip(io.BytesIO(_zip_folder(flat_folder)), "taken", root=ds)
    with pytest.raises(di.ImportRejected, match="already exists"):
        di.import_zip(io.BytesIO(_zip_folder(flat_folder)), "taken", root=ds)


def test_list_datasets_and_preview(tmp_path, flat_folder):
    root = tmp_path / "ds"
    di.import_zip(io.BytesIO(_zip_folder(flat_folder)), "one", root=root)
    make_image_folder(root / "two", per_class=2, split=True)
    (root / "not-data").mkdir()
    (root / "not-data" / "file.txt").write_text("x")
    assert [d.name for d in di.list_datasets([root])] == ["one", "two"]
    preview = di.preview_samples(root / "two", per_class=5)
    assert set(preview) == {"red", "green", "blue"}
    assert all(len(v) == 2 and all("train" in p.parts for p in v) for v in preview.values())
    assert di.preview_samples(root / "one", per_class=2) == di.preview_samples(root / "one", per_class=2)


def test_summarize_folder_reports_without_modifying(tmp_path, flat_folder):
    (flat_folder / "red" / "bad.jpg").write_bytes(b"nope")
    s = di.summarize_folder(flat_folder)
    assert s.counts["all"]["red"] == 5 and len(s.corrupt) == 1
    assert (flat_folder / "red" / "bad.jpg").exists()
    sampled = di.summarize_folder(flat_folder, max_check_per_class=1)
    assert sampled.total_images == 13


def test_train_and_test_with_different_classes_say_so_as_training_does(tmp_path):
    """One rule for the train/ + test/ layout: the data-set check refuses mismatched class
    folders with the same message preflight and training give."""
    from core.engine.data import DataError, check_same_classes

    root = make_image_folder(tmp_path / "split", per_class=3, classes=("red", "blue"))
    (root / "test" / "blue").rename(root / "test" / "green")
    with pytest.raises(di.ImportRejected) as rejected:
        di.summarize_folder(root)
    with pytest.raises(DataError) as training:
        check_same_classes(root, ["blue", "red"], ["green", "red"])
    assert str(rejected.value) == str(training.value)
    assert "only in train: blue; only in test: green" in str(rejected.value)


def test_the_default_data_set_folder_is_one_place(tmp_path, monkeypatch):
    from core.engine import paths

    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.delenv("FINETUNE_LAB_DATA_ROOTS", raising=False)
    assert paths.data_roots()[0] == paths.default_datasets_dir().resolve()
    assert paths.cifar10_dir() == paths.default_datasets_dir() / "cifar10"
    assert paths.cifar10_dir(str(tmp_path / "mine")) == tmp_path / "mine"


# ---------------------------------------------------------------- links out of the roots


@pytest.fixture
def linked_roots(tmp_path, monkeypatch):
    """A data root holding a data set with links: one image and one class folder lead
    outside the roots, one image links to another inside them. Returns (root, data set)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(root))
    data = make_image_folder(root / "pets", per_class=4, split=False)
    secrets = make_image_folder(outside, per_class=4, classes=("purple", "secret"), split=False)
    (data / "red" / "stolen.png").symlink_to(secrets / "secret" / "000.png")
    (data / "purple").symlink_to(secrets / "purple", target_is_directory=True)
    (data / "blue" / "twin.png").symlink_to(data / "green" / "000.png")  # inside: followed
    make_image_folder(outside / "elsewhere", per_class=2, split=False)
    (root / "escaped").symlink_to(outside / "elsewhere", target_is_directory=True)
    return root, data


def test_links_outside_the_roots_are_not_listed_previewed_or_trained_on(linked_roots):
    from core.engine.data import Preprocess, load_splits, scan_folder
    from core.engine.image_types import list_image_files

    root, data = linked_roots
    listing = list_image_files(data / "red")
    assert [p.name for p in listing.images] == ["000.png", "001.png", "002.png", "003.png"]
    assert [p.name for p in listing.outside] == ["stolen.png"]
    assert "twin.png" in [p.name for p in list_image_files(data / "blue").images]

    names, per_class, skipped = scan_folder(data)
    assert names == ["blue", "green", "red"]  # no "purple" from outside
    assert all(root.resolve() in p.resolve().parents for files in per_class for p in files)
    assert sum("not followed" in s for s in skipped) == 2

    summary = di.summarize_folder(data)
    assert summary.classes == ["blue", "green", "red"]
    assert summary.counts["all"] == {"blue": 5, "green": 4, "red": 4}
    assert sorted(Path(p).name for p in summary.outside_links) == ["purple", "stolen.png"]
    assert any("not followed" in w for w in summary.warnings)

    preview = di.preview_samples(data, per_class=10)
    assert set(preview) == {"blue", "green", "red"}
    assert all(root.resolve() in p.resolve().parents for ps in preview.values() for p in ps)

    splits = load_splits("folder", str(data), Preprocess(32), val_fraction=0.25, test_fraction=0.25)
    assert splits.classes == ["blue", "green", "red"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 13

    assert [d.name for d in di.list_datasets()] == ["pets"]  # not the linked "escaped"


def test_linked_train_folder_outside_the_roots_is_not_a_train_folder(linked_roots, tmp_path):
    from core.engine.image_types import train_test_folders

    root, _ = linked_roots
    split = make_image_folder(root / "split", per_class=3)
    assert train_test_folders(split) is not None
    (split / "train").rename(tmp_path / "outside" / "train")
    (split / "train").symlink_to(tmp_path / "outside" / "train", target_is_directory=True)
    assert train_test_folders(split) is None


def test_the_gallery_skips_linked_class_folders_outside_the_roots(linked_roots):
    from core.analysis.inference import gallery

    _, data = linked_roots
    items, _ = gallery("folder", str(data), ["red", "purple"], per_class=10)
    assert {i.true_label for i in items} == {"red"}
    assert all(i.path.name != "stolen.png" for i in items)


# ---------------------------------------------------------------- zip bombs and bad zips


def _zip_entries(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return bytearray(buf.getvalue())


def _patch_headers(raw: bytearray, local_offset: int, central_offset: int, value: bytes) -> None:
    """Overwrite a field in every entry's local and central header."""
    for sig, off in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        i = raw.find(sig)
        while i != -1:
            raw[i + off:i + off + len(value)] = value
            i = raw.find(sig, i + 4)


def _good_pngs(flat_folder: Path) -> dict[str, bytes]:
    return {p.relative_to(flat_folder).as_posix(): p.read_bytes() for p in flat_folder.rglob("*.png")}


def _refused(data: bytes | bytearray, root: Path, **limits) -> tuple[str, list[str]]:
    """Import `data`, expect a refusal; returns (message, progress messages seen)."""
    seen: list[str] = []
    with pytest.raises(di.ImportRejected) as refused:
        di.import_zip(io.BytesIO(bytes(data)), "bad", root=root, limits=di.Limits(**limits),
                      on_progress=lambda m, f: seen.append(m))
    assert list(root.iterdir()) == []  # nothing imported, no temp folder left
    return str(refused.value), seen


def test_zip_bomb_is_refused_by_ratio_before_anything_is_written(tmp_path, flat_folder):
    bomb = _zip_entries({**_good_pngs(flat_folder), "red/zeros.png": b"\0" * (5 * 1024**2)})
    assert len(bomb) < 100_000  # a few MB of zeros packs into a few KB
    message, progress = _refused(bomb, tmp_path / "ds")
    assert "zip bomb" in message and "red/zeros.png" in message and "times bigger" in message
    assert progress == []  # refused from the directory: nothing was unpacked
    # Many small entries that each pass but together balloon: the whole-zip ratio.
    many = _zip_entries({f"c{i % 2}/{i}.png": b"\0" * 200_000 for i in range(20)})
    message, progress = _refused(many, tmp_path / "ds")
    assert "the zip would unpack from" in message and "zip bomb" in message and progress == []


def test_zip_larger_than_the_free_space_is_refused_before_unpacking(tmp_path, flat_folder):
    import shutil

    root = tmp_path / "ds"
    root.mkdir()
    data = _zip_entries({**_good_pngs(flat_folder), "red/big.bmp": bytes(48 * 1024**2)},
                        compression=zipfile.ZIP_STORED)
    # Room for 1 MB against a 48 MB file: other processes freeing space meanwhile (a shared
    # disk) cannot make it fit.
    free = shutil.disk_usage(root).free
    message, progress = _refused(data, root, keep_free_bytes=free - 1024**2)
    assert "the disk has room for" in message and progress == []


def test_header_that_lies_about_the_size_is_caught_while_unpacking(tmp_path, flat_folder):
    """Header says 1,000 bytes, the deflate stream holds 5 MB: passes every check made from
    the directory, and is stopped at the declared size while unpacking."""
    raw = _zip_entries({"red/liar.png": b"\0" * (5 * 1024**2), **_good_pngs(flat_folder)})
    i = raw.find(b"PK\x03\x04")
    raw[i + 22:i + 26] = (1000).to_bytes(4, "little")
    j = raw.find(b"PK\x01\x02")
    raw[j + 24:j + 28] = (1000).to_bytes(4, "little")
    message, _ = _refused(raw, tmp_path / "ds")
    assert "red/liar.png" in message and "header" in message and "nothing was imported" in message
    assert "CRC" not in message


def test_bad_zips_get_plain_messages_without_server_paths(tmp_path, flat_folder):
    good = _good_pngs(flat_folder)
    root = tmp_path / "ds"
    cases = {}
    encrypted = _zip_entries(good)
    _patch_headers(encrypted, 6, 8, (1).to_bytes(2, "little"))  # general-purpose flag: encrypted
    cases["password-protected"] = encrypted
    corrupt = _zip_entries({"red/x.png": bytes(range(256)) * 400, **good})
    k = corrupt.find(b"PK\x03\x04")
    data_at = k + 30 + int.from_bytes(corrupt[k + 26:k + 28], "little") + int.from_bytes(corrupt[k + 28:k + 30], "little")
    corrupt[data_at] = 0x07  # deflate block type 3: invalid
    cases["cannot be decompressed"] = corrupt
    cases["longer than 255 bytes"] = _zip_entries({**good, "red/" + "n" * 300 + ".png": b"x"})
    cases["both a file and a folder named red/a.png"] = _zip_entries(
        {**good, "red/a.png": good["red/000.png"], "red/a.png/b.png": good["red/001.png"]})
    cases["both a file and a folder named red/z.png"] = _zip_entries(
        {**good, "red/z.png/b.png": good["red/001.png"], "red/z.png": good["red/000.png"]})
    for words, data in cases.items():
        message, _ = _refused(data, root)
        assert words in message, (words, message)
        assert str(tmp_path) not in message and ".import-" not in message


def test_datasets_page_shows_a_bad_zip_plainly_and_clears_the_progress(tmp_path, monkeypatch, flat_folder):
    """AppTest: an encrypted zip and a zip bomb on the Datasets page: a plain error, no
    traceback, no server path, no progress bar left at "Unpacking…"."""
    from streamlit.testing.v1 import AppTest

    page = str(Path(__file__).resolve().parent.parent / "app_pages" / "datasets.py")
    roots = tmp_path / "roots"
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(roots))
    encrypted = _zip_entries(_good_pngs(flat_folder))
    _patch_headers(encrypted, 6, 8, (1).to_bytes(2, "little"))
    bomb = _zip_entries({**_good_pngs(flat_folder), "red/zeros.png": b"\0" * (5 * 1024**2)})
    at = AppTest.from_file(page, default_timeout=60).run()
    for data, words in ((encrypted, "password-protected"), (bomb, "zip bomb")):
        at.file_uploader(key="datasets.zip").set_value(("photos.zip", bytes(data), "application/zip")).run()
        at.button(key="datasets.import").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1 and at.error[0].value.startswith("Not imported: "), at.error
        # The message is shown as text (markdown-escaped); without the escapes it reads:
        assert words in re.sub(r"\\(.)", r"\1", at.error[0].value)
        assert str(tmp_path) not in at.error[0].value
        assert not at.get("progress")
    assert not roots.exists() or not any(roots.iterdir())
    good = _zip_entries(_good_pngs(flat_folder))
    at.file_uploader(key="datasets.zip").set_value(("colors.zip", bytes(good), "application/zip")).run()
    at.button(key="datasets.import").click().run()
    assert not at.exception and not at.error
    assert (roots / "colors").is_dir()
