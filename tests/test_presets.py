"""A preset is one RunConfig, whichever door it comes in by: the New run page, the command
line (`python -m core train --preset X --print-config`) and the Experiments page build the
identical JSON for every preset (the "Gradual" stage 2 LR once differed: 0.003 from New
run, 0.00333 elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core import config as cfgmod
from core.analysis import experiments as ex

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # per script run on a shared 2-core box


def from_new_run(folder: Path, preset: str) -> dict:
    """The config New run would submit: its "Config as JSON" block."""
    at = AppTest.from_file(str(ROOT / "app_pages" / "new_run.py"), default_timeout=TIMEOUT_S)
    at.run()
    at.selectbox(key="new_run.preset").set_value(preset).run()
    at.radio(key="new_run.data_source").set_value("folder").run()
    at.text_input(key="new_run.data_path").input(str(folder)).run()
    at.radio(key="new_run.weights").set_value("random").run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    [block] = [c for c in at.code if c.language == "json"]
    return json.loads(block.value)


def from_cli(folder: Path, preset: str, data_dir: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "core", "--data-dir", str(data_dir), "train",
                          "--preset", preset, "--data-source", "folder", "--data-path",
                          str(folder), "--weights", "random", "--print-config"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def from_experiments(folder: Path, store) -> dict[str, dict]:
    """The configs the Experiments page queues for a one-seed experiment of every preset,
    by preset name."""
    at = AppTest.from_file(str(ROOT / "app_pages" / "experiments.py"), default_timeout=TIMEOUT_S)
    at.run()
    at.multiselect(key="experiments.presets").set_value(list(cfgmod.PRESETS))
    at.selectbox(key="experiments.data").set_value("Another folder…").run()
    at.text_input(key="experiments.path").input(str(folder))
    at.number_input(key="experiments.cap").set_value(0)  # New run's default: all images
    # New run's and the CLI's epochs per stage (Experiments defaults to a bigger budget).
    at.number_input(key="experiments.epochs").set_value(cfgmod.PRESET_EPOCHS)
    at.selectbox(key="experiments.weights").set_value("random")
    at.number_input(key="experiments.seeds").set_value(1).run()
    at.button(key="experiments.submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [exp] = ex.list_experiments(store)
    return {r.name: r.config if isinstance(r.config, dict) else cfgmod.to_dict(r.config)
            for r in exp.recipes}


def test_a_preset_is_the_same_config_from_every_entry_point(app_env, no_workers, tiny_folder,
                                                           tmp_path):
    folder = tiny_folder.resolve()  # the pages resolve typed paths; the CLI takes them as given
    experiments = from_experiments(folder, app_env)
    assert list(experiments) == list(cfgmod.PRESETS)
    for preset in cfgmod.PRESETS:
        page = from_new_run(folder, preset)
        cli = from_cli(folder, preset, tmp_path / "cli-store")
        assert page == cli, preset
        assert experiments[preset] == cli, preset
        # ...and it is the preset itself, exact learning rates included.
        assert cfgmod.from_dict(cli) == cfgmod.preset_config(
            preset, data_source="folder", data_path=str(folder), weights="random"), preset
