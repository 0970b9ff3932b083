"""`parity.py check-axolotl CONFIG.yml`: what Axolotl would silently ignore or get wrong.

Axolotl drops unknown keys, skips plugins that do not import (with one log
line), and a MoE LoRA config can train attention only without a word. This
check asks Axolotl itself, in its own environment (`axolotl_probe`), and
adds the checks that need files: data and DeepSpeed paths, and DeepSpeed
batch sizes against micro_batch_size x gradient_accumulation_steps x GPUs.
One line per problem; errors make the exit code 1, warnings do not.
"""

from __future__ import annotations

import difflib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from finetune.config import deepspeed_problems
from finetune.config_schema import EXPERT_TARGETS
from finetune.model import resolve_model_path, shipped_model_config
from parity_tools.axolotl_env import REPO, axolotl_env, axolotl_python

# Keys users carry over from other tools, with what Axolotl calls them.
RENAMED_KEYS = {
    "datasets_eval": "test_datasets (same schema as datasets) or val_set_size",
    "evaluation_strategy": "eval_strategy",
    "max_seq_length": "sequence_len",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "lora_rank": "lora_r",
}
OUR_PLUGINS = {"generation_eval": "callbacks.axolotl_plugins.GenerationEvalPlugin",
               "mlflow": "callbacks.axolotl_plugins.MLflowLoggerPlugin"}


@dataclass
class Problem:
    level: str  # "error" or "warning"
    key: str
    text: str

    def line(self, config: str) -> str:
        return f"{self.level}: {config}: {self.key}: {self.text}"


def model_config_file(raw: dict, model: str | None) -> Path | None:
    """config.json of --model, of a local base_model (tiny-moe / tiny-dense: the folders in tiny/, as
    scripts/run_axolotl_train.sh passes them), or one this repository ships."""
    for candidate in (model, raw.get("base_model")):
        candidate = resolve_model_path(str(candidate)) if candidate else candidate
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate) / "config.json"
    return shipped_model_config(str(raw.get("base_model", "")))


def probe(config: Path, model_config: Path | None) -> dict:
    cmd = [str(axolotl_python()), "-m", "parity_tools.axolotl_probe", str(config.resolve())]
    if model_config:
        cmd.append(str(model_config.resolve()))
    done = subprocess.run(cmd, capture_output=True, text=True, env=axolotl_env(), cwd=config.parent)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the Axolotl probe failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def key_problems(raw: dict, found: dict) -> list[Problem]:
    problems = []
    known = set(found["top_level_keys"])
    for key in raw:
        if key in known:
            continue
        if key in RENAMED_KEYS:
            hint = f"use {RENAMED_KEYS[key]}"
        else:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'?" if close else "remove it, or add the plugin that declares it"
        problems.append(Problem("error", key, f"unknown to Axolotl, so it is silently ignored; {hint}"))
    ds_known = set(found["dataset_keys"])
    for section in ("datasets", "test_datasets"):
        for i, ds in enumerate(raw.get(section) or []):
            if not isinstance(ds, dict):
                continue
            for key in ds:
                if key not in ds_known:
                    problems.append(Problem("error", f"{section}[{i}].{key}",
                                            "not a dataset key Axolotl knows, so it is silently ignored"))
    return problems


def template_and_type_problems(raw: dict, found: dict) -> list[Problem]:
    problems = []
    valid = found["chat_templates"]
    places = [("chat_template", raw.get("chat_template"))] + [
        (f"{s}[{i}].chat_template", ds.get("chat_template"))
        for s in ("datasets", "test_datasets") for i, ds in enumerate(raw.get(s) or []) if isinstance(ds, dict)]
    for key, value in places:
        if value is not None and value not in valid:
            close = difflib.get_close_matches(str(value), valid, n=2, cutoff=0.5)
            problems.append(Problem("error", key, f"'{value}' is not a valid Axolotl chat template (Axolotl "
                                    f"stops with a validation error); use tokenizer_default (the model's own "
                                    f"template, as our trainer does){'; close: ' + ', '.join(close) if close else ''}"))
    for section in ("datasets", "test_datasets"):
        for i, ds in enumerate(raw.get(section) or []):
            if isinstance(ds, dict) and not found["dataset_types"].get(str(ds.get("type")), True):
                problems.append(Problem("error", f"{section}[{i}].type",
                                        f"unknown dataset type '{ds.get('type')}'; for the `messages` export of "
                                        "`python -m data_tools convert --to messages` use type: chat_template "
                                        "with field_messages: messages and roles_to_train: [assistant]"))
    return problems


def plugin_problems(found: dict) -> list[Problem]:
    problems = []
    for name, error in found["plugin_errors"].items():
        hint = ""
        if ":" in name:
            hint = "; Axolotl wants package.module.ClassName (dots, no colon)"
        for word, ours in OUR_PLUGINS.items():
            if word in name.lower():
                hint += f"; this repository's plugin is {ours}"
        problems.append(Problem("error", "plugins", f"'{name}' {error}{hint}"))
    return problems


def lora_problems(raw: dict, lora: dict | None, model_config: Path | None) -> list[Problem]:
    if not raw.get("adapter"):
        return []
    if lora is None:
        return [Problem("warning", "base_model", "no model config found, LoRA targets not checked: pass "
                        "--model DIR (a folder with config.json)")]
    if "trainable_by_category" not in lora:
        return [Problem("error", "lora_target_modules", f"Axolotl's LoRA config fails on {model_config.name}: "
                        f"{lora.get('error')}")]
    trained = lora["trainable_by_category"]
    explicit = ", ".join(EXPERT_TARGETS)
    problems = []
    if lora["experts_in_model"] and not trained["experts"]:
        problems.append(Problem("error", "lora_target_modules", f"the LoRA targets reach no fused expert of "
                                f"this {lora['model_type']} model, only attention trains; add "
                                f"lora_target_parameters: [{explicit}] (with lora_dropout: 0)"))
    elif lora["experts_in_model"] and not lora["target_parameters"]:
        problems.append(Problem("error", "lora_target_modules", f"no lora_target_parameters: the experts are "
                                f"reached only because this PEFT renames module names to the fused parameters "
                                f"{lora.get('target_parameters_after_peft')}; with another PEFT version the same "
                                f"config trains attention only. State lora_target_parameters: [{explicit}]"))
    if lora["experts_in_model"] and "output_router_logits" not in (raw.get("model_config") or {}):
        problems.append(Problem("warning", "model_config", "the MoE router load-balancing loss is left to the "
                                "checkpoint's config; state it so both stacks train the same loss: "
                                "model_config: {output_router_logits: false} (qwen_finetune.py's default, "
                                "router_aux_loss_coef=0), or true with the same router_aux_loss_coef"))
    if trained["router"]:
        problems.append(Problem("warning", "lora_target_modules", "the MoE router (mlp.gate) is trained: a "
                                "target named 'gate' reaches it. Leave it out unless that is intended"))
    if trained["experts"] and trained["experts"] > 5 * max(trained["attention"], 1):
        problems.append(Problem("warning", "lora_r", f"{trained['experts']:,} trainable expert LoRA "
                                f"parameters (each expert has its own pair) against {trained['attention']:,} in "
                                "attention: consider a lower expert rank via lora_rank_pattern"))
    return problems


def file_problems(raw: dict, config: Path, num_gpus: int) -> list[Problem]:
    problems = []
    base = config.parent
    for section in ("datasets", "test_datasets"):
        for i, ds in enumerate(raw.get(section) or []):
            path = ds.get("path") if isinstance(ds, dict) else None
            if path and not _resolve(path, base).exists() and ("/" in path or Path(path).suffix):
                problems.append(Problem("warning", f"{section}[{i}].path", f"{path} does not exist yet "
                                        "(scripts/run_axolotl_train.sh prepares it)"))
    if raw.get("deepspeed"):
        ds_path = _resolve(str(raw["deepspeed"]), base)
        for text in deepspeed_problems(str(ds_path), int(raw.get("micro_batch_size") or 1),
                                       int(raw.get("gradient_accumulation_steps") or 1), num_gpus):
            problems.append(Problem("error", "deepspeed", text))
    return problems


def _resolve(path: str, base: Path) -> Path:
    """Axolotl opens a relative path from its working directory, which depends on how it is launched (our
    launcher: the repository root); a config kept elsewhere usually names files beside it. The first of
    working directory, the config's folder and the repository root that has it (else as written)."""
    p = Path(path)
    if p.is_absolute():
        return p
    return next((c for c in (Path.cwd() / p, base / p, REPO / p) if c.exists()), p)


def other_problems(raw: dict, found: dict, reported: set[str]) -> list[Problem]:
    problems = []
    for err in found["validation_errors"]:
        key = err["loc"].split(".")[0]
        if key not in reported:
            reported.add(key)
            problems.append(Problem("error", key or "config", f"Axolotl's validation: {err['msg']}"))
    if raw.get("eval_steps") and (raw.get("test_datasets") or raw.get("val_set_size")):
        problems.append(Problem("warning", "eval_steps", "Axolotl also evaluates before the first step "
                                "(eval_on_start, not configurable): the bar stays at 0% while the whole eval "
                                f"set runs at eval_batch_size {raw.get('eval_batch_size') or 'default'}; keep "
                                "the eval set small or raise eval_batch_size"))
    if raw.get("trust_remote_code"):
        problems.append(Problem("warning", "trust_remote_code", "runs code from the model repository; "
                                "Qwen3 needs none, set it to false"))
    if any("MLflowLoggerPlugin" in str(p) for p in raw.get("plugins") or []) and (
            raw.get("use_mlflow") or raw.get("mlflow_experiment_name")):
        problems.append(Problem("warning", "mlflow_experiment_name", "also turns on transformers' own MLflow "
                                "callback: every metric is logged twice; configure MLflowLoggerPlugin's "
                                "mlflow_logger_* keys only"))
    return problems


def check(config: Path, model: str | None = None, num_gpus: int = 4) -> list[Problem]:
    import yaml

    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        return [Problem("error", "config", "expected a mapping of key: value at the top level")]
    model_config = model_config_file(raw, model)
    found = probe(config, model_config)
    problems = (key_problems(raw, found) + template_and_type_problems(raw, found) + plugin_problems(found)
                + lora_problems(raw, found.get("lora"), model_config) + file_problems(raw, config, num_gpus))
    reported = {p.key.split("[")[0].split(".")[0] for p in problems}
    return problems + other_problems(raw, found, reported)
