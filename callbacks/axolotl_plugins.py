"""Axolotl plugins that attach the shared callbacks to Axolotl's trainer.

    plugins:
      - callbacks.axolotl_plugins.GenerationEvalPlugin
      - callbacks.axolotl_plugins.MLflowLoggerPlugin
      - callbacks.axolotl_plugins.SeededLoraInitPlugin   # reproducible LoRA init (see the class)
      - callbacks.axolotl_plugins.RunSummaryPlugin       # only where neither of the first two is listed

Each of the first two also writes output_dir/run_summary.json at the end, in the format our trainer
writes (core/run_summary.py), so `parity.py compare` reads both stacks' runs alike.

Only the hooks they need: `get_input_args` (the YAML keys below, so Axolotl
validates them instead of dropping them), `add_callbacks_post_trainer` (the
callbacks need the trainer) and `post_train` (the run summary; for MLflow,
close the run after the last log). Imports in Axolotl's environment: transformers, pydantic
and this repository's callbacks/ and core/ only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from callbacks.generation_eval import GenerationEvalCallback
from callbacks.mlflow_logger import MLflowLoggerCallback
from core import run_summary
from core.distributed import world_size
from core.metrics import DEFAULT_FIELDS
from core.records import atomic_write_text, file_sha256
from core.redact import redact
from core.runinfo import library_versions
from core.formats import load_any_records


class GenerationEvalArgs(BaseModel):
    gen_eval_file: str | None = None  # default: the first test_datasets path
    gen_eval_max_samples: int = 0  # 0 = every record
    gen_eval_batch_size: int = 32
    gen_eval_max_new_tokens: int | None = None  # default: longest gold answer + margin
    # Axolotl evaluates before the first step whenever eval_steps is set; generating
    # then only scores the base model and delays the first step, so it is opt-in.
    gen_eval_on_start: bool = False


class MLflowLoggerArgs(BaseModel):
    # Not Axolotl's own mlflow_* keys: those also switch on transformers' MLflowCallback.
    mlflow_logger_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in output_dir
    mlflow_logger_experiment: str = "qwen-finetune"
    mlflow_logger_run_name: str | None = None
    mlflow_logger_require: bool = False


def _eval_file(cfg) -> str:
    if cfg.get("gen_eval_file"):
        return cfg["gen_eval_file"]
    tests = cfg.get("test_datasets") or []
    if not tests or not tests[0].get("path"):
        raise ValueError("GenerationEvalPlugin needs an evaluation file: set gen_eval_file, or test_datasets "
                         "with a path (e.g. the messages export of the validation set)")
    return tests[0]["path"]


class GenerationEvalPlugin(BasePlugin):
    trainer = None

    def get_input_args(self) -> str:
        return f"{__name__}.GenerationEvalArgs"

    def register(self, cfg):
        # Axolotl calls this when it reads the config: fail here, not after minutes of model loading.
        path = _eval_file(cfg)
        if cfg.get("gen_eval_file") and not Path(path).is_file():
            raise ValueError(f"GenerationEvalPlugin: gen_eval_file not found: {path}")

    def add_callbacks_post_trainer(self, cfg, trainer):
        records = load_any_records(_eval_file(cfg), DEFAULT_FIELDS)
        callback = GenerationEvalCallback(records, tokenizer=trainer.processing_class,
                                          batch_size=cfg.gen_eval_batch_size,
                                          max_samples=cfg.gen_eval_max_samples, seed=cfg.seed or 0,
                                          output_dir=cfg.output_dir, max_new_tokens=cfg.gen_eval_max_new_tokens,
                                          at_step_zero=cfg.gen_eval_on_start)
        callback.trainer = trainer  # gen_* go through trainer.log, so every logger sees them
        self.trainer = trainer
        return [callback]

    def post_train(self, cfg, model):
        write_run_summary(cfg, self.trainer)


class RunSummaryPlugin(BasePlugin):
    """run_summary.json alone, for a config with neither plugin above (a training-only run)."""
    trainer = None

    def add_callbacks_post_trainer(self, cfg, trainer):
        self.trainer = trainer
        return []

    def post_train(self, cfg, model):
        write_run_summary(cfg, self.trainer)


def write_run_summary(cfg, trainer) -> Path:
    """output_dir/run_summary.json in the format our trainer writes (core/run_summary.py), from the
    trainer's log; rank 0 only. Either plugin writes it, whichever runs alone or last."""
    out = Path(cfg.output_dir) / "run_summary.json"
    if trainer is not None and trainer.is_world_process_zero():
        state = trainer.state
        run_summary.write(out, run_summary.build(
            backend="axolotl", model=cfg.base_model, global_step=state.global_step, log_history=state.log_history,
            world_size=world_size(), libraries=library_versions(), python=sys.version.split()[0]))
    return out


def _data_identity(cfg) -> dict:
    out = {}
    for section in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(section) or []):
            path = ds.get("path")
            if path and Path(path).is_file():
                with open(path, "rb") as f:
                    lines = sum(1 for line in f if line.strip())
                out[f"{section}_{i}"] = {"path": path, "sha256": file_sha256(path), "rows": lines}
    return out


class MLflowLoggerPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.callback: MLflowLoggerCallback | None = None
        self.trainer = None

    def get_input_args(self) -> str:
        return f"{__name__}.MLflowLoggerArgs"

    def add_callbacks_post_trainer(self, cfg, trainer):
        config = {k: v for k, v in dict(cfg).items() if v is not None and k not in ("capabilities",
                                                                                   "env_capabilities")}
        self.callback = MLflowLoggerCallback(
            cfg.output_dir, tracking_uri=cfg.mlflow_logger_tracking_uri, experiment=cfg.mlflow_logger_experiment,
            run_name=cfg.mlflow_logger_run_name or Path(cfg.output_dir).name, require=cfg.mlflow_logger_require,
            params={"config": json.loads(json.dumps(config, default=str)), "backend": "axolotl",
                    "data": _data_identity(cfg), "libraries": library_versions()})
        self.trainer = trainer
        return [self.callback]

    def post_train(self, cfg, model):
        if self.callback is None or not self.trainer.is_world_process_zero():
            return
        out = Path(cfg.output_dir)
        summary = write_run_summary(cfg, self.trainer)
        config_copy = out / "axolotl_config.json"  # the resolved config, secrets redacted
        atomic_write_text(config_copy, [json.dumps(redact(self.callback.params.get("config", {})), indent=2,
                                                   ensure_ascii=False, default=str)])
        self.callback.log_new_artifacts(out)
        self.callback.end(files=(config_copy, summary))
        self.callback = None  # Axolotl calls post_train twice (after training and after saving): end once


class SeededLoraInitPlugin(BasePlugin):
    """Seeds the RNG with the config's `seed` right before Axolotl creates the LoRA adapter.

    Axolotl seeds only when it builds the trainer, after the adapter exists, so every run starts
    from a different random lora_A; measured on the tiny MoE, that alone moves the loss by 4-6%.
    Seeded here, the init is the one our trainer uses (transformers.set_seed(seed) before LoRA):
    runs repeat, and the two stacks start from identical weights."""

    def pre_lora_load(self, cfg, model):
        from transformers import set_seed

        set_seed(int(cfg.get("seed") or 42))
