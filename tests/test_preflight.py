"""Preflight opens a weights file at submit and says plainly what it is when it is not
ResNet-18 weights; torch's advice to load with weights_only=False is never passed on."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from core import config as cfgmod
from core.engine.checkpoints import Checkpoint, save_checkpoint
from core.engine.model import build_resnet18
from core.runs.preflight import PreflightError, preflight
from core.runs.store import RunStore
from tests.conftest import tiny_config


def resnet_keys(blocks: tuple[int, int, int, int], bottleneck: bool) -> dict[str, torch.Tensor]:
    """Tensor names of a torchvision ResNet (values are tiny: only the names matter)."""
    state = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    for layer, n in enumerate(blocks, 1):
        for b in range(n):
            for conv in convs:
                state[f"layer{layer}.{b}.{conv}.weight"] = torch.zeros(1)
    return state


def write_cases(tmp_path):
    """(file, words the message must contain) for files that are not ResNet-18 weights."""
    cases = []

    def case(name, words, write):
        path = tmp_path / name
        write(path)
        cases.append((path, words))

    case("config.json", "is a JSON file", lambda p: p.write_text(json.dumps({"lr": 0.1})))
    case("notes.pth", "is a text file", lambda p: p.write_text("these are my weights\n"))
    case("empty.pth", "is empty", lambda p: p.write_bytes(b""))
    case("model.pth", "pickle of Python objects", lambda p: torch.save(torch.nn.Linear(2, 2), p))
    case("numbers.pth", "holds a dict that is not a state dict",
         lambda p: torch.save({"epoch": 3, "lr": 0.1}, p))
    case("list.pth", "holds a list that is not a state dict", lambda p: torch.save([torch.ones(2)], p))
    case("bert.pth", "not a ResNet's", lambda p: torch.save({"encoder.w": torch.ones(2)}, p))
    case("r34.pth", "holds ResNet-34 weights", lambda p: torch.save(resnet_keys((3, 4, 6, 3), False), p))
    case("r50.pth", "holds ResNet-50 weights", lambda p: torch.save(resnet_keys((3, 4, 6, 3), True), p))
    case("shapes.pth", "of another shape", lambda p: torch.save(resnet_keys((2, 2, 2, 2), False), p))
    return cases


def test_files_that_are_not_weights_fail_preflight_saying_what_they_are(tmp_path, tiny_folder):
    for path, words in write_cases(tmp_path):
        cfg = tiny_config(tiny_folder, weights="file", weights_path=str(path))
        with pytest.raises(PreflightError) as refused:
            preflight(cfg)
        message = "; ".join(refused.value.errors)
        assert words in message, (path.name, message)
        assert "expected a ResNet-18 state dict" in message
        assert "weights_only" not in message and "False" not in message, message


def test_resnet18_state_dicts_and_checkpoints_pass(tmp_path, tiny_folder):
    model = build_resnet18(10)
    plain, wrapped, ours = tmp_path / "plain.pth", tmp_path / "wrapped.pth", tmp_path / "ours.pt"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    save_checkpoint(ours, Checkpoint.of_model(model, {}, [str(i) for i in range(10)],
                                              {"resolution": 32}, 1, 1, {}))
    for path in (plain, wrapped, ours):
        preflight(tiny_config(tiny_folder, weights="file", weights_path=str(path)))


def test_command_line_refuses_a_json_weights_file_before_a_run_exists(tmp_path, tiny_folder):
    weights = tmp_path / "weights.json"
    weights.write_text("{}")
    res = subprocess.run([sys.executable, "-m", "core", "--data-dir", str(tmp_path / "runs"), "train",
                          "--data-source", "folder", "--data-path", str(tiny_folder),
                          "--weights", "file", "--weights-path", str(weights)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "is a JSON file" in res.stderr and "Traceback" not in res.stderr
    assert "weights_only" not in res.stderr
    assert RunStore(tmp_path / "runs").list_runs() == []


def test_a_missing_weights_file_still_says_so(tmp_path, tiny_folder):
    cfg = replace(tiny_config(tiny_folder), weights="file", weights_path=str(tmp_path / "none.pth"))
    with pytest.raises(cfgmod.ConfigError, match="does not exist"):
        preflight(cfg)


def test_run_time_loaders_never_pass_on_torchs_weights_only_advice(tmp_path):
    """If a bad file reaches the worker or Classify anyway, their messages hold no advice to
    load it with weights_only=False."""
    from core.engine.checkpoints import CheckpointError, read_checkpoint
    from core.engine.model import WeightsError, load_weights_file

    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as as_checkpoint:
        read_checkpoint(path)
    with pytest.raises(WeightsError) as as_weights:
        load_weights_file(path)
    for exc in (as_checkpoint.value, as_weights.value):
        assert "weights_only" not in str(exc) and "could run code" in str(exc), str(exc)


# ---------------------------------------------------------------- feature cache memory


def test_cached_values_per_image_match_the_real_network():
    """The torch-free sizes (core.engine.model_info) against a real ResNet-18's outputs."""
    from core.engine.model import forward_prefix
    from core.engine.model_info import group_output_values

    model = build_resnet18(3).eval()
    for resolution in (32, 64, 100, 224):
        x = torch.zeros(1, 3, resolution, resolution)
        with torch.no_grad():
            for i, group in enumerate(cfgmod.LAYER_GROUPS[:-1]):
                out = forward_prefix(model, x, cfgmod.LAYER_GROUPS[:i + 1])
                assert out[0].numel() == group_output_values(group, resolution), (group,
                                                                                  resolution)


def test_a_feature_cache_that_cannot_fit_in_memory_is_refused_with_the_figures():
    """Fast transfer caches conv1+layer1 outputs: 200,704 values per image at 224 px, so
    10,000 photos need 3.8-7.5 GB. A run that cannot fit is refused before it starts."""
    from core.runs.disk import memory_problem

    cfg = cfgmod.preset_config("Fast transfer", resolution=224, val_fraction=0.2)
    _, cached, _ = cfgmod.training_images(cfg, 10_000, has_test_split=True)
    assert cached == 8_000  # after the validation share
    need_least = 8_000 * 200_704 * 2
    problem, caution = memory_problem(cfg, cached, available=need_least - 1)
    assert problem and caution is None
    assert "Stage 1's feature cache holds 8,000 images' frozen-layer outputs at 224 px" in problem
    assert "turn the feature cache off for that stage" in problem
    problem, caution = memory_problem(cfg, cached, available=need_least + 1)
    assert problem is None and "more than half" in caution  # may fit: said, not refused
    assert memory_problem(cfg, cached, available=100 * need_least) == (None, None)
    cheap = replace(cfg, resolution=32)  # 4,096 values per image: 31-63 MB
    assert memory_problem(cheap, cached, available=1024**3) == (None, None)
    no_cache = cfgmod.preset_config("Two-stage", resolution=224)
    assert memory_problem(no_cache, cached, available=1) == (None, None)
    trains_bn = cfgmod.with_stage(cfg, 0, bn_policy="train")  # outputs change: never cached
    assert memory_problem(trains_bn, cached, available=1) == (None, None)


def test_preflight_refuses_a_run_whose_cache_exceeds_this_machines_memory(tiny_folder,
                                                                          monkeypatch):
    """Wired into the checks a submit and the New run page make (the machine's real
    available memory stood in for by a small figure: the tiny folder's cache is ~5 MB)."""
    from core.runs import preflight as pf

    cfg = replace(tiny_config(tiny_folder), resolution=224,
                  stages=cfgmod.preset_stages("Fast transfer", epochs=1))
    assert preflight(cfg).train_images == 36
    monkeypatch.setattr(pf, "available_memory", lambda: 1024**2)
    with pytest.raises(PreflightError, match=r"memory: Stage 1's feature cache"):
        preflight(cfg)
