#!/usr/bin/env bash
# Train with Axolotl in its own environment, after checking everything that
# would otherwise fail minutes in (or silently).
#   bash scripts/run_axolotl_train.sh [CONFIG] [NUM_GPUS=4] [--key=value ...]
# CONFIG defaults to axolotl_configs/qwen_finetune.yml; --key=value pairs are
# passed to Axolotl as config overrides (e.g. --max_steps=10).
# Steps: build/reuse Axolotl's venv; write missing data files (messages
# exports of prepared records); check the config (parity.py check-axolotl);
# launch (accelerate on GPUs, plain python on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-axolotl_configs/qwen_finetune.yml}"
gpus="${2:-4}"
shift $(( $# < 2 ? $# : 2 ))
overrides=("$@")
[[ -f "$config" ]] || { echo "error: config not found: $config" >&2; exit 1; }
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_GPUS must be a positive number, got '$gpus'" >&2; exit 1; }

venv=$(bash scripts/setup_axolotl.sh | tail -n 1)
py="$venv/bin/python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the plugins live in this repository
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

"$py" -m data_tools axolotl-data "$config"

read -r ds base < <("$py" -c 'import sys, yaml
c = yaml.safe_load(open(sys.argv[1])) or {}
print(c.get("deepspeed") or "-", c.get("base_model") or "-")' "$config")
# The deepspeed file must exist before a multi-minute model load.
[[ "$ds" == - || -f "$ds" ]] || { echo "error: $config: deepspeed file not found: $ds" >&2; exit 1; }

# tiny-dense / tiny-moe: the tiny models shipped in tiny/ (docs/tiny-models.md).
model_args=()
if [[ "$base" == tiny-dense || "$base" == tiny-moe ]]; then
  dir="$PWD/tiny/${base#tiny-}"
  overrides=("--base_model=$dir" "${overrides[@]}")
  model_args=(--model "$dir")
fi

"$py" parity.py check-axolotl "$config" --num-gpus "$gpus" "${model_args[@]}"

if command -v nvidia-smi >/dev/null 2>&1; then
  exec "$venv/bin/accelerate" launch --config_file axolotl_configs/accelerate_config.yaml \
       --num_processes "$gpus" -m axolotl.cli.train "$config" "${overrides[@]}"
fi
[[ "$gpus" == 1 ]] || echo "note: no GPU here; training in one CPU process" >&2
exec "$py" -m axolotl.cli.train "$config" "${overrides[@]}"
