"""Forms that remember their values for the session (issue 20.4).

Streamlit drops a widget's session state once a page run does not draw it, so leaving New
run or Experiments and coming back reset the form to its defaults. A page keeps its form's
values under one key no widget owns, and puts them back before drawing its widgets:

    restore_form("new_run", defaults)   # first thing: kept values, else the defaults
    ...widgets...
    keep_form("new_run", defaults)      # last thing: what the widgets hold now

`defaults` names every key of the form (its widgets' keys) with its value on a first
visit; widgets then take their value from session state only (no `value=`/`default=`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import streamlit as st

# A run config handed to New run's form (Runs' "Run again with this config"), as JSON;
# New run loads it once.
CONFIG_FOR_NEW_RUN = "new_run_config_json"
KEPT = "_forms.kept."  # + form name: {widget key: value} the form held at its last run


def restore_form(name: str, defaults: Mapping[str, Any]) -> None:
    """Before the form's widgets: each key missing from session state gets the value the
    form held when last drawn this session, else its default."""
    kept = st.session_state.get(KEPT + name, {})
    for key, default in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = kept.get(key, default)


def keep_form(name: str, defaults: Mapping[str, Any]) -> None:
    """After the form's widgets: remember what they hold now."""
    st.session_state[KEPT + name] = {k: st.session_state[k] for k in defaults
                                     if k in st.session_state}
