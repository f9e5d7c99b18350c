"""Names, notes, tags and group names have length limits at every entry point (the CLI, the
jobs API the pages submit through, the store, experiments), each message naming its limit,
all from one definition in core.config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core import config as cfgmod
from core.runs import jobs
from core.runs.store import RunStore
from tests.conftest import tiny_config

LONG_NAME = "n" * (cfgmod.NAME_MAX_CHARS + 1)
LONG_NOTE = "x" * (cfgmod.NOTE_MAX_CHARS + 1)
LONG_TAG = "t" * (cfgmod.TAG_MAX_CHARS + 1)


def test_limits_are_named_in_the_messages():
    errors = cfgmod.text_limit_errors(name=LONG_NAME, group=LONG_NAME, note=LONG_NOTE,
                                      tags=[LONG_TAG, *map(str, range(cfgmod.TAGS_MAX))])
    text = "; ".join(errors)
    assert f"name: {len(LONG_NAME)} characters; at most {cfgmod.NAME_MAX_CHARS} allowed" in text
    assert f"group: {len(LONG_NAME)} characters" in text
    assert f"at most {cfgmod.NOTE_MAX_CHARS:,} allowed" in text
    assert f"over {cfgmod.TAG_MAX_CHARS} characters" in text
    assert f"at most {cfgmod.TAGS_MAX} allowed" in text
    at_limits = cfgmod.text_limit_errors(name="n" * cfgmod.NAME_MAX_CHARS,
                                         note="x" * cfgmod.NOTE_MAX_CHARS,
                                         tags=["t" * cfgmod.TAG_MAX_CHARS] * cfgmod.TAGS_MAX)
    assert at_limits == []


def test_the_store_refuses_a_long_note_or_tag_and_keeps_the_old_ones(store, tiny_folder):
    run = store.create_run(tiny_config(tiny_folder), name="ok")
    store.set_note(run.id, "kept")
    store.set_tags(run.id, ["kept"])
    with pytest.raises(cfgmod.ConfigError, match=f"at most {cfgmod.NOTE_MAX_CHARS:,}"):
        store.set_note(run.id, LONG_NOTE)
    with pytest.raises(cfgmod.ConfigError, match=f"at most {cfgmod.TAG_MAX_CHARS}"):
        store.set_tags(run.id, [LONG_TAG])
    after = store.get_run(run.id)
    assert (after.note, after.tags) == ("kept", ("kept",))


def test_submitting_a_long_name_or_group_queues_nothing(store, tiny_folder, no_workers):
    cfg = tiny_config(tiny_folder)
    with pytest.raises(cfgmod.ConfigError, match=f"at most {cfgmod.NAME_MAX_CHARS}"):
        jobs.submit(store, cfg, name=LONG_NAME)
    with pytest.raises(cfgmod.ConfigError, match="group: "):
        jobs.submit_seeds(store, cfg, [1, 2], name="ok", group=LONG_NAME)
    # A name at the limit still takes its seed suffix.
    runs = jobs.submit_seeds(store, cfg, [1], name="n" * cfgmod.NAME_MAX_CHARS, group="g")
    assert runs[0].name.endswith(" seed 1")
    assert [r.id for r in store.list_runs()] == [runs[0].id]


def test_an_experiment_note_over_the_limit_is_refused(store):
    from core.analysis import experiments as ex

    with pytest.raises(ex.ExperimentError, match=f"at most {cfgmod.NOTE_MAX_CHARS:,}"):
        ex.annotate_experiment(store, "no-such-experiment", LONG_NOTE, [])


@pytest.mark.parametrize("option", [["--name", LONG_NAME], ["--note", LONG_NOTE],
                                    ["--tag", LONG_TAG]])
def test_the_command_line_refuses_long_text_before_a_run_exists(tmp_path, tiny_folder, option):
    res = subprocess.run([sys.executable, "-m", "core", "--data-dir", str(tmp_path / "runs"),
                          "submit", "--data-source", "folder", "--data-path", str(tiny_folder),
                          "--weights", "random", *option],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "at most" in res.stderr and "Traceback" not in res.stderr
    assert RunStore(tmp_path / "runs").list_runs() == []
