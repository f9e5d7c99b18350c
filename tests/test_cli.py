"""`python -m core`: foreground training into the shared store, listing, errors."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from core import cli
from core import config as cfgmod
from core.runs.store import RunStore


def _cli(*args, data_dir):
    return subprocess.run([sys.executable, "-m", "core", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=300)


def test_help_documents_every_option(tmp_path):
    out = _cli("train", "--help", data_dir=tmp_path).stdout
    for option in ("--preset", "--config", "--data-source", "--data-path", "--classes",
                   "--max-train-images", "--weights", "--device", "--feature-cache"):
        assert option in out


def test_train_in_foreground_lands_in_the_store(tmp_path, tiny_folder):
    res = _cli("train", "--preset", "Two-stage", "--data-source", "folder", "--data-path",
               str(tiny_folder), "--weights", "random", "--batch-size", "8", "--val-fraction",
               "0.25", "--threads", "1", "--name", "from cli", "--note", "a first try",
               "--tag", "cli", "--tag", "baseline", data_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "finished run" in res.stdout and "test acc" in res.stdout
    [run] = RunStore(tmp_path).list_runs()
    assert run.status == "finished" and run.name == "from cli"
    assert run.note == "a first try" and run.tags == ("baseline", "cli")  # --note, --tag
    assert {m.stage for m in RunStore(tmp_path).metrics(run.id, keys=["val/acc"])} == {1, 2}
    listing = _cli("runs", data_dir=tmp_path).stdout
    assert run.id in listing and "finished" in listing
    as_json = [json.loads(line) for line in _cli("runs", "--json", data_dir=tmp_path).stdout.splitlines()]
    assert as_json[0]["id"] == run.id and as_json[0]["test_acc"] is not None
    assert as_json[0]["tags"] == ["baseline", "cli"] and as_json[0]["note"] == "a first try"


def test_invalid_config_file_names_the_fields(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch_size": -3, "stages": [{"lr": "fast", "groups": []}],
                               "colour": "red"}))
    res = _cli("train", "--config", str(bad), data_dir=tmp_path)
    assert res.returncode == 2
    assert "colour: unknown key" in res.stderr
    assert "stage 1: lr: expected a number" in res.stderr
    assert "batch_size must be" in res.stderr
    assert "Traceback" not in res.stderr
    assert RunStore(tmp_path).list_runs() == []


def test_missing_data_folder_fails_fast_with_advice(tmp_path):
    res = _cli("train", "--data-source", "folder", "--data-path", str(tmp_path / "nope"),
               "--weights", "random", data_dir=tmp_path)
    assert res.returncode != 0
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert RunStore(tmp_path).list_runs() == []  # refused before a run was created


def _config(*argv: str) -> cfgmod.RunConfig:
    return cli.build_config(cli._parser().parse_args(["train", *argv]))


def test_every_flagged_field_has_its_option(capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for cls in (cfgmod.RunConfig, cfgmod.StageConfig):
        for f, spec in cfgmod.specs(cls):
            if spec.flag:
                flag = f.name.replace("_", "-")
                assert f"--{flag} " in out or f"--no-{flag} " in out, f.name


def test_options_override_the_preset_and_nothing_else():
    assert _config() == cfgmod.preset_config("Two-stage")
    cfg = _config("--preset", "Gradual", "--epochs", "2", "--lr", "0.03", "--classes",
                  "cat, dog,", "--no-augment", "--feature-cache", "--batch-size", "100",
                  "--val-fraction", "0.2")
    expected = cfgmod.preset_config("Gradual", epochs=2, lr=0.03, classes=("cat", "dog"),
                                    augment=False, batch_size=100, val_fraction=0.2)
    assert cfg == replace(expected, stages=tuple(replace(s, feature_cache=True)
                                                 for s in expected.stages))
    assert cfg.stages[1].lr == 0.03 / 3  # the preset's exact value


def test_options_override_a_config_file(tmp_path):
    base = cfgmod.preset_config("Head only", seed=5, classes=("a", "b"))
    path = tmp_path / "run.json"
    path.write_text(cfgmod.to_json(base))
    assert _config("--config", str(path)) == base
    assert _config("--config", str(path), "--seed", "9", "--classes", "") == replace(base, seed=9)


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("preset", cfgmod.PRESETS)
def test_epochs_help_states_what_each_preset_trains(capsys, preset):
    """--epochs N: the help states each preset's stages and total, and they are what runs."""
    text = _help_text(capsys)
    assert "epochs per stage (presets only" not in text  # the old, false claim
    cfg = _config("--preset", preset, "--epochs", "3")
    per_stage = [s.epochs // 3 for s in cfg.stages]
    assert all(s.epochs == 3 * k for s, k in zip(cfg.stages, per_stage))
    total = f"({sum(per_stage)}xN in all)"
    claim = f"{preset}: {cli.preset_epoch_plan(preset)}"
    assert claim in text and claim.endswith(total), (claim, text)
    assert cfg.total_epochs == 3 * sum(per_stage)
    if len(cfg.stages) == 1:
        assert f"{preset}: 1 stage of {per_stage[0]}xN epochs" in text


def test_zero_or_negative_epochs_are_errors(tmp_path):
    for bad in ("0", "-2"):
        res = _cli("train", "--epochs", bad, "--print-config", data_dir=tmp_path)
        assert res.returncode == 2 and "--epochs" in res.stderr and "1 or more" in res.stderr
        assert "Traceback" not in res.stderr


def test_epochs_and_lr_with_a_config_file_are_refused_not_ignored(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(cfgmod.to_json(cfgmod.preset_config("Head only")))
    for extra in (("--epochs", "5"), ("--lr", "0.1"), ("--epochs", "5", "--lr", "0.1")):
        with pytest.raises(cfgmod.ConfigError) as refused:
            _config("--config", str(path), *extra)
        assert "not a config file's" in str(refused.value)
        assert all(flag in str(refused.value) for flag in extra if flag.startswith("--"))
    res = _cli("train", "--config", str(path), "--epochs", "5", data_dir=tmp_path)
    assert res.returncode == 2 and "--epochs" in res.stderr and "Traceback" not in res.stderr
    assert RunStore(tmp_path).list_runs() == []


def test_seed_beyond_torch_and_bad_config_files_fail_as_config_errors(tmp_path):
    res = _cli("train", "--seed", str(10**40), "--print-config", data_dir=tmp_path)
    assert res.returncode == 2 and "seed must be a whole number from 0 to" in res.stderr
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"data_path": "caf\xe9"}'.encode("latin-1"))
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 50_000 + "]" * 50_000)
    for path, message in ((latin1, "not UTF-8"), (nested, "nested more than")):
        res = _cli("train", "--config", str(path), data_dir=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert RunStore(tmp_path).list_runs() == []


def test_runs_into_a_closed_pipe_ends_cleanly(tmp_path):
    """`python -m core runs | head -1`: the reader leaves early; no BrokenPipeError."""
    RunStore(tmp_path).create_run(cfgmod.preset_config("Two-stage"), name="one")
    proc = subprocess.Popen([sys.executable, "-m", "core", "--data-dir", str(tmp_path), "runs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the child (still importing) writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err
    res = subprocess.run(f"set -o pipefail; {sys.executable} -m core --data-dir {tmp_path} runs | head -1",
                         shell=True, executable="/bin/bash", capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("id") and res.stderr == ""


def _runs_json(data_dir) -> dict[str, dict]:
    out = _cli("runs", "--json", data_dir=data_dir).stdout
    return {r["id"]: r for r in map(json.loads, out.splitlines())}


def test_submit_queues_in_the_background_cancel_and_resume(tmp_path, tiny_folder):
    """Issue 12.1: scripted sweeps queue runs without a browser and without waiting."""
    from tests.conftest import wait_for

    common = ("--data-source", "folder", "--data-path", str(tiny_folder), "--weights", "random",
              "--batch-size", "4", "--val-fraction", "0.25", "--threads", "1")
    long = _cli("submit", *common, "--epochs", "200", "--name", "long", data_dir=tmp_path)
    assert long.returncode == 0, long.stderr
    long_id = long.stdout.strip()
    short = _cli("submit", *common, "--name", "short", "--tag", "sweep", "--note", "queued",
                 data_dir=tmp_path)
    short_id = short.stdout.strip()
    store = RunStore(tmp_path)
    assert store.get_run(short_id).tags == ("sweep",) and store.get_run(short_id).note == "queued"
    assert {r.id for r in store.list_runs()} == {long_id, short_id}  # printed: the run ids
    wait_for(lambda: store.get_run(long_id).progress.phase == "training", 120, "training")
    records = _runs_json(tmp_path)
    assert set(records[long_id]) >= {"id", "name", "status", "pid", "error", "best_val_acc",
                                     "test_acc", "executor", "job_id"}
    assert records[long_id]["status"] == "running" and records[long_id]["pid"]
    assert records[long_id]["executor"] == "local"
    assert records[short_id]["status"] == "queued"
    assert _cli("cancel", long_id, data_dir=tmp_path).returncode == 0
    # The queue moves on by itself: no page, no command of ours starts the short run.
    wait_for(lambda: store.get_run(short_id).status == "finished", 240, "the queued run")
    assert _runs_json(tmp_path)[long_id]["status"] == "cancelled"
    refused = _cli("resume", short_id, data_dir=tmp_path)
    assert refused.returncode == 1 and "only failed or cancelled" in refused.stderr
    assert _cli("resume", long_id, data_dir=tmp_path).returncode == 0
    wait_for(lambda: store.get_run(long_id).status == "running", 60, "the resumed run")
    assert _cli("cancel", long_id, data_dir=tmp_path).returncode == 0
    wait_for(lambda: store.get_run(long_id).status == "cancelled", 120, "the second cancel")


def test_submit_refuses_bad_data_and_queues_nothing(tmp_path):
    res = _cli("submit", "--data-source", "folder", "--data-path", str(tmp_path / "nope"),
               "--weights", "random", data_dir=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr and res.stdout == ""
    assert RunStore(tmp_path).list_runs() == []
