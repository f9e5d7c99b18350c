"""Use a trained checkpoint: pick a run, decode an upload safely, predict the top classes,
say it in plain words, show the model's-eye view, explain with Grad-CAM, compare the model
after stage 1 with the final one, and offer example images from the run's test data.

Images go through THE preprocessing stored in the checkpoint (core.engine.data.Preprocess), the
same code training used. Uploads are decoded from bytes in memory and never written to disk.
"""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from core.engine.image_types import IMAGE_EXTENSIONS, list_image_files, train_test_folders
from core.engine.paths import cifar10_dir, link_allowed, shown_outside_roots
from core.runs.entities import TRAINING_KINDS
from core.settings import RunFiles

if TYPE_CHECKING:
    import torch

    from core.analysis.explain import Explanation, GradCam
    from core.engine.checkpoints import Checkpoint
    from core.runs.store import Run, RunStore

# Uploads above this many bytes (a photo's worth) are refused before decoding, with the reason
# in words. Classify's uploader takes any file up to server.maxUploadSize (the zip limit in
# .streamlit/config.toml), so this check, not the browser, says no.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# An image more than this many times longer than wide (or the reverse) is refused: resizing
# its short side to the model's input would blow its long side up to gigapixels.
MAX_ASPECT_RATIO = 50
# At or above this probability the verdict says "Pretty sure"; below it, "Not sure".
DEFAULT_SURE_THRESHOLD = 0.6


class ImageRejected(ValueError):
    """An upload that cannot be classified; the message is plain words for the user."""


@dataclass(frozen=True)
class Prediction:
    label: str  # class name as trained (folder name)
    probability: float  # 0..1
    index: int  # class index in the checkpoint


# ---------------------------------------------------------------- which run


def classifiable_runs(store: RunStore) -> list[Run]:
    """Runs with a usable model: finished ones, and cancelled ones that kept a best
    checkpoint. Newest first (the store's order)."""
    out = []
    for run in store.list_runs(statuses=("finished", "cancelled"), kinds=TRAINING_KINDS):
        if run.best_checkpoint and Path(run.best_checkpoint).is_file():
            out.append(run)
    return out


MIN_VAL_IMAGES = 50  # a validation set this big (or MIN_VAL_PER_CLASS per class) is "real"
MIN_VAL_PER_CLASS = 10


def data_set_of(run: Run) -> tuple[str, str]:
    """What a run was trained on: (data source, data folder)."""
    return run.config.data_source, run.config.data_path


def has_real_validation(run: Run) -> bool:
    """Whether the run's validation accuracy comes from enough images to mean something:
    at least MIN_VAL_IMAGES, or MIN_VAL_PER_CLASS per class."""
    sizes, classes = run.results.sizes, run.results.classes
    if sizes is None:
        return False
    return sizes.val >= MIN_VAL_IMAGES or (bool(classes)
                                           and sizes.val >= MIN_VAL_PER_CLASS * len(classes))


def rank_models(runs: Sequence[Run], preferred_data: tuple[str, str] | None = None) -> list[Run]:
    """Runs best model first: finished before stopped, a real validation set before a tiny
    one, the data set the user last worked with before others, then test accuracy, then
    validation accuracy; ties keep the given order (newest first)."""
    def key(r: Run) -> tuple:
        return (r.status == "finished", has_real_validation(r),
                preferred_data is not None and data_set_of(r) == preferred_data,
                r.test_acc if r.test_acc is not None else -1.0,
                r.best_val_acc if r.best_val_acc is not None else -1.0)
    return sorted(runs, key=key, reverse=True)  # sorted is stable: equal keys stay newest first


def default_run(runs: Sequence[Run], selected_id: str | None = None,
                preferred_data: tuple[str, str] | None = None) -> Run | None:
    """`selected_id` if it names one of `runs`, else the best by rank_models, else None."""
    if not runs:
        return None
    for run in runs:
        if selected_id and run.id == selected_id:
            return run
    return rank_models(runs, preferred_data)[0]


# ---------------------------------------------------------------- decoding uploads

_PLAIN_REASONS: tuple[tuple[str, str], ...] = (
    ("not an image", "This file isn't a picture we can open. Use a JPEG, PNG, GIF, WebP, BMP "
                     "or TIFF image."),
    ("damaged or truncated", "This picture file is damaged or incomplete (perhaps the "
                             "download or copy was cut short). Try another copy of it."),
    ("too large", "This picture has too many pixels to open safely"),
)


# ISO media "ftyp" brands of HEIF containers: iPhone photos (HEIC) and AVIF.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                b"mif1", b"msf1", b"avif", b"avis"}
_USE_INSTEAD = "Use a JPEG, PNG, GIF, WebP, BMP or TIFF image."


def _known_non_image(data: bytes, name: str, what: str) -> str | None:
    """Plain words for an upload PIL could not open that we recognise (an iPhone photo, a
    drawing, a document, a file type that is not a picture), else None."""
    suffix = Path(name).suffix.lower()
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        kind = "an AVIF" if data[8:12] in (b"avif", b"avis") else "a HEIC"
        return (f"{what} is {kind} photo (the format iPhones and some Android phones save), "
                f"which can't be opened here. Export it as JPEG (on an iPhone: Settings › "
                f"Camera › Formats › Most Compatible), then upload that.")
    head = data[:2048].lstrip().lower()
    if suffix == ".svg" or (head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in head):
        return (f"{what} is an SVG drawing (vector graphics), not a photo. Export it as PNG "
                f"or JPEG first.")
    if data.startswith(b"%PDF"):
        return f"{what} is a PDF document, not a picture. Export the page as PNG or JPEG first."
    if suffix and suffix not in IMAGE_EXTENSIONS:
        return f"{what} is a {suffix} file, not a picture. {_USE_INSTEAD}"
    return None


def decode_upload(data: bytes, name: str = "") -> Image.Image:
    """An uploaded file's bytes as an RGB PIL image, fully decoded in memory.

    Raises ImageRejected with a plain message for an empty file, a file over
    MAX_UPLOAD_BYTES, something that is not an image (saying what it is when we know: a
    HEIC photo, an SVG drawing, a PDF, another file type), a damaged or truncated image, a
    decompression bomb, or a shape too extreme to resize. The content decides, not the
    name: a picture with an odd extension is still classified.
    """
    from core.engine.data import DataError, open_image, to_rgb

    what = f"“{name}”" if name else "This file"
    if not data:
        raise ImageRejected(f"{what} is empty (0 bytes). Choose a photo or picture file.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageRejected(f"{what} is too big ({len(data) / 1024**2:.1f} MB). The limit is "
                            f"{MAX_UPLOAD_BYTES // 1024**2} MB: pick a smaller picture or shrink it first.")
    try:
        img = open_image(io.BytesIO(data))
    except DataError as exc:
        reason = str(exc)
        known = _known_non_image(data, name, what)
        if known and "too large" not in reason:
            raise ImageRejected(known) from None
        for key, plain in _PLAIN_REASONS:
            if key in reason:
                if key == "too large":
                    raise ImageRejected(f"{plain} ({reason}). Shrink it and try again.") from None
                raise ImageRejected(plain) from None
        raise ImageRejected(f"This file can't be used as a picture: {reason}.") from None
    w, h = img.size
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageRejected(f"This picture is {w}x{h} pixels: too long and thin to look at "
                            f"(more than {MAX_ASPECT_RATIO} times longer than wide). Crop it first.")
    try:
        return to_rgb(img).copy()
    except Exception as exc:  # exotic modes PIL cannot convert; never a traceback on the page
        raise ImageRejected(f"This picture's colour format can't be converted ({exc}).") from None


# ---------------------------------------------------------------- the model


class Predictor:
    """A checkpoint's model, ready to classify single images on the CPU.

    Safe to share between sessions (st.cache_resource): forward passes need no state and
    Grad-CAM, which registers hooks, holds a lock.
    """

    def __init__(self, checkpoint: Checkpoint, path: str | Path | None = None):
        from core.engine.data import Preprocess

        self.path = Path(path) if path is not None else None
        self.classes: list[str] = list(checkpoint.classes)
        self.preprocess = Preprocess.from_dict(checkpoint.preprocess)
        self.stage, self.epoch = checkpoint.stage, checkpoint.epoch
        self.metrics = dict(checkpoint.metrics)
        self.config: dict[str, Any] = dict(checkpoint.config)
        self.model = checkpoint.build_model()  # eval mode; CheckpointError if it doesn't fit
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> Predictor:
        """Raises core.engine.checkpoints.CheckpointError with a clear message for a missing file,
        a file that is not a checkpoint, or a checkpoint of another architecture."""
        from core.engine.checkpoints import read_checkpoint

        return cls(read_checkpoint(path), path)

    @property
    def resolution(self) -> int:
        return self.preprocess.resolution

    def model_view(self, img: Image.Image) -> Image.Image:
        """The picture exactly as the model gets it (resolution x resolution, before
        normalisation), as a PIL image."""
        t = self.preprocess.to_uint8(img)  # 3 x R x R uint8
        return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")

    def input_tensor(self, img: Image.Image) -> torch.Tensor:
        """1 x 3 x R x R normalised float input."""
        return self.preprocess.normalize(self.preprocess.to_uint8(img)[None])

    def probabilities(self, img: Image.Image) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(self.input_tensor(img)), dim=1)[0]

    def predict(self, img: Image.Image, k: int = 5) -> list[Prediction]:
        """The `k` most likely classes (fewer if the model has fewer), most likely first."""
        probs = self.probabilities(img)
        k = max(1, min(k, len(self.classes)))
        values, indices = probs.topk(k)
        return [Prediction(self.classes[i], float(p), int(i))
                for p, i in zip(values.tolist(), indices.tolist())]

    def explain(self, img: Image.Image, class_index: int | None = None,
                layer: str = "layer4") -> GradCam:
        from core.analysis.explain import grad_cam

        with self._lock:
            return grad_cam(self.model, self.input_tensor(img), class_index, layer)

    def explanation(self, img: Image.Image, class_index: int | None = None,
                    layer: str = "layer4") -> Explanation:
        """What the model looked at, by a method that means something at its input size
        (core.analysis.explain.explain), or why nothing can be shown."""
        from core.analysis.explain import explain

        name = display_name(self.classes[class_index]) if class_index is not None else "its guess"
        with self._lock:
            return explain(self.model, self.input_tensor(img), class_index, layer,
                           class_name=name)


# ---------------------------------------------------------------- plain words


def display_name(label: str) -> str:
    """A class folder name as words: "sports_car" -> "sports car"."""
    return label.replace("_", " ").replace("-", " ").strip() or label


def _with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def verdict(top: Sequence[Prediction], threshold: float = DEFAULT_SURE_THRESHOLD) -> str:
    """One sentence for a nontechnical reader: "Pretty sure this is a cat" when the top
    class is at least `threshold` likely, otherwise "Not sure" with the best guesses."""
    if not top:
        return "No answer"
    first = display_name(top[0].label)
    if top[0].probability >= threshold:
        return f"Pretty sure this is {_with_article(first)}"
    if len(top) > 1:
        return f"Not sure — maybe {_with_article(first)} or {_with_article(display_name(top[1].label))}"
    return f"Not sure — maybe {_with_article(first)}"


def percent(p: float) -> str:
    """0.873 -> "87 %"; tiny non-zero values as "<1 %" so nothing reads as impossible."""
    return "<1 %" if 0 < p < 0.005 else f"{p * 100:.0f} %"


# ---------------------------------------------------------------- before and after


@dataclass(frozen=True)
class StageModels:
    stage1: Path | None  # the model at the end of stage 1 (multi-stage runs only)
    final: Path | None  # the model at the end of the run
    note: str | None  # plain words when there is nothing to compare


def stage_checkpoints(files: RunFiles, n_stages: int) -> StageModels:
    """Checkpoints for a "before and after" comparison: end of stage 1 vs the run's model.

    The run's model is the best checkpoint, the one every verdict, export and download
    uses (issue 20.5: the last epoch's weights gave a second, slightly different answer
    beside the verdict); the last checkpoint only when no best was kept."""
    final = next((p for p in (files.best, files.last) if p.is_file()), None)
    stage1 = files.stage_end(1)
    if n_stages < 2:
        return StageModels(None, final, "This run had only one stage, so there is no "
                                        "“after stage 1” model to compare with.")
    if not stage1.is_file():
        return StageModels(None, final, "This run stopped before stage 1 ended, so there is "
                                        "no “after stage 1” model to compare with.")
    if final is None:
        return StageModels(stage1, None, "The final model of this run is missing.")
    return StageModels(stage1, final, None)


# ---------------------------------------------------------------- example images


@dataclass(frozen=True)
class GalleryItem:
    true_label: str
    caption: str
    path: Path | None = None  # an image file, opened on demand
    image: Image.Image | None = None  # or an image already in memory (CIFAR-10)

    def open(self) -> Image.Image:
        """RGB image; raises ImageRejected (plain message) if the file went bad."""
        if self.image is not None:
            return self.image.convert("RGB")
        assert self.path is not None
        from core.engine.data import DataError, open_image, to_rgb

        try:
            return to_rgb(open_image(self.path)).copy()
        except DataError as exc:
            raise ImageRejected(f"The example {self.path.name} can't be opened: {exc}") from None


def _folder_gallery(root: Path, classes: Sequence[str], per_class: int,
                    rng: random.Random) -> list[GalleryItem]:
    """Examples from test/ when the data set has train/ + test/, else from the class folders;
    a class folder is listed as training lists it (recursively, the same extensions)."""
    parts = train_test_folders(root)
    test_root = parts[1] if parts else root
    items = []
    for c in classes:
        d = test_root / c
        if not d.is_dir() or not link_allowed(d):
            continue
        files = list_image_files(d).images
        for i, p in enumerate(sorted(rng.sample(files, min(per_class, len(files))))):
            items.append(GalleryItem(c, f"{display_name(c)} {i + 1}", path=p))
    return items


def _cifar_gallery(root: Path, classes: Sequence[str], per_class: int,
                   rng: random.Random) -> list[GalleryItem]:
    import torchvision

    ds = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    items = []
    for c in classes:
        if c not in ds.class_to_idx:
            continue
        idx = [i for i, t in enumerate(ds.targets) if t == ds.class_to_idx[c]]
        for n, i in enumerate(sorted(rng.sample(idx, min(per_class, len(idx))))):
            items.append(GalleryItem(c, f"{display_name(c)} {n + 1}", image=Image.fromarray(ds.data[i])))
    return items


def gallery(source: str, path: str, classes: Sequence[str], per_class: int = 2,
            seed: int = 0) -> tuple[list[GalleryItem], str | None]:
    """Example images from a run's test data (its config's data_source and data_path; the
    part training never saw when the data has a test/ folder): `per_class` per class, chosen
    with a fixed seed so the gallery is stable across reruns. Returns (items, a plain note
    when there are none or they may include training images)."""
    rng = random.Random(seed)
    if outside := shown_outside_roots(source, path):
        return [], outside
    try:
        if source == "folder":
            root = Path(path).expanduser()
            if not root.is_dir():
                return [], f"The run's image folder {root} is no longer there."
            items = _folder_gallery(root, classes, per_class, rng)
            note = None if train_test_folders(root) else (
                "This data set has no separate test folder, so some examples may be pictures "
                "the model trained on.")
        elif source == "cifar10":
            root = cifar10_dir(path)
            try:
                items = _cifar_gallery(root, classes, per_class, rng)
            except Exception:  # torchvision raises RuntimeError when the files are missing
                return [], f"CIFAR-10's test images are not in {root}, so there are no examples to show."
            note = None
        else:
            return [], f"Unknown data source {source!r}: no examples to show."
    except OSError as exc:
        return [], f"The example pictures can't be read ({exc})."
    if not items:
        return [], "No example pictures were found in the run's data."
    return items, note

