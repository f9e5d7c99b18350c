"""Export a run's best model for use outside the app: TorchScript and ONNX files, a README
on loading them, the class names, the preprocessing, and the run's metrics as CSV, in one
folder and one zip.

Both model files take the same input as the checkpoint: a float32 N x 3 x R x R tensor of
RGB images, resized (shorter side to R) and centre-cropped, scaled to 0..1 and normalised
with the checkpoint's mean and std. Every export is checked: the TorchScript model must give
the same top-1 class as the checkpoint on a batch of inputs, or the export fails. ONNX is
optional: if its exporter fails or its file does not agree, the ONNX file is left out and
the result's notes say why in plain words.

A background job (`submit`): a run of kind "export" whose request names the run exported;
the ordinary worker (core.runs.worker) executes it through the job queue, locally or on Ray,
with progress and cancel, never in the dashboard's process. The files go to the exported
run's folder; the job's result file (`ExportOutcome`) says where, and the notes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import config as cfgmod
from core.atomic import atomic_write, atomic_write_json, atomic_write_text
from core.runs import jobs
from core.runs.entities import RunProgress
from core.runs.store import Run, RunStore
from core.views.tables import metrics_csv

if TYPE_CHECKING:
    from core.runs.recorder import Heartbeat
from core.views.text import md  # a run name is text in the README, never markdown

log = logging.getLogger("finetune_lab.export")
TORCHSCRIPT_NAME = "model.torchscript.pt"
ONNX_NAME = "model.onnx"
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """The model cannot be exported; the message says why."""


@dataclass
class ExportResult:
    folder: Path
    zip_path: Path
    files: list[str]  # names inside the folder
    onnx: bool  # whether the ONNX file was written (needs the onnx packages)
    notes: list[str] = field(default_factory=list)  # e.g. why ONNX is missing
    checked_images: int = 0  # inputs on which exported and checkpoint top-1 agreed


def onnx_available() -> tuple[bool, str]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return False, (f"ONNX export needs the 'onnx' and 'onnxscript' packages ({exc.name} is "
                       f"not installed): pip install onnx onnxscript")
    return True, ""


def predictions_agree(expected_logits: Any, got_logits: Any) -> bool:
    """Same top-1 class wherever the reference is not a near-tie, and logits equal up to
    float rounding (different kernels sum in different orders)."""
    import torch

    exp = torch.as_tensor(expected_logits).float()
    got = torch.as_tensor(got_logits).float()
    if exp.shape != got.shape:
        return False
    scale = float(exp.abs().max()) + 1.0
    top2 = exp.topk(min(2, exp.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1]
    decisive = margin > 1e-4 * scale
    same_top1 = exp.argmax(1) == got.argmax(1)
    return bool((same_top1 | ~decisive).all()) and float((exp - got).abs().max()) <= 1e-3 * scale


def _export_onnx(model: Any, example: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The dynamo exporter (torch.export based) is the supported path; the batch
        # dimension is left free so any batch size works.
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: batch}}, verbose=False)
        # One self-contained file (ResNet-18 is far below protobuf's 2 GB limit).
        program.save(str(path), external_data=False)


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short plain line: its type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _write_checked_onnx(model: Any, example: Any, x_check: Any, expected: Any,
                        path: Path) -> tuple[bool, str]:
    """Write the ONNX file and run-check it with onnxruntime when installed.
    Returns (kept, note); a file that disagrees with the checkpoint is removed."""
    import torch

    atomic_write(path, lambda p: _export_onnx(model, example, p))
    try:
        import onnxruntime as ort
    except ImportError:
        return True, ("onnxruntime is not installed, so the ONNX file was not "
                      "run-checked (pip install onnxruntime)")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x_check.numpy()})[0]
    if not predictions_agree(expected, torch.from_numpy(got)):
        path.unlink(missing_ok=True)
        return False, ("The ONNX file was left out: it does not reproduce the checkpoint's "
                       "predictions. The TorchScript file is complete and checked.")
    return True, ""


def readme_text(run: Run, classes: list[str], preprocess: dict[str, Any], onnx: bool,
                stage: int, epoch: int, onnx_missing: str = "") -> str:
    val = f"{100 * run.best_val_acc:.2f} %" if run.best_val_acc is not None else "n/a"
    test = f"{100 * run.test_acc:.2f} %" if run.test_acc is not None else "n/a"
    return f"""# {md(run.name)} — exported model

ResNet-18 fine-tuned in the Two-Stage Fine-Tuning Lab (run `{run.id}`), best checkpoint
from stage {stage}, epoch {epoch}. Best validation accuracy {val}; test accuracy {test}.

Files:
- `{TORCHSCRIPT_NAME}` — TorchScript (load with PyTorch alone, no model code needed)
- `{ONNX_NAME}` — ONNX (load with onnxruntime or any ONNX runtime)
- `classes.json` — class names; output index i is class `classes[i]`
- `preprocess.json` — input resolution, mean and std
- `metrics.csv` — every training metric of the run (stage, global epoch, step, key, value, unix time)
- `config.json` — the run configuration
{_input_section(preprocess, len(classes))}
## TorchScript (`{TORCHSCRIPT_NAME}`)

```python
model = torch.jit.load("{TORCHSCRIPT_NAME}").eval()
with torch.no_grad():
    probs = model(x).softmax(1)[0]
print(classes[int(probs.argmax())], float(probs.max()))
```
{_onnx_section(onnx, onnx_missing)}
Classes: {", ".join(classes)}
"""


def _input_section(preprocess: dict[str, Any], num_classes: int) -> str:
    """The README's "Input" section: the input tensor, and code that prepares an image."""
    r = int(preprocess["resolution"])
    mean = [round(float(m), 4) for m in preprocess["mean"]]
    std = [round(float(s), 4) for s in preprocess["std"]]
    return f"""
## Input

A float32 tensor of shape N x 3 x {r} x {r}: RGB images, shorter side resized to {r} px
(bilinear) and centre-cropped to a square, values scaled to 0..1, then normalised per
channel with mean {mean} and std {std}. The output is N x {num_classes} logits (apply
softmax for probabilities).

```python
import json
import numpy as np
import torch
from PIL import Image

classes = json.load(open("classes.json"))

def prepare(path, size={r}, mean={mean}, std={std}):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)  # 1 x 3 x {r} x {r}

x = prepare("my_image.jpg")
```
"""


def _onnx_section(onnx: bool, onnx_missing: str) -> str:
    """The README's ONNX section, or the line that says why there is no ONNX file."""
    if not onnx:
        return f"\n(No ONNX file: {onnx_missing or 'it was not requested.'})\n"
    return f"""
## ONNX (`{ONNX_NAME}`)

```python
import onnxruntime as ort
session = ort.InferenceSession("{ONNX_NAME}", providers=["CPUExecutionProvider"])
logits = session.run(["logits"], {{"input": x.numpy()}})[0]   # x as prepared above
print(classes[int(logits[0].argmax())])
```
Input name `input`, output name `logits`; the batch size is free. Opset {ONNX_OPSET}.
"""


def export_run(store: RunStore, run: Run, include_onnx: bool = True,
               check_inputs: Any = None,
               on_progress: Callable[[RunProgress], None] = lambda p: None,
               should_stop: Callable[[], bool] = lambda: False) -> ExportResult:
    """Export the run's best checkpoint to `<run dir>/export/` and `<run dir>/<run id>-export.zip`.
    `check_inputs`: optional uint8 N x 3 x R x R images for the agreement check (random
    inputs otherwise). Raises Cancelled when `should_stop` says so between its steps; the
    previous export, if any, is then left as it was."""
    import torch

    from core.engine.data import Cancelled, Preprocess

    def step(message: str, fraction: float) -> None:
        if should_stop():
            raise Cancelled()
        on_progress(RunProgress(phase="exporting", message=message, fraction=fraction))

    step("Loading the best checkpoint", 0.0)
    ckpt = _best_checkpoint(run)
    model = ckpt.build_model()
    pre = Preprocess.from_dict(ckpt.preprocess)
    x_check = pre.normalize(_check_images(check_inputs, pre.resolution))
    example = x_check[:2]

    run_files = store.files(run.id)
    run_dir, folder = run_files.folder, run_files.export_dir
    # Build in a temp folder and swap it in: a failed export never leaves a mixed folder.
    build = Path(tempfile.mkdtemp(prefix=run_files.EXPORT_BUILD_PREFIX, dir=run_dir))
    notes: list[str] = []
    try:
        with torch.inference_mode():
            expected = model(x_check)
        step("Writing and checking the TorchScript model", 0.1)
        _write_checked_torchscript(model, example, x_check, expected, build / TORCHSCRIPT_NAME)
        onnx_ok = False
        if include_onnx:
            step("Writing and checking the ONNX model", 0.4)
            onnx_ok, note = _onnx_file(model, example, x_check, expected, build / ONNX_NAME)
            if note:
                notes.append(note)
        step("Writing the README, classes, preprocessing and metrics", 0.8)
        atomic_write_text(build / "classes.json", json.dumps(ckpt.classes, indent=2))
        atomic_write_text(build / "preprocess.json", json.dumps(ckpt.preprocess, indent=2))
        atomic_write_text(build / "config.json", cfgmod.to_json(run.config))
        # The same CSV as the Runs page's download (core.views.tables.metrics_csv).
        csv_data = metrics_csv(store.metrics(run.id))
        atomic_write_text(build / "metrics.csv",
                          csv_data.decode() if isinstance(csv_data, bytes) else csv_data)
        onnx_missing = "" if onnx_ok else (notes[0] if notes and include_onnx else "")
        atomic_write_text(build / "README.md", readme_text(run, ckpt.classes, ckpt.preprocess, onnx_ok,
                                                     ckpt.stage, ckpt.epoch, onnx_missing))
        _swap_in(build, folder, run_dir / f"{run_files.EXPORT_BUILD_PREFIX}old-{time.time_ns()}")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    on_progress(RunProgress(phase="exporting", message="Writing the zip", fraction=0.9))
    _write_zip(run_files.export_zip, folder, files, run.id)
    return ExportResult(folder=folder, zip_path=run_files.export_zip, files=files, onnx=onnx_ok,
                        notes=notes, checked_images=len(x_check))


def _best_checkpoint(run: Run) -> Any:
    """The run's best checkpoint, or ExportError saying why there is none to export."""
    from core.engine.checkpoints import CheckpointError, read_checkpoint

    if not run.best_checkpoint:
        raise ExportError("this run has no best checkpoint yet; export needs at least one finished epoch")
    try:
        return read_checkpoint(run.best_checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def _check_images(check_inputs: Any, resolution: int) -> Any:
    """The uint8 images of the agreement check: the given ones, else 8 seeded random ones."""
    import torch

    if check_inputs is not None:
        return check_inputs
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 3, resolution, resolution), dtype=torch.uint8, generator=g)


def _write_checked_torchscript(model: Any, example: Any, x_check: Any, expected: Any,
                               path: Path) -> None:
    """Trace and write the TorchScript file; ExportError when, loaded back, it does not
    give the checkpoint's top-1 classes on `x_check`."""
    import torch

    with warnings.catch_warnings():
        # torch.jit warns that it is deprecated in favour of torch.export; TorchScript
        # is still what plain-PyTorch users can load without the model's code.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        atomic_write(path, lambda p: torch.jit.save(traced, str(p)))
        loaded = torch.jit.load(str(path)).eval()
    with torch.inference_mode():
        if not predictions_agree(expected, loaded(x_check)):
            raise ExportError("the TorchScript model does not reproduce the checkpoint's predictions")


def _onnx_file(model: Any, example: Any, x_check: Any, expected: Any, path: Path
               ) -> tuple[bool, str]:
    """(whether the checked ONNX file was written, a note on why not or what was not checked)."""
    available, why = onnx_available()
    if not available:
        return False, why
    try:
        return _write_checked_onnx(model, example, x_check, expected, path)
    except Exception as exc:  # exporter bugs, unsupported ops, onnxscript errors…
        path.unlink(missing_ok=True)
        return False, ("The ONNX file was left out: the ONNX export failed "
                       f"({_short_reason(exc)}). The TorchScript file is complete and checked.")


def _swap_in(build: Path, folder: Path, old: Path) -> None:
    """Replace `folder` by `build`; the previous folder moves to `old` and is deleted."""
    if folder.exists():
        os.replace(folder, old)
    os.replace(build, folder)
    shutil.rmtree(old, ignore_errors=True)


def _write_zip(zip_path: Path, folder: Path, files: list[str], run_id: str) -> None:
    """`files` of `folder` in one zip, under a folder named after the run."""
    def write_zip(p: Path) -> None:
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name in files:
                z.write(folder / name, arcname=f"{run_id}/{name}")

    atomic_write(zip_path, write_zip)


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class ExportRequest:
    """What an export's job exports (its run's config is the exported run's)."""

    source_run: str  # the id of the run whose best checkpoint is exported
    include_onnx: bool = True


@dataclass(frozen=True)
class ExportOutcome:
    """What an export's job made: the zip (in the exported run's folder) and the notes."""

    zip_path: str
    files: list[str]
    onnx: bool
    notes: list[str]
    checked_images: int


def submit(store: RunStore, source: Run, include_onnx: bool = True) -> Run:
    """Queue the export of `source`'s best checkpoint as a background job (a run of kind
    "export") under the job queue's limit. Raises ExportError when there is nothing to
    export, PreflightError when the executor cannot take it."""
    if not source.best_checkpoint or not Path(source.best_checkpoint).is_file():
        raise ExportError("this run has no best checkpoint yet; export needs at least one finished epoch")
    jobs.check_executor(store, source.config, 0)  # one model in memory, no data set
    run = store.create_run(source.config, name=f"Export · {source.name}", kind="export",
                           job_request=asdict(ExportRequest(source.id, include_onnx)))
    jobs.dispatch(store)
    return store.get_run(run.id) or run


def request_of(store: RunStore, run_id: str) -> ExportRequest | None:
    try:
        data = json.loads(store.files(run_id).job_request.read_text(encoding="utf-8"))
        return ExportRequest(str(data["source_run"]), bool(data.get("include_onnx", True)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def outcome_of(store: RunStore, run_id: str) -> ExportOutcome | None:
    """What a finished export job made; None before it finishes (or if unreadable)."""
    try:
        data = json.loads(store.files(run_id).job_result.read_text(encoding="utf-8"))
        return ExportOutcome(str(data["zip_path"]), [str(f) for f in data["files"]],
                             bool(data["onnx"]), [str(n) for n in data["notes"]],
                             int(data["checked_images"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_job(store: RunStore, source_run: str) -> Run | None:
    """The newest export job of run `source_run`, if any."""
    for run in store.list_runs(kinds=("export",)):
        if (req := request_of(store, run.id)) is not None and req.source_run == source_run:
            return run
    return None


def run_job(store: RunStore, run: Run, heartbeat: Heartbeat) -> None:
    """The worker's part (core.runs.worker, kind "export"): export the requested run in this
    process with the heartbeat's progress and cancel, and record what was made."""
    request = request_of(store, run.id)
    if request is None:
        raise ExportError(f"the job's request ({store.files(run.id).job_request.name}) is "
                          f"missing or unreadable: start the export again")
    source = store.get_run(request.source_run)
    if source is None:
        raise ExportError(f"run {request.source_run} no longer exists")
    log.info("exporting run %s's best checkpoint%s", source.id,
             "" if request.include_onnx else " (no ONNX)")
    result = export_run(store, source, request.include_onnx, on_progress=heartbeat.set_progress,
                        should_stop=heartbeat.should_stop)
    log.info("wrote %s (%s)%s", result.zip_path, ", ".join(result.files),
             "".join(f"; {n}" for n in result.notes))
    atomic_write_json(store.files(run.id).job_result, asdict(ExportOutcome(
        str(result.zip_path), result.files, result.onnx, result.notes, result.checked_images)))
