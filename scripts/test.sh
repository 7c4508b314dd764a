#!/usr/bin/env bash
# Install and run the test suite. Uses the PostgreSQL server on 127.0.0.1:5432 when it answers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# System packages the real-part tests drive (nginx as a weighted gateway, Chromium for the MLflow UI check).
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }) \
    || echo "warning: could not install ${missing[*]}; tests needing them will say so" >&2
fi
if [ -z "${SHADOWJUDGE_TEST_PG_URL:-}" ]; then
  if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    command -v pg_ctlcluster >/dev/null && pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    export SHADOWJUDGE_TEST_PG_URL=postgresql+psycopg2://postgres@127.0.0.1:5432/postgres
  fi
fi
exec .venv/bin/python -m pytest "$@"
