#!/usr/bin/env bash
# Set up and start the dashboard on http://localhost:8501 (localhost only by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
# Say where runs go and what the UI may read, from the code's own definitions (no torch);
# refuse to serve the lab beyond this machine without sign-in or viewer mode (core.access).
.venv/bin/python - "$@" <<'PY'
import os
import sys

from core.access import refusal_at_start
from core.engine.paths import DATA_ROOTS_ENV, data_roots
from core.settings import ARTIFACTS_ENV, DATA_DIR_ENV, DB_ENV, StoreLayout, store_url

if refusal := refusal_at_start(".", sys.argv[1:], os.environ):
    sys.exit(refusal)

layout = StoreLayout.default()
if store_url():  # a database server: named without its password
    from sqlalchemy.engine import make_url
    runs_at = make_url(store_url()).render_as_string(hide_password=True)
else:
    runs_at = layout.database.resolve()
print(f"The run store is {runs_at} ({DB_ENV if store_url() else DATA_DIR_ENV}); checkpoints "
      f"and logs are stored in {layout.artifacts.resolve()} ({ARTIFACTS_ENV} or {DATA_DIR_ENV}).")
print("The UI may read data only under: " + ", ".join(str(r) for r in data_roots()))
print(f"  (to allow more: {DATA_ROOTS_ENV}=\"folder{os.pathsep}other folder\" bash scripts/start.sh)")
PY
exec .venv/bin/streamlit run streamlit_app.py "$@"
