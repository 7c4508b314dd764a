#!/usr/bin/env bash
# Install and run the demo on the embedded default (SQLite store, local MLflow store, in-process Prefect).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/shadowjudge demo "$@"
