#!/usr/bin/env bash
# Create .venv with the pinned stack. A second run with unchanged requirements
# returns at once (the installed state is stamped with their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
inputs=(requirements.txt constraints.txt requirements-unsloth.txt scripts/setup.sh)
want=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
if [[ -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$want" ]]; then
  exit 0
fi
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python >= 3.10 is required"'
echo "setup: installing the pinned stack into $venv (first run takes several minutes)"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-unsloth.txt
echo "$want" > "$venv/.installed"
echo "setup: done ($("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
