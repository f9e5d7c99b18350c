"""One rule for showing text a user or a file supplied (run names, notes, tags, group and
experiment names, class folder names, error messages quoting them): as text, never as markup.

- `visible(text)`: control characters (C0, DEL, C1) and the invisible characters that reorder
  or hide text (bidi embeddings, overrides and isolates, zero-width characters) become their
  escape, `\\x1b`, `\\u202e`, so a right-to-left override cannot reverse a name, an escape
  sequence cannot rewrite a terminal line, and a newline cannot split a row. For terminals,
  logs and plain-text files.
- `md(text)`: `visible`, then every ASCII punctuation character backslash-escaped (CommonMark
  makes any escaped punctuation literal): no image, link syntax, emphasis, heading, HTML tag,
  `$` formula, `:material/...:` icon or `:red[...]` colour survives. (A bare URL in the text
  is still shown as a link by Streamlit's GitHub-flavoured markdown, which finds URLs after
  escapes are resolved: a click, never a request on its own.) For Streamlit markdown and
  for widget labels (which Streamlit parses as markdown).
- `html(text)`: `visible`, then HTML-escaped: for the few places that build HTML
  (`unsafe_allow_html`).

Never imports streamlit: pages and core writers (the CLI, the exported README) share it.
"""

from __future__ import annotations

import html as _html
import re
import unicodedata

# Characters that change how the text around them is laid out or hide what is there, beyond
# the control characters: bidi marks, embeddings, overrides and isolates; zero-width
# spaces and joiners; the word joiner and invisible operators; the BOM.
_INVISIBLE = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# CommonMark: "Any ASCII punctuation character may be backslash-escaped".
_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")


def _shown(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _hidden(ch: str, keep_newlines: bool) -> bool:
    if ch == "\n" and keep_newlines:
        return False
    return ch in _INVISIBLE or unicodedata.category(ch) == "Cc"


def visible(text: object, keep_newlines: bool = False) -> str:
    """`text` with every control and layout-changing invisible character written as its
    escape (`\\n`, `\\x1b`, `\\u202e`). `keep_newlines` leaves line breaks of multi-line text
    (a note) as they are."""
    s = str(text)
    return "".join(_shown(c) if _hidden(c, keep_newlines) else c for c in s)


def md(text: object, keep_newlines: bool = False) -> str:
    """`text` for Streamlit markdown or a widget label: shown exactly as written, never
    parsed as markdown or HTML. With `keep_newlines`, line breaks stay line breaks."""
    escaped = _MD_SPECIAL.sub(r"\\\1", visible(text, keep_newlines))
    return escaped.replace("\n", "  \n") if keep_newlines else escaped


def html(text: object) -> str:
    """`text` inside HTML a page builds itself: escaped, quotes included."""
    return _html.escape(visible(text), quote=True)
