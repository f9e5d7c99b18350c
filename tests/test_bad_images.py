"""Every kind of awkward upload is either converted faithfully and classified, or refused
with a plain message (ImageRejected) -- never a traceback. Files are generated in memory."""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.analysis.inference import MAX_UPLOAD_BYTES, ImageRejected, Predictor, decode_upload
from core.engine.checkpoints import Checkpoint, save_checkpoint
from core.engine.data import Preprocess
from core.engine.model import build_resnet18

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, Checkpoint.of_model(build_resnet18(5), {}, ["a", "b", "c", "d", "e"],
                                              Preprocess(resolution=32).to_dict(), 1, 1, {}))
    return Predictor.load(path)


def encode(img: Image.Image, fmt: str, **opts) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return buf.getvalue()


def quadrants() -> Image.Image:
    """Four flat colours: survives palette and lossless round trips exactly."""
    img = Image.new("RGB", (48, 48), (220, 30, 30))
    img.paste((30, 160, 60), (24, 0, 48, 24))
    img.paste((40, 60, 210), (0, 24, 24, 48))
    img.paste((240, 240, 20), (24, 24, 48, 48))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 8-bit grey pixels but carries no image data: enough
    for PIL to read the size (and refuse), without us allocating the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- converted and classified


def _alpha_png():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black...
    img.paste((220, 30, 30, 255), (0, 0, 16, 32))  # ...with an opaque red left half
    ref = Image.new("RGB", (32, 32), (255, 255, 255))  # transparent parts show as white
    ref.paste((220, 30, 30), (0, 0, 16, 32))
    return encode(img, "PNG"), ref


def _palette_png():
    ref = quadrants()
    return encode(ref.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"), ref


def _palette_png_with_transparency():
    pal = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent = pal.getpixel((40, 40))  # the yellow quadrant's palette index
    ref = quadrants()
    ref.paste((255, 255, 255), (24, 24, 48, 48))
    return encode(pal, "PNG", transparency=transparent), ref


def _grayscale_png():
    ref = Image.linear_gradient("L").resize((40, 40))
    return encode(ref, "PNG"), ref.convert("RGB")


def _webp_lossless():
    ref = quadrants()
    return encode(ref, "WEBP", lossless=True), ref


def _animated_gif():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    return data, red  # the first frame is what we classify


CONVERTED = {
    "png with alpha": _alpha_png,
    "palette png": _palette_png,
    "palette png with transparency": _palette_png_with_transparency,
    "grayscale png": _grayscale_png,
    "webp": _webp_lossless,
    "animated gif": _animated_gif,
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_converted_exactly_and_classified_like_the_plain_rgb_picture(predictor, case):
    data, reference = CONVERTED[case]()
    img = decode_upload(data, f"{case}.file")
    assert img.mode == "RGB" and img.size == reference.size
    assert np.array_equal(pixels(img), pixels(reference))
    preds = predictor.predict(img)
    assert len(preds) == 5
    assert preds == predictor.predict(reference)


def test_16_bit_grayscale_is_scaled_not_clipped(predictor):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    img = decode_upload(data, "deep.png")
    arr = pixels(img)
    assert img.mode == "RGB"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    row = arr[0, :, 0]
    assert row[0] < 10 and row[-1] > 245 and 100 < row[32] < 160  # a ramp, not all white
    assert len(predictor.predict(img)) == 5


def test_cmyk_jpeg_comes_out_in_the_right_colours(predictor):
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red
    img = decode_upload(data, "print.jpg")
    r, g, b = pixels(img).reshape(-1, 3).mean(axis=0)
    assert r > 220 and g < 40 and b < 40
    assert predictor.predict(img)[0].label in predictor.classes


def test_exif_rotated_jpeg_is_turned_upright():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    shown = decode_upload(encode(img, "JPEG", quality=95, exif=exif.tobytes()), "phone.jpg")
    assert shown.size == (20, 40)
    assert pixels(shown)[2, 10, 0] > 200  # red ends up on top


# ---------------------------------------------------------------- refused with a message


def test_zero_byte_file():
    with pytest.raises(ImageRejected, match=r"empty \(0 bytes\)"):
        decode_upload(b"", "nothing.jpg")


def test_text_named_jpg():
    with pytest.raises(ImageRejected, match="isn't a picture we can open"):
        decode_upload(b"Dear diary, today I trained a model.\n" * 20, "notes.jpg")


def test_truncated_jpeg():
    data = encode(Image.linear_gradient("L").convert("RGB"), "JPEG", quality=90)
    with pytest.raises(ImageRejected, match="damaged or incomplete"):
        decode_upload(data[: len(data) // 2], "cut.jpg")


@pytest.mark.parametrize("side", [30000, 7000])  # 900 MP (PIL's bomb error); 49 MP (over our 40 MP cap, MAX_IMAGE_PIXELS)
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(ImageRejected, match="too many pixels"):
        decode_upload(png_header_only(side, side), "bomb.png")


def test_file_over_the_upload_limit_is_refused_without_decoding():
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    data += b"\0" * (MAX_UPLOAD_BYTES + 1 - len(data))
    with pytest.raises(ImageRejected, match="too big .*The limit is 20 MB"):
        decode_upload(data, "huge.png")
    # Exactly at the limit is still accepted (trailing bytes after IEND are ignored).
    ok = encode(Image.new("RGB", (8, 8)), "PNG")
    assert decode_upload(ok + b"\0" * (MAX_UPLOAD_BYTES - len(ok)), "big.png").size == (8, 8)


def test_extremely_long_and_thin_picture():
    with pytest.raises(ImageRejected, match="too long and thin"):
        decode_upload(encode(Image.new("RGB", (3000, 10)), "PNG"), "strip.png")


def test_uploads_are_never_written_to_disk(predictor, tmp_path, monkeypatch):
    temp_dir, work_dir = tmp_path / "tmp", tmp_path / "cwd"
    temp_dir.mkdir()
    work_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    monkeypatch.chdir(work_dir)
    img = decode_upload(encode(quadrants(), "PNG"), "holiday.png")
    predictor.predict(img)
    predictor.explain(img)
    predictor.model_view(img)
    assert list(temp_dir.iterdir()) == [] and list(work_dir.iterdir()) == []
    assert not any(Path(p).name == "holiday.png" for p in tmp_path.rglob("*"))


def test_importing_the_data_module_leaves_pil_settings_alone():
    """The pixel limit is checked where images are decoded, not set on PIL at import."""
    import subprocess
    import sys

    code = ("from PIL import Image, ImageFile; before = (Image.MAX_IMAGE_PIXELS, "
            "ImageFile.LOAD_TRUNCATED_IMAGES); import core.engine.data, core.analysis.inference; "
            "print(before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_the_pixel_limit_holds_at_open_image_whatever_pil_allows(monkeypatch):
    from core.engine import data

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own check switched off
    with pytest.raises(data.DataError, match="too large"):
        data.open_image(io.BytesIO(png_header_only(7000, 7000)))


@pytest.mark.parametrize("name, data, words", [
    ("IMG_0001.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 100, "HEIC photo"),
    ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG drawing"),
    ("named-wrong.png", b'<?xml version="1.0"?><svg/>', "SVG drawing"),
    ("paper.pdf", b"%PDF-1.4\n" + b"x" * 100, "PDF document"),
    ("report.docx", b"PK\x03\x04" + b"\0" * 100, "is a .docx file, not a picture"),
])
def test_known_non_pictures_are_named(name, data, words):
    with pytest.raises(ImageRejected, match=words):
        decode_upload(data, name)


def test_a_picture_with_another_extension_is_still_a_picture():
    assert decode_upload(encode(quadrants(), "PNG"), "photo.dat").size == (48, 48)
