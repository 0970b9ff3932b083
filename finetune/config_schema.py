"""Every configuration key: its type, default, description and, where it has one, its own rule, one concern
per class (`--help-config` prints them grouped). Rules that span keys are finetune/config.py's; the presets
are finetune/presets.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

MODES = ("single", "two-stage")
BACKENDS = ("auto", "unsloth", "hf")
SDPA_VARLEN = "sdpa_varlen"  # ours: each packed example attended on its own (finetune/attention.py)
ATTENTION = ("auto", "sdpa", SDPA_VARLEN, "eager", "flash_attention_2", "flash_attention_3")
EXPERTS = ("auto", "eager", "batched_mm", "grouped_mm")
DTYPES = ("bfloat16", "float16", "float32")
# The model's own template is what Axolotl's `chat_template: tokenizer_default` uses, so both stacks
# format identically; the named ones are for base models whose tokenizer has none.
CHAT_TEMPLATES = ("tokenizer_default", "qwen3_2507")
TINY_MODELS = ("tiny-dense", "tiny-moe")
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@dataclass(frozen=True)
class Check:
    """A key's own rule: called with (key, value), it returns the problem, or None."""
    rule: str  # in short, for --help-config
    ok: Callable[[Any], bool]
    message: str  # formatted with {key} and {value}
    # numeric rules: the bounds (None: unbounded), so a test can step just outside them
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, key: str, value: Any) -> str | None:
        return None if self.ok(value) else self.message.format(key=key, value=value)


def one_of(names, message: str = "'{key}' is '{value}'; valid values: {valid}") -> Check:
    valid = ", ".join(names)
    return Check(f"one of: {valid}", lambda v: v in names, message.replace("{valid}", valid))


def in_range(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
             message: str = "") -> Check:
    """lo <= value (< lo when lo_open), and value <= hi (< hi when hi_open) when hi is given."""
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if hi is None:
        rule = f"{'>' if lo_open else '>='} {lo}"
    else:
        rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Check(rule, ok, message or f"'{{key}}' must be {rule}, got {{value}}", lo, hi, lo_open, hi_open)


def positive(message: str = "") -> Check:
    return in_range(0, lo_open=True, message=message)


def at_least(lo: int, note: str = "", message: str = "") -> Check:
    """`note`: what the bound means (e.g. "0: auto or all"), said in the message. The two wordings are the
    messages users and tests already know."""
    told = f">= {lo} ({note})" if note else f"at least {lo}"
    return in_range(lo, message=message or f"'{{key}}' must be {told}, got {{value}}")


AUTO_OR_ALL = "0: auto or all"  # the note every ">= 0" count and weight has always been refused with


def key(default: Any, help: str, check: Check | None = None):
    """A configuration key: its default, its one-line description and its own rule (checked by
    finetune/config.py's check_values)."""
    metadata = {"help": help, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class RunKeys:
    """What to train and where."""
    mode: str = key("single", "single: bf16 LoRA in one stage; two-stage: 4-bit QLoRA, positives then the mix")
    preset: str = key("tiny", "a layer of keys over these defaults (finetune/presets.py)")
    backend: str = key("auto", "auto (Unsloth where it imports and can run), unsloth, or hf (transformers + PEFT)",
                       one_of(BACKENDS))
    model_name: str = key("tiny-dense", "Hugging Face id, local folder, or tiny-dense / tiny-moe (shipped)")
    output_dir: str = key("outputs/tiny", "the run folder: one sub-folder per stage")
    trust_remote_code: bool = key(False, "run the model repository's own code (off unless you trust it)")
    chat_template: str = key("tokenizer_default", "the model's own template, or qwen3_2507 for a tokenizer without one",
                             one_of(CHAT_TEMPLATES, "unknown chat_template '{value}'; valid names: {valid} "
                                    "(tokenizer_default = the model's own template)"))


@dataclass
class DataKeys:
    """The training and validation data."""
    train_file: str = key("data/train/hawks_train_curriculum.json", "single mode's training records")
    stage1_train_file: str = key("data/train/hawks_train.json", "two-stage: stage 1's records (the positives)")
    stage2_train_file: str = key("data/train/hawks_train_curriculum.json",
                                 "two-stage: stage 2's records (the positive + negative mix)")
    eval_file: str = key("data/train/hawks_val_mixed.json", "validation records (empty: no evaluation)")
    eval_max_samples: int = key(0, "validation records used, seeded (0 = all): caps eval_loss and generation eval",
                                at_least(0, AUTO_OR_ALL))
    max_train_samples: int = key(0, "training records used, seeded (0 = all)", at_least(0, AUTO_OR_ALL))


@dataclass
class PrecisionKeys:
    """Precision, attention and memory."""
    load_in_4bit: bool = key(False, "NF4 base weights with double quantisation (two-stage sets it)")
    dtype: str = key("bfloat16", "compute and load dtype: bfloat16, float16, float32", one_of(DTYPES))
    attn_implementation: str = key("auto", "auto: flash_attention_2 where it imports on a GPU in 16-bit; "
                                   "sdpa_varlen on a CPU with packing; else sdpa", one_of(ATTENTION))
    gradient_checkpointing: bool = key(True, "recompute each layer in backward instead of keeping its activations")
    max_length: int = key(1536, "tokens per row: longer examples are cut, a packed row holds up to this many",
                          at_least(1))
    group_by_length: bool = key(False, "batches of similar lengths (less padding; off for parity with Axolotl)")
    packing: bool = key(False, "several examples per padding-free row (attention and loss stay per example)")
    experts_implementation: str = key("auto", "a MoE's fused experts: auto (eager on a CPU, the library's "
                                      "choice on a GPU), eager, batched_mm, grouped_mm", one_of(EXPERTS))


@dataclass
class LoraKeys:
    """The LoRA adapter: rank, targets, the router."""
    lora_r: int = key(16, "LoRA rank", at_least(1))
    lora_alpha: int = key(32, "LoRA alpha (the update is scaled by alpha / r)", at_least(1))
    lora_dropout: float = key(0.0, "LoRA dropout (must be 0 on a MoE's fused experts: PEFT has none there)",
                              in_range(0, 1, hi_open=True))
    expert_lora_r: int = key(0, "LoRA rank on fused experts (0 = lora_r)", at_least(0, AUTO_OR_ALL))
    lora_target_modules: list = key(["auto"], "modules that get LoRA; auto = attention + dense MLP")
    lora_target_parameters: list = key(["auto"], "parameters that get LoRA; auto = a MoE's fused experts")
    train_router: bool = key(False, "also train a MoE's router (frozen by default)")
    router_aux_loss_coef: float = key(0.0, "MoE load-balancing loss weight (0 = off; with a frozen router it "
                                      "cannot rebalance; Qwen3-MoE ships 0.001)", at_least(0, "0: off"))


@dataclass
class OptimKeys:
    """Optimisation: rates, schedule, batch, epochs."""
    learning_rate: float = key(2e-4, "single mode's peak learning rate", positive())
    num_epochs: float = key(1.5, "single mode's epochs")
    max_steps: int = key(-1, "optimizer steps per stage (overrides the epochs; -1 = off)")
    lr_scheduler: str = key("cosine_with_min_lr", "transformers' scheduler name")
    min_lr_ratio: float = key(0.05, "cosine_with_min_lr: the final rate as a share of the peak", in_range(0, 1))
    warmup_ratio: float = key(0.03, "share of the steps spent warming up (rounded up to whole steps)",
                              in_range(0, 1, hi_open=True))
    micro_batch_size: int = key(1, "rows per rank per forward pass", at_least(1))
    gradient_accumulation_steps: int = key(16, "micro-batches per optimizer step", at_least(1))
    optim: str = key("adamw_torch", "transformers' optimizer name")
    weight_decay: float = key(0.0, "AdamW weight decay", at_least(0, "0: none"))
    max_grad_norm: float = key(1.0, "gradient clipping norm (0 = off)", at_least(0, "0: off"))
    stage1_learning_rate: float = key(2e-4, "two-stage: stage 1's peak learning rate", positive())
    stage2_learning_rate: float = key(1e-4, "two-stage: stage 2's peak learning rate", positive())
    stage1_num_epochs: float = key(1.0, "two-stage: stage 1's epochs")
    stage2_num_epochs: float = key(1.0, "two-stage: stage 2's epochs")


@dataclass
class BookkeepingKeys:
    """Bookkeeping: seed, logging, evaluations, checkpoints."""
    seed: int = key(3407, "seed of sampling, LoRA init and data order")
    logging_steps: int = key(10, "steps between logged losses", at_least(1))
    eval_steps: int = key(200, "steps between evaluations (eval_loss and generation eval)", at_least(1))
    save_steps: int = key(200, "steps between checkpoints", at_least(1))
    save_total_limit: int = key(3, "checkpoints kept per stage", at_least(1))
    eval_batch_size: int = key(1, "rows per eval_loss batch", at_least(1))


@dataclass
class GenEvalKeys:
    """Generation eval and the kept step."""
    gen_eval: bool = key(True, "generation eval (gen_* metrics) at each evaluation and at the end")
    gen_eval_max_samples: int = key(0, "records the generation eval scores (0 = every eval record)",
                                    at_least(0, AUTO_OR_ALL))
    gen_eval_batch_size: int = key(32, "rows decoded together (0 = auto: the largest that fits; 16 on a CPU)",
                                   at_least(0, AUTO_OR_ALL))
    best_metric: str = key("gen_offender_name_set_f1", "adapter/ keeps the evaluated step best on this "
                           "(empty: the last step)")
    best_metric_constraint: list = key([], "conditions a kept step must meet, e.g. gen_truncation_rate<0.05")


@dataclass
class LaunchKeys:
    """Processes and launch."""
    dataloader_num_workers: int = key(0, "dataloader worker processes")
    dataset_num_proc: int = key(0, "processes that tokenise the training set (0 = auto: 1 below 10,000 examples)",
                                at_least(0, AUTO_OR_ALL))
    deepspeed: str = key("auto", "auto (ZeRO-2 for bf16 LoRA on several GPUs, chosen to fit), none, or a JSON file")
    device_memory_gib: float = key(0.0, "one device's memory for the memory plan (0 = the GPU's own, else 80)",
                                   at_least(0, AUTO_OR_ALL))
    check_memory: bool = key(True, "stop a GPU run whose memory plan does not fit, before it loads")
    ddp_timeout: int = key(1800, "seconds a rank may wait in a collective before the run fails",
                           at_least(1, message="'{key}' >= 1 second is required (how long a rank waits in a "
                                    "collective), got {value}"))
    report_to: list = key([], "transformers' own loggers (MLflow has its own keys below)")


@dataclass
class MlflowKeys:
    """MLflow (callbacks/mlflow_logger.py)."""
    mlflow: bool = key(False, "log the run to MLflow")
    mlflow_tracking_uri: str = key("", "tracking URI (else $MLFLOW_TRACKING_URI, else output_dir/mlflow.db)")
    mlflow_experiment: str = key("qwen-finetune", "MLflow experiment name")
    mlflow_run_name: str = key("", "MLflow run name (empty: the output folder's name)")
    mlflow_require: bool = key(False, "fail when the server is unreachable instead of spooling offline")


@dataclass
class WatchdogKeys:
    """Stalls: how long a step may take before stacks are dumped."""
    watchdog_first_step_s: float = key(600.0, "seconds the first optimizer step may take before stacks are dumped",
                                       positive())
    watchdog_step_s: float = key(300.0, "seconds any later step may take before stacks are dumped", positive())
    watchdog_pause_s: float = key(3600.0, "seconds an evaluation or checkpoint save may take", positive())
    extra_callbacks: list = key([], "extra TrainerCallback classes, as package.module.ClassName")


@dataclass
class ForgettingKeys:
    """Keeping what the base knew (finetune/distill.py, finetune/rehearsal.py)."""
    distill_lambda: float = key(0.0, "weight of the KL term to the adapter-disabled base (0 = off)",
                                at_least(0, "0 = off"))
    distill_temperature: float = key(1.0, "distillation temperature", positive(
        "'{key}' > 0 is required (the logits are divided by it), got {value}"))
    rehearsal_data: str = key("", "general data mixed into training (records, chats or plain text)")
    rehearsal_ratio: float = key(0.0, "share of the training examples drawn from rehearsal_data",
                                 in_range(0, 1, hi_open=True))
    general_eval_file: str = key("", "general text to measure forgetting on (else held out of rehearsal_data)")
    general_eval_samples: int = key(200, "documents held out of rehearsal_data to measure forgetting", at_least(1))


# --help-config's order, and the order of dataclasses.fields(FinetuneConfig)
CONCERNS = (RunKeys, DataKeys, PrecisionKeys, LoraKeys, OptimKeys, BookkeepingKeys, GenEvalKeys, LaunchKeys,
            MlflowKeys, WatchdogKeys, ForgettingKeys)


# A dataclass collects its bases' fields last base first (reverse MRO): reversed, they keep CONCERNS' order.
@dataclass
class FinetuneConfig(*reversed(CONCERNS)):
    """Every key: the concerns above, one flat object (cfg.learning_rate)."""


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def describe_keys() -> str:
    """`--help-config`: the keys under a heading per concern, each with its type, default, description and
    its own rule, if it has one."""
    lines = []
    for concern in CONCERNS:
        if lines:
            lines.append("")  # a blank line between concerns
        lines.append(f"# {concern.__doc__}")
        for f in dataclasses.fields(concern):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rule = f"  [{f.metadata['check'].rule}]" if f.metadata["check"] else ""
            lines.append(f"{f.name:<28} {f.type:<6} {str(default):<40} {f.metadata['help']}{rule}")
    return "\n".join(lines)
