#!/usr/bin/env bash
# Set up and start the dashboard on http://localhost:8501 (localhost only by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
exec .venv/bin/streamlit run streamlit_app.py "$@"
