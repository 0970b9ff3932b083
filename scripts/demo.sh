#!/usr/bin/env bash
# The embedded tiny default, end to end on CPU: synthetic corpus -> validate ->
# negative-sampling merge -> chat export -> token statistics with the tiny
# model's tokenizer -> scoring. Until the trainer lands (qwen_finetune.py),
# the scored predictions are the "always answer no offenders" baseline, which
# shows what each metric reports for a model that never extracts anything.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=${DEMO_DIR:-outputs/demo}
data="$out/data"
mkdir -p "$out"
$py -m data_tools synth --out-dir "$data" --positives 2000 --negatives 2000 --heldout-negatives 200 \
    --val-positives 200 --hard 100 --force
$py -m data_tools validate "$data"/hawks_train.json "$data"/hawks_val.json "$data"/person_dummy_2025-12-23-1817.json
$py -m data_tools prepare --positives "$data"/hawks_train.json --val "$data"/hawks_val.json \
    --negatives "$data"/person_dummy_2025-12-23-1817.json --num-negatives 2000 \
    --out "$data"/hawks_train_curriculum.json --val-out "$data"/hawks_val_mixed.json --force
$py -m data_tools convert "$data"/hawks_train_curriculum.json "$data"/train_messages.jsonl --to messages --force
models=$($py -m data_tools tiny-model | tail -n 2)
echo "$models"
dense=$(echo "$models" | awk '/^dense:/ {print $2}')
$py -m data_tools stats "$data"/hawks_train_curriculum.json --val "$data"/hawks_val_mixed.json --tokenizer "$dense"
$py - "$data"/hawks_val_mixed.json "$out"/baseline_predictions.jsonl <<'PY'
import json, sys
from data_tools.records import load_records, write_rows
records = load_records(sys.argv[1])
write_rows(sys.argv[2], [{"prediction": '{"offenders": []}'} for _ in records])
PY
echo "metrics of the always-empty baseline on $data/hawks_val_mixed.json:"
$py parity.py score --gold "$data"/hawks_val_mixed.json --pred "$out"/baseline_predictions.jsonl
echo "demo finished: data in $data, tiny models in $(dirname "$dense")"
