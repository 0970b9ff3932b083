"""Stages of a run, their folders and markers, and one SFTTrainer run per stage.

`single` is one stage; `two-stage` is stage1 (positives) then stage2 (the
positive+negative mix), continuing the same adapter. Each stage writes
`output_dir/<stage>/` (checkpoints, `adapter/`, `config.yaml`,
`run_summary.json`) and, last, `COMPLETE`: a re-run skips complete stages
and `--resume` continues an incomplete one from its latest checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.distributed import is_rank_zero
from finetune import config as config_mod
from finetune.config import ConfigError
from finetune.config_schema import FinetuneConfig
from finetune.nodes import check_resume_launch

if TYPE_CHECKING:
    from finetune.run_plan import RunPlan

MARKER = "COMPLETE"


@dataclass(frozen=True)
class Stage:
    name: str
    train_file: str
    learning_rate: float
    num_epochs: float


def stages_for(cfg: FinetuneConfig) -> list[Stage]:
    if cfg.mode == "single":
        return [Stage("single", cfg.train_file, cfg.learning_rate, cfg.num_epochs)]
    return [Stage("stage1", cfg.stage1_train_file, cfg.stage1_learning_rate, cfg.stage1_num_epochs),
            Stage("stage2", cfg.stage2_train_file, cfg.stage2_learning_rate, cfg.stage2_num_epochs)]


def stage_dir(cfg: FinetuneConfig, stage: Stage) -> Path:
    return Path(cfg.output_dir) / stage.name


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def latest_checkpoint(path: Path) -> Path | None:
    ckpts = [p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a `checkpoint-N` folder was saved at."""
    return int(checkpoint.name.split("-")[-1])


# Keys that change neither what a stage trains nor what it measures: a completed stage stays valid
# (the launcher too: `deepspeed=auto` resolves per machine, and a DDP stage is not retrained for ZeRO-2's sake)
RUN_ONLY_KEYS = {"deepspeed", "device_memory_gib", "check_memory", "gen_eval_batch_size",
                 "mlflow", "mlflow_tracking_uri", "mlflow_experiment", "mlflow_run_name", "mlflow_require",
                 "report_to", "watchdog_first_step_s", "watchdog_step_s", "watchdog_pause_s", "ddp_timeout",
                 "dataset_num_proc", "dataloader_num_workers", "extra_callbacks"}


def config_changes(cfg: FinetuneConfig, stage: Stage, saved: dict) -> list[str]:
    """'key: saved -> now' for each setting of `stage` that differs from the config it was trained with;
    the other stage's own keys (stage1_*/stage2_*) do not count, nor keys added since the stage was
    trained (their old behaviour is unknown to the saved config)."""
    now = config_mod.to_dict(cfg)  # redacted exactly as config.yaml was written
    others = tuple(f"{name}_" for name in ("stage1", "stage2") if name != stage.name)
    return [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in now.items()
            if key not in RUN_ONLY_KEYS and not key.startswith(others) and key in saved and saved[key] != value]


def check_complete_stage(cfg: FinetuneConfig, stage: Stage, path: Path) -> None:
    """A complete stage is reused only for the configuration it was trained with: a follow-up command
    with new settings must not print the old summary as if it had run."""
    import yaml

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    changes = config_changes(cfg, stage, yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
    if changes:
        raise ConfigError(f"{path} is complete but was trained with another configuration ("
                          f"{'; '.join(changes[:6])}{'; ...' if len(changes) > 6 else ''}). Pass --overwrite "
                          "to train it again, or choose another output_dir=...")


def plan_stage_dirs(cfg: FinetuneConfig, stages: list[Stage], resume: bool, overwrite: bool) -> None:
    """Refuse to clobber work or to reuse it for another configuration; clear it only when asked.
    Runs before any model loads."""
    for stage in stages:
        path = stage_dir(cfg, stage)
        if overwrite:
            if is_rank_zero() and path.exists():
                shutil.rmtree(path)
            continue
        if is_complete(path):
            check_complete_stage(cfg, stage, path)
            continue
        if not path.exists():
            continue
        latest = latest_checkpoint(path)
        if latest and not resume:
            raise ConfigError(f"{path} holds an unfinished run (latest: {latest.name}). "
                              "Pass --resume to continue it, or --overwrite to start over")
        if latest:
            check_resume_launch(path, latest)


def sft_config(cfg: FinetuneConfig, stage: Stage, out: Path, plan: RunPlan, has_eval: bool = True, model=None):
    """`plan`: the run plan (device, world size, launcher, packed-row layout). `has_eval`: whether the stage
    has an eval set, decided once by `sft_trainer` from its datasets. `model`: the model it will train."""
    from trl import SFTConfig

    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=stage.learning_rate,
        num_train_epochs=stage.num_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_scheduler == "cosine_with_min_lr" else {},
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        optim=cfg.optim,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        use_cpu=not plan.gpu,
        ddp_backend="gloo" if not plan.gpu and plan.world > 1 else None,
        # PEFT (hf backend) folds LoRA into every expert at every forward and LoRA sits on every layer: each
        # trainable tensor gets a gradient each step, so DDP need not walk the graph for unused ones (which
        # transformers asks for on a PeftModel unless told). Unsloth's own MoE kernels: left to its default.
        ddp_find_unused_parameters=False if not runs_unsloth(model) else None,
        ddp_timeout=cfg.ddp_timeout,  # also given to the process group (pipeline.init_distributed)
        # the datasets come finished (finetune/data.py): TRL prepares nothing
        dataset_kwargs={"skip_prepare_dataset": True},
        # Chosen here, never left to a library: unset, Unsloth's SFTConfig turns padding-free on by itself.
        # Set below, after __post_init__, where Unsloth's CPU fallback turns packing off with a message that
        # does not hold here (it expects sdpa to mix packed examples); libraries read them at trainer init
        packing=False,
        padding_free=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        max_length=cfg.max_length,
        completion_only_loss=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,  # never the checkpoint's value by accident
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to=cfg.report_to or "none",
        deepspeed=plan.deepspeed_config(),  # deepspeed=auto: the memory plan's choice (finetune/checks.py)
        save_only_model=False,  # resume needs the optimizer and scheduler state
        disable_tqdm=False,
    )
    args.packing = args.padding_free = plan.rows_flattened
    return args


def runs_unsloth(model) -> bool:
    """Whether Unsloth loaded the model (its classes or patched forwards), from the model itself."""
    from finetune.model import runs_unsloth_attention
    from finetune.moe import own_experts_forward

    if model is None:
        return False
    return runs_unsloth_attention(model) or own_experts_forward(model) is not None or \
        type(model).__module__.startswith("unsloth")


def sft_trainer(cfg: FinetuneConfig, stage: Stage, out: Path, plan: RunPlan, model, tokenizer, data,
                callbacks: list = ()):
    """TRL's SFTTrainer over a stage's finished datasets (`data`: finetune.data.StageData).
    With distill_lambda > 0 the trainer adds the distillation term (finetune/distill.py)."""
    from trl import SFTTrainer  # imported (and patched by Unsloth, on that backend) by the caller first

    from finetune.checkpoints import adapter_checkpoints
    from finetune.distill import distilling_trainer

    from finetune.collate import PackedRowsCollator

    args = sft_config(cfg, stage, out, plan, has_eval=data.eval is not None, model=model)
    side_by_side = data.packed and not args.padding_free
    collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id) if side_by_side else None
    trainer_class = adapter_checkpoints(SFTTrainer if cfg.distill_lambda == 0 else
                                        distilling_trainer(SFTTrainer, cfg.distill_lambda, cfg.distill_temperature))
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer, train_dataset=data.train,
                            eval_dataset=data.eval, data_collator=collator, callbacks=list(callbacks))
    keeps_apart = (trainer.data_collator is collator if side_by_side
                   else getattr(trainer.data_collator, "padding_free", False))
    if data.packed and not keeps_apart:
        # a library replaced the collator or turned padding-free off (Unsloth does for models it cannot
        # pack): packed rows with an attention mask of ones would let their examples attend to each other
        raise ConfigError(f"packing: the trainer built for {cfg.model_name} does not keep packed examples apart "
                          f"(collator {type(trainer.data_collator).__name__}); set packing=false")
    return trainer


def distill_losses(log_history: list[dict]) -> list[tuple[int, float, float]]:
    """(step, loss_task, loss_distill) of a distillation run."""
    return [(e["step"], e["loss_task"], e["loss_distill"]) for e in log_history if "loss_distill" in e]


def aux_losses(log_history: list[dict]) -> list[tuple[int, float, float]]:
    """(step, loss_task, aux_loss) of a MoE run with the router load-balancing loss on."""
    return [(e["step"], e["loss_task"], e["aux_loss"]) for e in log_history if "aux_loss" in e and "loss" in e]
