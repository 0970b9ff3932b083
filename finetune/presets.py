"""The presets, as data: each a layer of keys over FinetuneConfig's defaults (finetune/config.py resolves
defaults -> preset -> mode -> frozen -> config file -> command line)."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: synthetic corpus + tiny offline model, CPU, minutes.
    "tiny": {
        # the MoE: the architecture the user trains (tiny-dense stays available: model_name=tiny-dense)
        "model_name": "tiny-moe", "output_dir": "outputs/tiny", "dtype": "float32",
        "train_file": "data/tiny/hawks_train_curriculum.json",
        "stage1_train_file": "data/tiny/hawks_train.json",
        "stage2_train_file": "data/tiny/hawks_train_curriculum.json",
        "eval_file": "data/tiny/hawks_val_mixed.json", "eval_max_samples": 100,
        "max_length": 640, "gradient_checkpointing": False,
        "lora_r": 16, "lora_alpha": 32, "learning_rate": 4e-3, "num_epochs": 1.0,
        "stage1_learning_rate": 4e-3, "stage2_learning_rate": 2e-3,
        "micro_batch_size": 8, "gradient_accumulation_steps": 1, "warmup_ratio": 0.03,
        "logging_steps": 10, "eval_steps": 100, "save_steps": 100, "save_total_limit": 2,
        "eval_batch_size": 16,
        # on a CPU 16 decodes faster than 32 (less waiting on rows already ended; bench/generation_eval.py)
        "gen_eval_batch_size": 16,
    },
    # The user's production run (the Axolotl plan's settings): Qwen3-30B-A3B on 4 GPUs. Packed: on Qwen3's own
    # tokenizer an example of the full mix is 260 tokens on average (p95 341, longest 469; none reaches
    # 1536), so a 1536-token row holds ~5.6 of them (the dry run measures both). Accumulation 3 instead of the
    # plan's 16 keeps an optimizer step at about the plan's 64 examples (4 GPUs x 3 rows x ~5.6 = ~67).
    "qwen3-30b-a3b": {
        "model_name": "unsloth/Qwen3-30B-A3B-Instruct-2507", "output_dir": "outputs/qwen3-30b-a3b",
        "dtype": "bfloat16", "max_length": 1536, "micro_batch_size": 1, "packing": True,
        "gradient_accumulation_steps": 3, "learning_rate": 2e-4, "num_epochs": 1.5,
        "save_steps": 400, "save_total_limit": 3, "mlflow": True,
        # Evaluation kept to ~10% of the training time the dry run predicts (finetune/timing.py): a decode step
        # reads (and on PEFT's path refolds) every expert whatever the batch, and a batch decodes until its
        # longest answer ends, so fewer, larger batches on a fixed subset (the same records at every
        # evaluation, curves compare) every 800 steps (~54K examples); eval_loss on 500 records in batches of
        # 8. Score the whole validation set afterwards: `parity.py evaluate --adapter OUT/single/adapter ...`.
        "eval_steps": 800, "eval_max_samples": 500, "eval_batch_size": 8,
        "gen_eval_max_samples": 256, "gen_eval_batch_size": 0,
    },
}

# two-stage means 4-bit QLoRA (bf16 compute) unless the user says otherwise
MODE_DEFAULTS = {"two-stage": {"load_in_4bit": True, "dtype": "bfloat16"}, "single": {"load_in_4bit": False}}
