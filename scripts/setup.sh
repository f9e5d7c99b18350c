#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent; fast when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r "${1:-requirements.txt}"
