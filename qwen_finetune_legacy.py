"""Restore path: the old two-stage 4-bit QLoRA run, with its hyperparameters frozen.

    torchrun --nproc_per_node=4 qwen_finetune_legacy.py      # the old production run
    python qwen_finetune_legacy.py --preset tiny              # the same recipe on the tiny model

It runs the same trainer as `qwen_finetune.py --mode two-stage` (finetune/);
only the defaults below differ, and they must not change: a regression test
compares this script's per-stage losses with reference values committed in
tests/reference/. The preset still chooses the model, data files and output
folder; any key can be overridden on the command line as usual.
"""

import sys

from finetune.cli import main

# From the original two-stage run where it says it: 4-bit NF4 QLoRA, LoRA r 16 / alpha 32,
# stage learning rates 2e-4 then 1e-4, sequence length 1536. The rest was not
# recorded and is our documented choice: micro-batch 1 x accumulation 16 (as
# in the Axolotl plan), one epoch per stage, linear decay with 3% warm-up,
# AdamW (torch), no weight decay, clip at 1.0, LoRA dropout 0, seed 3407.
FROZEN = {
    "mode": "two-stage",
    "load_in_4bit": True,
    "dtype": "bfloat16",
    "max_length": 1536,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["auto"],
    "lora_target_parameters": ["auto"],
    "train_router": False,
    "stage1_learning_rate": 2e-4,
    "stage2_learning_rate": 1e-4,
    "stage1_num_epochs": 1.0,
    "stage2_num_epochs": 1.0,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.03,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "packing": False,  # one example per row, as the old run trained
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 3407,
    "best_metric": "",  # the old run kept the last step's adapter
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "qwen_finetune_legacy.py", __doc__, fixed=FROZEN,
                  default_preset="qwen3-30b-a3b"))
