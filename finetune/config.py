"""The fine-tuning configuration: one flat dataclass, presets, YAML, overrides.

Resolution order (later wins): dataclass defaults < preset < --config YAML <
key=value overrides < dedicated flags. Everything is checked before any
model loads (`validate`), with messages that say what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.distributed import world_size
from core.errors import ConfigError

MODES = ("single", "two-stage")
BACKENDS = ("auto", "unsloth", "hf")
SDPA_VARLEN = "sdpa_varlen"  # ours: each packed example attended on its own (finetune/attention.py)
ATTENTION = ("auto", "sdpa", SDPA_VARLEN, "eager", "flash_attention_2", "flash_attention_3")
EXPERTS = ("auto", "eager", "batched_mm", "grouped_mm")
DTYPES = ("bfloat16", "float16", "float32")
# The model's own template is what Axolotl's `chat_template: tokenizer_default`
# uses, so both stacks format identically; the named ones are for base models
# whose tokenizer has none.
CHAT_TEMPLATES = ("tokenizer_default", "qwen3_2507")
TINY_MODELS = ("tiny-dense", "tiny-moe")
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass
class FinetuneConfig:
    # what and where
    mode: str = "single"
    preset: str = "tiny"
    backend: str = "auto"
    model_name: str = "tiny-dense"
    output_dir: str = "outputs/tiny"
    trust_remote_code: bool = False
    chat_template: str = "tokenizer_default"
    # data: `single` trains on train_file; `two-stage` on stage1_train_file
    # (positives), then stage2_train_file (the positive+negative mix)
    train_file: str = "data/train/hawks_train_curriculum.json"
    stage1_train_file: str = "data/train/hawks_train.json"
    stage2_train_file: str = "data/train/hawks_train_curriculum.json"
    eval_file: str = "data/train/hawks_val_mixed.json"
    eval_max_samples: int = 0  # 0 = all; caps eval_loss and generation eval cost
    max_train_samples: int = 0  # 0 = all
    # precision / memory
    load_in_4bit: bool = False  # two-stage sets it (NF4, double quant)
    dtype: str = "bfloat16"
    # auto: flash_attention_2 when flash-attn imports on a GPU and dtype is 16-bit; on a CPU with packing,
    # sdpa_varlen (each packed example attended on its own, finetune/attention.py); else sdpa
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = True
    max_length: int = 1536
    # Batches of similar lengths (transformers' LengthGroupedSampler): far less padding; off by
    # default so a parity run draws the same batches as Axolotl's default sampler.
    group_by_length: bool = False
    # Several examples per row, padding-free, up to max_length (best-fit decreasing; position ids restart
    # per example, so attention and the loss stay per example): fewer, fuller forward passes. An optimizer
    # step then holds micro_batch_size x gradient_accumulation_steps rows of several examples each.
    packing: bool = False
    # How a MoE's fused experts run (transformers' experts_implementation): auto = eager on a CPU (measured
    # faster there), the library's choice on a GPU (grouped_mm; Unsloth's own kernels on its backend);
    # eager / batched_mm / grouped_mm force one (finetune/moe.py; bench/experts.py measures them)
    experts_implementation: str = "auto"
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    expert_lora_r: int = 0  # 0 = lora_r (one rank, as in Axolotl's lora_r)
    # "auto": attention + dense MLP modules + fused experts, whichever the model has
    lora_target_modules: list = field(default_factory=lambda: ["auto"])
    lora_target_parameters: list = field(default_factory=lambda: ["auto"])
    train_router: bool = False
    # MoE load-balancing loss weight (TRL's router_aux_loss_coef). 0 = off, our default: with the
    # router frozen (train_router=false) it cannot rebalance routing, only pulls on the hidden states
    # and shifts every reported loss. Qwen3-MoE checkpoints ship 0.001 (use it with train_router=true).
    router_aux_loss_coef: float = 0.0
    # optimisation (single mode, and the defaults for each stage)
    learning_rate: float = 2e-4
    num_epochs: float = 1.5
    max_steps: int = -1
    lr_scheduler: str = "cosine_with_min_lr"
    min_lr_ratio: float = 0.05
    warmup_ratio: float = 0.03
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # two-stage specifics (the original two-stage run recorded only the learning rates)
    stage1_learning_rate: float = 2e-4
    stage2_learning_rate: float = 1e-4
    stage1_num_epochs: float = 1.0
    stage2_num_epochs: float = 1.0
    # bookkeeping
    seed: int = 3407
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 3
    eval_batch_size: int = 1
    # generation eval (gen_* metrics) at each evaluation and at the end
    gen_eval: bool = True
    gen_eval_max_samples: int = 0  # 0 = every eval record (after eval_max_samples)
    # 0 = auto: on a GPU the largest of 64, 32, 16, ... whose generation-eval peak fits the memory plan (with
    # the eval set's own prompt lengths), 16 on a CPU
    gen_eval_batch_size: int = 32
    # adapter/ = the evaluated step with the best value of best_metric among those meeting every
    # best_metric_constraint ("METRIC<=NUMBER", also >=, <, >; comma-separated); adapter_last/ = the last
    # step (finetune/selection.py). best_metric= (empty): adapter/ is the last step, as before.
    best_metric: str = "gen_offender_name_set_f1"
    best_metric_constraint: list = field(default_factory=list)
    dataloader_num_workers: int = 0
    # processes that tokenise the training set (rank 0 does it while the other ranks wait);
    # 0 = auto: one below 10,000 examples (spawning costs more), else up to 8
    dataset_num_proc: int = 0
    # auto: ZeRO-2 (finetune/memory.py: optimizer on the GPU when that fits, else offloaded) in bf16 on
    # several GPUs, plain DDP otherwise (4-bit, one rank, CPU); none: never; or a DeepSpeed JSON file
    deepspeed: str = "auto"
    # memory of one device in GiB for the plan's verdict: 0 = the GPU's own (80, an H100/A100, in a dry run
    # without one). A run on a GPU whose plan does not fit stops before loading, unless check_memory=false
    device_memory_gib: float = 0.0
    check_memory: bool = True
    # seconds a rank may wait in a collective (NCCL's own default is 10 min) before the run fails:
    # covers rank 0 tokenising alone and the rank-0-only work after training
    ddp_timeout: int = 1800
    report_to: list = field(default_factory=list)
    # MLflow (callbacks/mlflow_logger.py); tracking URI: this, else $MLFLOW_TRACKING_URI,
    # else a local sqlite store in output_dir. require: fail instead of spooling offline.
    mlflow: bool = False
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "qwen-finetune"
    mlflow_run_name: str = ""
    mlflow_require: bool = False
    # stalls: dump every thread's stack when no optimizer step completes in time
    watchdog_first_step_s: float = 600.0
    watchdog_step_s: float = 300.0
    # an evaluation (generation eval included) or a checkpoint save: minutes on the 30B model, not a stall
    watchdog_pause_s: float = 3600.0
    # extra transformers TrainerCallback classes, as "package.module.ClassName"
    extra_callbacks: list = field(default_factory=list)
    # keeping what the base knew (finetune/distill.py, finetune/rehearsal.py):
    # loss = task CE + distill_lambda * T^2 * KL(base || tuned) on every trained token;
    # the base is the same model with its adapter disabled (4-bit when training is 4-bit)
    distill_lambda: float = 0.0
    distill_temperature: float = 1.0
    # general data mixed into training: records/alpaca/ShareGPT/messages files, or plain text
    # (.txt: one document per line; .jsonl/.json with a "text" field)
    rehearsal_data: str = ""
    rehearsal_ratio: float = 0.0  # share of the training examples drawn from rehearsal_data
    # forgetting measure after training: loss of base and tuned model on held-out general data
    # (general_eval_file, else general_eval_samples documents held out of rehearsal_data)
    general_eval_file: str = ""
    general_eval_samples: int = 200


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


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


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
    for where, layer in layers:
        for key, raw in layer.items():
            if key not in field_names():
                raise _unknown_key(key, where)
            values[key] = _coerce(key, raw, where)
    values.update(mode=mode, preset=preset)
    cfg = FinetuneConfig(**values)
    validate(cfg, dry_run=dry_run, world=world)
    return cfg


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
    def choice(key: str, valid) -> None:
        if getattr(cfg, key) not in valid:
            raise ConfigError(f"'{key}' is '{getattr(cfg, key)}'; valid values: {', '.join(valid)}")

    choice("backend", BACKENDS)
    choice("dtype", DTYPES)
    choice("attn_implementation", ATTENTION)
    choice("experts_implementation", EXPERTS)
    if cfg.chat_template not in CHAT_TEMPLATES:
        raise ConfigError(f"unknown chat_template '{cfg.chat_template}'; valid names: "
                          f"{', '.join(CHAT_TEMPLATES)} (tokenizer_default = the model's own template)")
    for key in ("lora_r", "lora_alpha", "micro_batch_size", "gradient_accumulation_steps", "max_length",
                "logging_steps", "eval_steps", "save_steps", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.gen_eval_batch_size < 0:
        raise ConfigError(f"'gen_eval_batch_size' must be at least 1, or 0 for auto; got {cfg.gen_eval_batch_size}")
    if cfg.attn_implementation.startswith("flash_attention") and cfg.dtype == "float32":
        raise ConfigError(f"attn_implementation={cfg.attn_implementation} computes in bfloat16/float16 only, "
                          "and dtype is float32: set dtype=bfloat16, or attn_implementation=auto")
    if cfg.packing and cfg.group_by_length:
        raise ConfigError("packing and group_by_length both remove padding; packed rows are already full, "
                          "so choose one: packing=true group_by_length=false (or packing=false)")
    if cfg.expert_lora_r < 0:
        raise ConfigError("'expert_lora_r' must be >= 0 (0 means: same as lora_r)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"'lora_dropout' must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_target_parameters not in ([], ["auto"]):
        check_no_expert_dropout(cfg, "lora_target_parameters names fused experts")
    if not 0 <= cfg.min_lr_ratio <= 1 or not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError("'min_lr_ratio' must be in [0, 1] and 'warmup_ratio' in [0, 1)")
    if cfg.max_steps < 1 and min(cfg.num_epochs, cfg.stage1_num_epochs, cfg.stage2_num_epochs) <= 0:
        raise ConfigError("epochs must be > 0 (or set max_steps)")
    if cfg.load_in_4bit and cfg.dtype == "float32":
        raise ConfigError("load_in_4bit needs a 16-bit compute dtype: set dtype=bfloat16 "
                          "(or load_in_4bit=false)")
    if cfg.device_memory_gib < 0:
        raise ConfigError(f"'device_memory_gib' must be >= 0 (0 = the GPU's own), got {cfg.device_memory_gib}")
    if cfg.load_in_4bit and deepspeed_file(cfg):
        raise ConfigError("4-bit QLoRA with DeepSpeed is not supported by this trainer: the frozen "
                          "4-bit weights cannot be sharded by ZeRO. Use --mode single (bf16 LoRA) with "
                          "DeepSpeed, or drop --deepspeed")
    if cfg.router_aux_loss_coef < 0:
        raise ConfigError("'router_aux_loss_coef' must be >= 0 (0 = no MoE load-balancing loss)")
    if cfg.distill_lambda < 0 or cfg.distill_temperature <= 0:
        raise ConfigError("'distill_lambda' must be >= 0 (0 = off) and 'distill_temperature' > 0")
    if not 0 <= cfg.rehearsal_ratio < 1:
        raise ConfigError(f"'rehearsal_ratio' must be in [0, 1), got {cfg.rehearsal_ratio}")
    if cfg.rehearsal_ratio > 0 and not cfg.rehearsal_data:
        raise ConfigError("rehearsal_ratio > 0 needs rehearsal_data=FILE (general text or instruction data)")
    if cfg.general_eval_samples < 1:
        raise ConfigError("'general_eval_samples' must be at least 1")
    if cfg.dataset_num_proc < 0 or cfg.ddp_timeout < 1:
        raise ConfigError("'dataset_num_proc' must be >= 0 (0 = auto) and 'ddp_timeout' >= 1 second")
    if min(cfg.watchdog_first_step_s, cfg.watchdog_step_s, cfg.watchdog_pause_s) <= 0:
        raise ConfigError("watchdog timeouts must be > 0 seconds")
    check_best_metric(cfg)
    missing = missing_data(cfg)
    if missing and not dry_run:
        raise ConfigError(missing[0])
    if deepspeed_file(cfg):
        check_deepspeed(cfg, world or world_size())


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
