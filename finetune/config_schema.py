"""Every configuration key: its type, default and description, one line each (`--help-config` prints
them). The valid names and ranges are checked in finetune/config.py; the presets are finetune/presets.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


def key(default: Any, help: str):
    """A configuration key: its default and its one-line description."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    # --- what and where
    mode: str = key("single", "single: bf16 LoRA in one stage; two-stage: 4-bit QLoRA, positives then the mix")
    preset: str = key("tiny", "a layer of keys over these defaults (finetune/presets.py)")
    backend: str = key("auto", "auto (Unsloth where it imports and can run), unsloth, or hf (transformers + PEFT)")
    model_name: str = key("tiny-dense", "Hugging Face id, local folder, or tiny-dense / tiny-moe (shipped)")
    output_dir: str = key("outputs/tiny", "the run folder: one sub-folder per stage")
    trust_remote_code: bool = key(False, "run the model repository's own code (off unless you trust it)")
    chat_template: str = key("tokenizer_default", "the model's own template, or qwen3_2507 for a tokenizer without one")
    # --- data
    train_file: str = key("data/train/hawks_train_curriculum.json", "single mode's training records")
    stage1_train_file: str = key("data/train/hawks_train.json", "two-stage: stage 1's records (the positives)")
    stage2_train_file: str = key("data/train/hawks_train_curriculum.json",
                                 "two-stage: stage 2's records (the positive + negative mix)")
    eval_file: str = key("data/train/hawks_val_mixed.json", "validation records (empty: no evaluation)")
    eval_max_samples: int = key(0, "validation records used, seeded (0 = all): caps eval_loss and generation eval")
    max_train_samples: int = key(0, "training records used, seeded (0 = all)")
    # --- precision and memory
    load_in_4bit: bool = key(False, "NF4 base weights with double quantisation (two-stage sets it)")
    dtype: str = key("bfloat16", "compute and load dtype: bfloat16, float16, float32")
    attn_implementation: str = key("auto", "auto: flash_attention_2 where it imports on a GPU in 16-bit; "
                                   "sdpa_varlen on a CPU with packing; else sdpa")
    gradient_checkpointing: bool = key(True, "recompute each layer in backward instead of keeping its activations")
    max_length: int = key(1536, "tokens per row: longer examples are cut, a packed row holds up to this many")
    group_by_length: bool = key(False, "batches of similar lengths (less padding; off for parity with Axolotl)")
    packing: bool = key(False, "several examples per padding-free row (attention and loss stay per example)")
    experts_implementation: str = key("auto", "a MoE's fused experts: auto (eager on a CPU, the library's "
                                      "choice on a GPU), eager, batched_mm, grouped_mm")
    # --- LoRA
    lora_r: int = key(16, "LoRA rank")
    lora_alpha: int = key(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = key(0.0, "LoRA dropout (must be 0 on a MoE's fused experts: PEFT has none there)")
    expert_lora_r: int = key(0, "LoRA rank on fused experts (0 = lora_r)")
    lora_target_modules: list = key(["auto"], "modules that get LoRA; auto = attention + dense MLP")
    lora_target_parameters: list = key(["auto"], "parameters that get LoRA; auto = a MoE's fused experts")
    train_router: bool = key(False, "also train a MoE's router (frozen by default)")
    router_aux_loss_coef: float = key(0.0, "MoE load-balancing loss weight (0 = off; with a frozen router it "
                                      "cannot rebalance; Qwen3-MoE ships 0.001)")
    # --- optimisation
    learning_rate: float = key(2e-4, "single mode's peak learning rate")
    num_epochs: float = key(1.5, "single mode's epochs")
    max_steps: int = key(-1, "optimizer steps per stage (overrides the epochs; -1 = off)")
    lr_scheduler: str = key("cosine_with_min_lr", "transformers' scheduler name")
    min_lr_ratio: float = key(0.05, "cosine_with_min_lr: the final rate as a share of the peak")
    warmup_ratio: float = key(0.03, "share of the steps spent warming up (rounded up to whole steps)")
    micro_batch_size: int = key(1, "rows per rank per forward pass")
    gradient_accumulation_steps: int = key(16, "micro-batches per optimizer step")
    optim: str = key("adamw_torch", "transformers' optimizer name")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping norm (0 = off)")
    stage1_learning_rate: float = key(2e-4, "two-stage: stage 1's peak learning rate")
    stage2_learning_rate: float = key(1e-4, "two-stage: stage 2's peak learning rate")
    stage1_num_epochs: float = key(1.0, "two-stage: stage 1's epochs")
    stage2_num_epochs: float = key(1.0, "two-stage: stage 2's epochs")
    # --- bookkeeping
    seed: int = key(3407, "seed of sampling, LoRA init and data order")
    logging_steps: int = key(10, "steps between logged losses")
    eval_steps: int = key(200, "steps between evaluations (eval_loss and generation eval)")
    save_steps: int = key(200, "steps between checkpoints")
    save_total_limit: int = key(3, "checkpoints kept per stage")
    eval_batch_size: int = key(1, "rows per eval_loss batch")
    # --- generation eval and the kept step
    gen_eval: bool = key(True, "generation eval (gen_* metrics) at each evaluation and at the end")
    gen_eval_max_samples: int = key(0, "records the generation eval scores (0 = every eval record)")
    gen_eval_batch_size: int = key(32, "rows decoded together (0 = auto: the largest that fits; 16 on a CPU)")
    best_metric: str = key("gen_offender_name_set_f1", "adapter/ keeps the evaluated step best on this "
                           "(empty: the last step)")
    best_metric_constraint: list = key([], "conditions a kept step must meet, e.g. gen_truncation_rate<0.05")
    # --- processes and launch
    dataloader_num_workers: int = key(0, "dataloader worker processes")
    dataset_num_proc: int = key(0, "processes that tokenise the training set (0 = auto: 1 below 10,000 examples)")
    deepspeed: str = key("auto", "auto (ZeRO-2 for bf16 LoRA on several GPUs, chosen to fit), none, or a JSON file")
    device_memory_gib: float = key(0.0, "one device's memory for the memory plan (0 = the GPU's own, else 80)")
    check_memory: bool = key(True, "stop a GPU run whose memory plan does not fit, before it loads")
    ddp_timeout: int = key(1800, "seconds a rank may wait in a collective before the run fails")
    report_to: list = key([], "transformers' own loggers (MLflow has its own keys below)")
    # --- MLflow (callbacks/mlflow_logger.py)
    mlflow: bool = key(False, "log the run to MLflow")
    mlflow_tracking_uri: str = key("", "tracking URI (else $MLFLOW_TRACKING_URI, else output_dir/mlflow.db)")
    mlflow_experiment: str = key("qwen-finetune", "MLflow experiment name")
    mlflow_run_name: str = key("", "MLflow run name (empty: the output folder's name)")
    mlflow_require: bool = key(False, "fail when the server is unreachable instead of spooling offline")
    # --- stalls
    watchdog_first_step_s: float = key(600.0, "seconds the first optimizer step may take before stacks are dumped")
    watchdog_step_s: float = key(300.0, "seconds any later step may take before stacks are dumped")
    watchdog_pause_s: float = key(3600.0, "seconds an evaluation or checkpoint save may take")
    extra_callbacks: list = key([], "extra TrainerCallback classes, as package.module.ClassName")
    # --- keeping what the base knew (finetune/distill.py, finetune/rehearsal.py)
    distill_lambda: float = key(0.0, "weight of the KL term to the adapter-disabled base (0 = off)")
    distill_temperature: float = key(1.0, "distillation temperature")
    rehearsal_data: str = key("", "general data mixed into training (records, chats or plain text)")
    rehearsal_ratio: float = key(0.0, "share of the training examples drawn from rehearsal_data")
    general_eval_file: str = key("", "general text to measure forgetting on (else held out of rehearsal_data)")
    general_eval_samples: int = key(200, "documents held out of rehearsal_data to measure forgetting")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def describe_keys() -> str:
    """`--help-config`: every key with its type, default and description."""
    lines = []
    for f in dataclasses.fields(FinetuneConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"{f.name:<28} {f.type:<6} {str(default):<40} {f.metadata['help']}")
    return "\n".join(lines)
