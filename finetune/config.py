"""The fine-tuning configuration resolved and checked: the keys are finetune/config_schema.py (type,
default, description), the presets finetune/presets.py.

Resolution order (later wins): dataclass defaults < preset < mode < a restore path's frozen values <
--config YAML < key=value overrides < dedicated flags. Everything is checked before any model loads
(`validate`), with messages that say what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from core.distributed import world_size
from core.errors import ConfigError
from finetune.presets import MODE_DEFAULTS, PRESETS

from finetune.config_schema import MODES, FinetuneConfig, field_names


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, field_names(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help-config for the list"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _coerce(key: str, raw: Any, where: str) -> Any:
    """Turn a YAML value or a command-line string into the field's type."""
    default = getattr(FinetuneConfig(), key)
    kind = type(default)
    try:
        if isinstance(raw, str) and kind is not str:
            if kind is bool:
                low = raw.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                return low in ("true", "1", "yes")
            if kind is list:
                return [x.strip() for x in raw.split(",") if x.strip()]
            return kind(raw)
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if kind is bool and not isinstance(raw, bool) or kind is list and not isinstance(raw, list) \
                or kind in (int, float, str) and (not isinstance(raw, kind) or isinstance(raw, bool)):
            raise ValueError(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, got {raw!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value (e.g. learning_rate=1e-4)")
        out[key.strip().replace("-", "_")] = value
    return out


def resolve(mode: str | None, preset: str | None, config_file: str | None,
            overrides: dict[str, Any], flags: dict[str, Any], fixed: dict[str, Any] | None = None,
            *, dry_run: bool = False, world: int | None = None, default_preset: str = "tiny") -> FinetuneConfig:
    """Build the config from every source (see the module doc), then validate it.

    `fixed`: a restore path's frozen values, applied over the preset. `dry_run`, `world`: see validate."""
    fixed = fixed or {}
    file_values = load_yaml(config_file) if config_file else {}
    # the same order as every other key: --preset > preset= > the config file > the script's default
    preset = preset or overrides.get("preset") or file_values.get("preset") or default_preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; valid presets: {', '.join(PRESETS)}")
    mode = mode or overrides.get("mode") or file_values.get("mode") or fixed.get("mode") or "single"
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}'; valid modes: {', '.join(MODES)}")
    layers = [(f"preset {preset}", PRESETS[preset]), (f"mode {mode}", MODE_DEFAULTS[mode]),
              ("frozen defaults", fixed)]
    if config_file:
        layers.append((config_file, file_values))
    layers.append(("command line", overrides))
    layers.append(("command line", {k: v for k, v in flags.items() if v is not None}))
    values: dict[str, Any] = {}
    defaults = FinetuneConfig()
    user_changed: dict[str, str] = {}  # key -> the file or command line that changed it
    for where, layer in layers:
        for key, raw in layer.items():
            if key not in field_names():
                raise _unknown_key(key, where)
            value = _coerce(key, raw, where)
            if where == config_file or where == "command line":
                if value != values.get(key, getattr(defaults, key)):
                    user_changed[key] = where
            values[key] = value
    check_mode_keys(mode, user_changed)
    values.update(mode=mode, preset=preset)
    cfg = FinetuneConfig(**values)
    validate(cfg, dry_run=dry_run, world=world)
    return cfg


# What each mode reads in place of the other's keys: a key set for the mode that ignores it is refused.
# The keys each mode reads for a stage's data, learning rate and epochs (disjoint): a key of the other mode
# that the file or command line set is refused.
MODE_KEYS = {
    "single": {"train_file": ("train_file",), "learning_rate": ("learning_rate",), "num_epochs": ("num_epochs",)},
    "two-stage": {"train_file": ("stage1_train_file", "stage2_train_file"),
                  "learning_rate": ("stage1_learning_rate", "stage2_learning_rate"),
                  "num_epochs": ("stage1_num_epochs", "stage2_num_epochs")},
}


def check_mode_keys(mode: str, user_changed: dict[str, str]) -> None:
    """A key the file or command line changed that the chosen mode never reads (two-stage trains each stage
    with its own file, rate and epochs; single with train_file, learning_rate, num_epochs) stops the run:
    silently ignored, it would train something other than what was asked for."""
    other = "two-stage" if mode == "single" else "single"
    for what, keys in MODE_KEYS[other].items():
        for key in keys:
            if key in user_changed:
                raise ConfigError(f"{user_changed[key]}: '{key}' is not used by --mode {mode}, which reads "
                                  f"{' and '.join(MODE_KEYS[mode][what])} instead; set that, or drop '{key}'")


def data_files(cfg: FinetuneConfig) -> dict[str, str]:
    files = {"train_file": cfg.train_file} if cfg.mode == "single" else {
        "stage1_train_file": cfg.stage1_train_file, "stage2_train_file": cfg.stage2_train_file}
    if cfg.eval_file:  # empty: no evaluation
        files["eval_file"] = cfg.eval_file
    for key in ("rehearsal_data", "general_eval_file"):
        if getattr(cfg, key):
            files[key] = getattr(cfg, key)
    return files


def missing_data(cfg: FinetuneConfig) -> list[str]:
    """One message per data file that does not exist: which key, which file, how to make it."""
    out = []
    for key, path in data_files(cfg).items():
        tiny_generated = cfg.preset == "tiny" and Path(path).parts[:2] == ("data", "tiny")
        if not tiny_generated and not Path(path).is_file():  # the tiny preset writes its own on first use
            out.append(f"{key}: file not found: {path}. Create it with `python -m data_tools synth` / "
                       f"`prepare`, or point {key}=... at your data")
    return out


def check_no_expert_dropout(cfg: FinetuneConfig, why: str) -> None:
    """PEFT has no dropout for LoRA on parameters (a MoE's fused experts): lora_dropout must be 0 then.
    The one rule, checked as soon as it can be known: when the config names parameter targets, before
    loading a MoE that `auto` targets (its config says so), and on the loaded model."""
    if cfg.lora_dropout != 0:
        raise ConfigError(f"lora_dropout must be 0, got {cfg.lora_dropout}: {why}, and PEFT cannot apply "
                          "dropout to LoRA on fused parameters. Set lora_dropout=0, or lora_target_parameters= "
                          "(empty) to leave the experts out")


def validate(cfg: FinetuneConfig, *, dry_run: bool = False, world: int | None = None) -> None:
    """Every check that needs no model: fail fast, before minutes of loading.

    `dry_run`: missing data files do not stop it (the preflight reports them, see missing_data).
    `world`: the number of ranks to check against (default: this process's world size)."""
    check_values(cfg)
    check_combinations(cfg)
    check_best_metric(cfg)
    missing = missing_data(cfg)
    if missing and not dry_run:
        raise ConfigError(missing[0])
    if deepspeed_file(cfg):
        check_deepspeed(cfg, world or world_size())


def check_values(cfg: FinetuneConfig) -> None:
    """Each key alone, by the rule beside its field (finetune/config_schema.py); then the epochs, whose rule
    spans keys (an epoch count of 0 is fine where max_steps decides the length)."""
    for f in dataclasses.fields(FinetuneConfig):
        check = f.metadata["check"]
        problem = check(f.name, getattr(cfg, f.name)) if check else None
        if problem:
            raise ConfigError(problem)
    if cfg.max_steps < 1 and min(cfg.num_epochs, cfg.stage1_num_epochs, cfg.stage2_num_epochs) <= 0:
        raise ConfigError("epochs must be > 0 (or set max_steps)")


def check_combinations(cfg: FinetuneConfig) -> None:
    """Keys that are valid alone but cannot go together."""
    if cfg.attn_implementation.startswith("flash_attention") and cfg.dtype == "float32":
        raise ConfigError(f"attn_implementation={cfg.attn_implementation} computes in bfloat16/float16 only, "
                          "and dtype is float32: set dtype=bfloat16, or attn_implementation=auto")
    if cfg.packing and cfg.group_by_length:
        raise ConfigError("packing and group_by_length both remove padding; packed rows are already full, "
                          "so choose one: packing=true group_by_length=false (or packing=false)")
    if cfg.lora_target_parameters not in ([], ["auto"]):
        check_no_expert_dropout(cfg, "lora_target_parameters names fused experts")
    if cfg.load_in_4bit and cfg.dtype == "float32":
        raise ConfigError("load_in_4bit needs a 16-bit compute dtype: set dtype=bfloat16 "
                          "(or load_in_4bit=false)")
    if cfg.load_in_4bit and deepspeed_file(cfg):
        raise ConfigError("4-bit QLoRA with DeepSpeed is not supported by this trainer: the frozen "
                          "4-bit weights cannot be sharded by ZeRO. Use --mode single (bf16 LoRA) with "
                          "DeepSpeed, or drop --deepspeed")
    if cfg.rehearsal_ratio > 0 and not cfg.rehearsal_data:
        raise ConfigError("rehearsal_ratio > 0 needs rehearsal_data=FILE (general text or instruction data)")


def check_best_metric(cfg: FinetuneConfig) -> None:
    from finetune.selection import check_metric, parse_constraint

    if cfg.best_metric_constraint and not cfg.best_metric:
        raise ConfigError("best_metric_constraint needs a best_metric to choose by (e.g. "
                          "best_metric=gen_offender_name_set_f1), or leave both empty")
    try:
        if cfg.best_metric:
            check_metric(cfg.best_metric)
        constraints = [parse_constraint(text) for text in cfg.best_metric_constraint]
    except ValueError as e:
        raise ConfigError(f"best_metric / best_metric_constraint: {e}") from None
    if constraints and not cfg.eval_file:
        raise ConfigError("best_metric_constraint needs evaluations: set eval_file=... (or drop the constraint)")
    generated = [c.metric for c in constraints if c.metric.startswith("gen_")]
    if generated and not cfg.gen_eval:
        raise ConfigError(f"best_metric_constraint names {generated[0]}, a generation metric, but gen_eval "
                          "is false: turn gen_eval on or drop the constraint")


def deepspeed_file(cfg: FinetuneConfig) -> str:
    """The DeepSpeed file the user named ("" for auto and none: finetune/memory.py decides auto)."""
    return "" if cfg.deepspeed in ("auto", "none", "") else cfg.deepspeed


def check_deepspeed(cfg: FinetuneConfig, world: int) -> None:
    problems = deepspeed_problems(cfg.deepspeed, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                                  world)
    if problems:
        raise ConfigError(problems[0])


def deepspeed_problems(path: str, micro_batch_size: int, gradient_accumulation_steps: int,
                       world: int) -> list[str]:
    """A hand-written batch size must agree with the trainer's arithmetic (the
    ZeRO error of the first Axolotl attempt), and a fixed learning rate would override the schedule;
    "auto" always agrees. Shared by our trainer and the Axolotl config check."""
    if not Path(path).is_file():
        return [f"deepspeed: file not found: {path}"]
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{path}: not valid JSON: line {e.lineno}: {e.msg}"]
    expected = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world,
    }
    problems = []
    for key, want in expected.items():
        got = ds.get(key, "auto")
        if got != "auto" and got != want:
            problems.append(
                f"{path}: {key} is {got}, but micro_batch_size {micro_batch_size} x "
                f"gradient_accumulation_steps {gradient_accumulation_steps} x world size {world} "
                f"gives {want}. Set it to \"auto\" (recommended) or to {want}")
    opt = ds.get("optimizer", {}).get("params", {})
    if isinstance(opt.get("lr"), (int, float)):
        problems.append(f"{path}: optimizer.params.lr is fixed at {opt['lr']}; set it to "
                        "\"auto\" so the trainer's learning rate and schedule apply")
    return problems


def to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The configuration as it may be printed, saved or logged: secrets redacted
    (e.g. a password inside mlflow_tracking_uri)."""
    from core.redact import redact

    return redact(dataclasses.asdict(cfg))


def describe(cfg: FinetuneConfig) -> str:
    """The resolved configuration, one key per line (printed at start)."""
    return "\n".join(f"  {k:<28} {v}" for k, v in to_dict(cfg).items())
