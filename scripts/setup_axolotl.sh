#!/usr/bin/env bash
# Build Axolotl's virtual environment once, outside the repository, keyed by
# the hash of requirements-axolotl.txt; a re-run with the same file reuses it.
# Prints the environment's folder as its last line.
#   bash scripts/setup_axolotl.sh            # build if missing
#   bash scripts/setup_axolotl.sh --path     # print the folder; exit 1 if not built
#   AXOLOTL_VENV=DIR bash scripts/setup_axolotl.sh   # use DIR instead
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sha256sum < requirements-axolotl.txt | cut -c1-12)
cache="${QWEN_FINETUNE_CACHE:-$HOME/.cache/qwen-finetune}"
venv="${AXOLOTL_VENV:-$cache/axolotl-venv-$want}"
if [[ -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$want" ]]; then
  echo "$venv"
  exit 0
fi
if [[ "${1:-}" == "--path" ]]; then
  echo "Axolotl's environment is not built ($venv): run bash scripts/setup_axolotl.sh" >&2
  exit 1
fi
python=${PYTHON:-python3}
echo "setup_axolotl: installing Axolotl into $venv (first run: several minutes, ~2 GB)" >&2
mkdir -p "$(dirname "$venv")"
# One builder at a time (tests and CI may ask together).
exec 9>"$venv.lock"
flock 9
if [[ ! -f "$venv/.installed" || "$(cat "$venv/.installed")" != "$want" ]]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # Pinning torch in the constraints keeps every dependency on the CPU wheel.
  "$venv/bin/pip" install -q --disable-pip-version-check -r requirements-axolotl.txt \
      -c <(grep -E '^torch==' requirements-axolotl.txt) >&2
  echo "$want" > "$venv/.installed"
  echo "setup_axolotl: done ($("$venv/bin/python" -c 'import importlib.metadata as m; print("axolotl", m.version("axolotl"), "transformers", m.version("transformers"))'))" >&2
fi
echo "$venv"
