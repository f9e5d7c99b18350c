#!/usr/bin/env bash
# Set up (dev and cluster requirements) and run the whole test suite, with PostgreSQL and a
# Ray head started on loopback for the cluster tests (scripts/with_services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
exec bash scripts/with_services.sh .venv/bin/python -m pytest "$@"
