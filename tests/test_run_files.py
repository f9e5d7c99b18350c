"""One owner of every file name (core.settings) and the checkpoint policy."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from core import config as cfgmod
from core.runs.recorder import CheckpointKind, CheckpointPolicy
from core.settings import RunFiles, StoreLayout

ROOT = Path(__file__).resolve().parent.parent
OWNER = ROOT / "core" / "settings.py"
SCANNED = [ROOT / "core", ROOT / "app_pages", ROOT / "streamlit_app.py", ROOT / "scripts"]


def owned_names() -> re.Pattern[str]:
    """The names RunFiles and StoreLayout own, read from the owner itself (so a name added
    there is checked here without a second list), as they would appear in a string literal,
    with a run id or stage number as any text or an f-string placeholder ("{}"). A file name
    counts as a whole literal or its last path part; a folder name ("cache", "export") only
    inside a path ("cache/x", "a/export"): alone it is also an ordinary word (a run kind)."""
    run_id, stage = "RUNID", 7
    files = RunFiles(Path("/r"), run_id)
    layout = StoreLayout(Path("/s"))
    paths = [getattr(obj, name) for obj in (files, layout) for name in dir(type(obj))
             if isinstance(getattr(type(obj), name), property)]
    names = {p.name for p in paths if isinstance(p, Path)} | {files.stage_end(stage).name}

    def pattern(name: str) -> str:
        return re.escape(name).replace(run_id, r"(?:.+|\{\})").replace(str(stage), r"(?:\d+|\{\})")

    file_names = "|".join(pattern(n) for n in sorted(names) if "." in n)
    folders = "|".join(pattern(n) for n in sorted(names) if "." not in n)
    return re.compile(rf"(^|/)({file_names})$|/({folders})/?$|^({folders})/"
                      rf"|^{re.escape(RunFiles.EXPORT_BUILD_PREFIX)}"
                      rf"|^{re.escape(RunFiles.TEMP_GLOB)}$")


OWNED = owned_names()


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a module except docstrings; f-strings with
    their placeholders as "{}"."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    inside_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in skip and id(node) not in inside_fstring):
            out.append((node.lineno, node.value))
    return out


def python_files() -> list[Path]:
    files: list[Path] = []
    for p in SCANNED:
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return files


def test_file_names_are_spelled_only_by_their_owner():
    # The owner's names were read (a check that found no names would pass on anything).
    assert all(OWNED.search(n) for n in ("best.pt", "stage{}.pt", "{}-export.zip", "a/cache"))
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for path in python_files() if path != OWNER
             for line, text in string_literals(path) if OWNED.search(text)]
    assert not found, "file names outside core/settings.py:\n" + "\n".join(found)


def test_layout_and_run_files_paths(tmp_path):
    layout = StoreLayout(tmp_path)
    files = layout.run("r1")
    assert files.folder == tmp_path / "r1" and files.best.parent == files.folder
    assert len({files.best, files.last, files.stage_end(1), files.stage_end(2), files.log,
                files.export_dir, files.export_zip}) == 7
    assert {layout.database.parent, layout.cache.parent, layout.experiments.parent,
            layout.datasets.parent} == {tmp_path}
    # The record keeps paths relative to the run folder; they resolve back.
    assert files.resolve(files.relative(files.best)) == files.best
    assert not Path(files.relative(files.best)).is_absolute()


def test_checkpoint_policy_writes_best_last_and_the_end_of_stage_one(tmp_path):
    files = RunFiles(tmp_path, "r")
    two = CheckpointPolicy.for_run(files, cfgmod.preset_config("Two-stage", epochs=2))

    def kinds(stage, epoch, best):
        return [(w.kind, w.path, w.with_training_state) for w in two.writes(stage, epoch, best)]

    assert kinds(1, 1, True) == [(CheckpointKind.BEST, files.best, False),
                                 (CheckpointKind.LAST, files.last, True)]
    # last.pt last: it is the resume point, so every other file of its epoch exists first.
    assert kinds(1, 2, False) == [(CheckpointKind.STAGE_END, files.stage_end(1), False),
                                  (CheckpointKind.LAST, files.last, True)]
    assert kinds(2, 2, False) == [(CheckpointKind.LAST, files.last, True)]  # the run's end is last
    assert two.stage_ended(1, 2) and not two.stage_ended(2, 1)
    one = CheckpointPolicy.for_run(files, cfgmod.preset_config("All at once", epochs=1))
    assert [w.kind for w in one.writes(1, 2, False)] == [CheckpointKind.LAST]


def test_save_checkpoint_writes_what_read_checkpoint_returns(tmp_path):
    import torch

    from core.engine.checkpoints import Checkpoint, TrainingState, read_checkpoint, save_checkpoint
    from core.engine.model import build_resnet18

    torch.manual_seed(0)
    state = TrainingState(global_epoch=3, step=12, optimizer={"state": {}, "param_groups": []},
                          scheduler={"last_epoch": 12}, rng=torch.Generator().get_state(),
                          best_val_acc=0.5, best_stage=1, best_epoch=2)
    saved = Checkpoint.of_model(build_resnet18(3), cfgmod.to_dict(cfgmod.RunConfig()),
                                ["a", "b", "c"], {"resolution": 32}, 2, 1, {"val_acc": 0.5}, state)
    save_checkpoint(tmp_path / "c.pt", saved)
    read = read_checkpoint(tmp_path / "c.pt")
    save_checkpoint(tmp_path / "again.pt", read)  # what read returns, save takes
    again = read_checkpoint(tmp_path / "again.pt")
    for c in (read, again):
        assert (c.config, c.classes, c.preprocess, c.stage, c.epoch, c.metrics) == (
            saved.config, saved.classes, saved.preprocess, saved.stage, saved.epoch, saved.metrics)
        assert c.state_dict.keys() == saved.state_dict.keys()
        assert all(torch.equal(c.state_dict[k], saved.state_dict[k]) for k in saved.state_dict)
        ts = c.training_state
        assert (ts.global_epoch, ts.step, ts.best_val_acc, ts.best_stage, ts.best_epoch) == (3, 12, 0.5, 1, 2)
        assert torch.equal(ts.rng, state.rng) and ts.scheduler == {"last_epoch": 12}
