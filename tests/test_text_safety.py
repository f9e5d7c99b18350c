"""Text a user or a file supplied is shown as text: the one escaping rule of
core/views/text.py, and the places that use it outside the pages (the command line, the
exported model's README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.runs.store import RunStore
from core.views.text import html, md, visible
from tests.conftest import tiny_config

HOSTILE_NAME = "real\x1b]0;pwned\x07\rfake-id finished 0.999\nsecond row\u202eevil"


def test_visible_writes_control_and_bidi_characters_as_escapes():
    assert visible("a\x1b[2Jb\x07\r\n\t\x7f\x85") == "a\\x1b[2Jb\\x07\\r\\n\\t\\x7f\\x85"
    assert visible("abc\u202edef\u2066\u200b") == "abc\\u202edef\\u2066\\u200b"
    assert visible("line 1\nline 2", keep_newlines=True) == "line 1\nline 2"
    assert visible("naïve café 日本 🙂") == "naïve café 日本 🙂"  # ordinary text untouched


@pytest.mark.parametrize("markup", [
    "![](http://127.0.0.1:9/beacon)", "[click](http://x)", "<img src=x onerror=alert(1)>",
    "**bold** _it_ `code` # head", "$x^2$", ":material/home: :red[red]", "a\\b", "1. item",
])
def test_md_escapes_every_markdown_and_html_special(markup):
    escaped = md(markup)
    # Every ASCII punctuation character is backslash-escaped; removing the escapes gives the
    # text back exactly.
    import re

    assert re.sub(r"\\(.)", r"\1", escaped) == markup
    assert not re.search(r"(?<!\\)[!\[\]<>*_`#$:()]", escaped.replace("\\\\", "")), escaped


def test_md_keeps_a_notes_line_breaks_when_asked():
    assert md("a\nb", keep_newlines=True) == "a  \nb"
    assert md("a\nb") == "a\\\\nb"


def test_html_escapes_tags_quotes_and_makes_bidi_visible():
    assert html("<img src='x'>\u202e") == "&lt;img src=&#x27;x&#x27;&gt;\\u202e"


def _cli(*args, data_dir):
    return subprocess.run([sys.executable, "-m", "core", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=300)


def test_core_runs_escapes_control_characters_and_newlines_in_names(tmp_path, tiny_folder):
    store = RunStore(tmp_path / "runs")
    store.create_run(tiny_config(tiny_folder), name=HOSTILE_NAME)
    res = _cli("runs", data_dir=tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2, lines  # the header and one row: a newline in a name splits nothing
    assert not any(c in res.stdout for c in "\x1b\x07\r\u202e")
    assert lines[1].endswith("real\\x1b]0;pwned\\x07\\rfake-id finished 0.999\\nsecond row\\u202eevil")
    # --json keeps the exact name (JSON escapes control characters itself)
    res = _cli("runs", "--json", data_dir=tmp_path / "runs")
    assert json.loads(res.stdout)["name"] == HOSTILE_NAME
    assert "\x1b" not in res.stdout and "\u202e" not in res.stdout


def test_cli_messages_escape_a_hostile_run_id(tmp_path):
    res = _cli("cancel", "x\x1b[2J\ny", data_dir=tmp_path / "runs")
    assert res.returncode == 1
    assert "\x1b" not in res.stderr and "x\\x1b[2J\\ny" in res.stderr


def test_the_exported_readme_shows_the_run_name_as_text(finished_run):
    from dataclasses import replace

    from core.analysis.export import readme_text

    _, run = finished_run
    hostile = replace(run, name="![](http://127.0.0.1:9/beacon) <img src=x> # x\n## fake\u202e")
    heading = readme_text(hostile, ["a", "b"], {"resolution": 32, "mean": [0.5] * 3,
                                                "std": [0.5] * 3}, True, 1, 1).splitlines()[0]
    assert heading.startswith("# ") and heading.endswith(" — exported model")
    assert heading == f"# {md(hostile.name)} — exported model"
    assert "\\!\\[" in heading and "\\<img" in heading and "\\n\\#\\# fake" in heading
