#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh: a Python 3.11 venv in .venv with the project
# installed. torch goes in first, explicitly as the CPU build: pyproject's torch==2.13.0 is also met by a CUDA build
# (PEP 440 ignores the local label of 2.13.0+cu126), which pip would otherwise pull from PyPI (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}  # or a mirror of it

is_python311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

# The interpreter to build .venv with: $PYTHON when set (it must be 3.11), else the first 3.11 of python3.11, python3.
if [ -n "${PYTHON:-}" ]; then
  is_python311 "$PYTHON" || { echo "setup.sh: ShadowJudge needs Python 3.11; PYTHON=$PYTHON is not" >&2; exit 1; }
  PY=$PYTHON
else
  PY=
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && is_python311 "$candidate"; then PY=$candidate; break; fi
  done
  [ -n "$PY" ] || { echo "setup.sh: ShadowJudge needs Python 3.11: install it or set PYTHON=/path/to/python3.11" >&2
                    exit 1; }
fi
# A .venv left by another interpreter (a first run with Python 3.12) would fail every later install the same way.
if [ -e .venv ] && ! is_python311 .venv/bin/python; then
  echo "setup.sh: .venv is not a Python 3.11 environment: recreating it with $PY" >&2
  rm -rf .venv
fi

cpu_torch_installed() {
  .venv/bin/python - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys
import torch
sys.exit(torch.__version__.split("+")[0] != sys.argv[1] or torch.version.cuda is not None)
PY
}

torch_build() {
  .venv/bin/python -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")' 2>&1 | tail -1
}

stamp=.venv/.installed-$(sha1sum < pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  if ! cpu_torch_installed; then
    if ! .venv/bin/python -m pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
      echo "setup.sh: torch $TORCH_VERSION+cpu is not on pip's indexes here: installing it from $TORCH_CPU_INDEX" >&2
      .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    fi
    cpu_torch_installed || { echo "setup.sh: pip installed $(torch_build) in .venv, not the CPU build of torch" \
      "$TORCH_VERSION: remove it (.venv/bin/python -m pip uninstall -y torch) and rerun" >&2; exit 1; }
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"  # its torch==2.13.0 is the CPU build installed above
  rm -f .venv/.installed-*; touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
  MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
