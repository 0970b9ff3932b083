#!/usr/bin/env bash
# The main job on the embedded tiny default, on CPU: qwen_finetune.py in
# `single` mode with the `tiny` preset (synthetic Japanese news written to
# data/tiny/, the tiny MoE shipped in tiny/moe).
# It ends with a summary of the generation metrics on the validation split.
# A re-run finds the finished run and only prints its summary; pass
# --overwrite (or any other qwen_finetune.py argument) through to change that.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python qwen_finetune.py --mode single --preset tiny "$@"
