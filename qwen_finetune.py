"""Fine-tune Qwen3 to extract offenders from Japanese news as JSON (Unsloth + TRL SFTTrainer).

    python qwen_finetune.py --mode single                     # tiny preset, CPU, minutes
    python qwen_finetune.py --mode two-stage --preset tiny
    torchrun --nproc_per_node=4 qwen_finetune.py --mode single --preset qwen3-30b-a3b
    python qwen_finetune.py --preset qwen3-30b-a3b --dry-run --nproc 4   # preflight report and memory plan
    python qwen_finetune.py export --adapter outputs/tiny/single/adapter --out exported --merge
    python qwen_finetune.py mlflow-replay outputs/qwen3-30b-a3b   # deliver what MLflow missed while down

Modes: `single` = bf16 LoRA, one stage over the negative-sampled mix;
`two-stage` = 4-bit NF4 QLoRA, stage1 on the positives then stage2 on the mix,
continuing the same adapter. The flow lives in finetune/pipeline.py.
"""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "qwen_finetune.py", __doc__))
