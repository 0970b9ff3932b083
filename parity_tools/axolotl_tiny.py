"""Axolotl training configs derived from the shipped tiny one (axolotl_configs/tiny_cpu.yml): what the
parity run and the throughput bench give Axolotl, so both compare against the same settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.config_schema import ATTENTION_TARGETS, DENSE_MLP_TARGETS
from parity_tools.axolotl_env import REPO

AXOLOTL_TINY = REPO / "axolotl_configs" / "tiny_cpu.yml"


def tiny_axolotl_training_config(path: Path, model_dir: str, output_dir: Path, **changes) -> Path:
    """axolotl_configs/tiny_cpu.yml for training only (no evaluation, no plugins unless given),
    on the built tiny model, written to `path`."""
    cfg = yaml.safe_load(AXOLOTL_TINY.read_text(encoding="utf-8"))
    for key in ("plugins", "test_datasets", "eval_steps", "gen_eval_max_samples", "gen_eval_batch_size",
                "mlflow_logger_experiment"):
        cfg.pop(key, None)
    cfg.update(base_model=model_dir, output_dir=str(output_dir), dataset_prepared_path=str(output_dir) + "_prepared",
               val_set_size=0, **changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # a change of None removes the key
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def axolotl_model_changes(model: str, router_aux_loss_coef: float = 0.0) -> dict:
    """What tiny_cpu.yml (written for tiny-moe, with Axolotl's own MoE settings: attention as modules,
    the fused experts as `lora_target_parameters`) needs for `model`, and our router aux-loss
    decision, passed through the model config (Axolotl adds that loss only where the forward does)."""
    if model == "tiny-dense":
        return {"lora_target_modules": list(ATTENTION_TARGETS + DENSE_MLP_TARGETS), "lora_target_parameters": None,
                "model_config": None}
    return {"model_config": {"output_router_logits": router_aux_loss_coef > 0,
                             "router_aux_loss_coef": router_aux_loss_coef}}
