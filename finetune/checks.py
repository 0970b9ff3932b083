"""What stops a run before any weight loads: the memory plan on a GPU, settings the model cannot take,
bad records, a best metric no evaluation reports. Each says what is wrong in one line (a ConfigError or
DataError), minutes before the model would have loaded on every rank."""

from __future__ import annotations

from core.distributed import is_rank_zero
from core.records import load_records, seeded_subset
from finetune import config as config_mod
from finetune.config_schema import FinetuneConfig
from finetune.memory_plan import CPU_GEN_BATCH
from finetune.rehearsal import load_general
from finetune.run_plan import RunPlan
from finetune.report import say
from finetune.stages import Stage, is_complete, latest_checkpoint, stage_dir


def check_memory(cfg: FinetuneConfig, plan: RunPlan, stages: list[Stage] = (), resume: bool = False):
    """On a GPU, before any weight loads: the memory plan (finetune/memory.py) picks DeepSpeed for
    `deepspeed=auto` and stops a run whose training or generation-eval peak would not fit the device, with
    the changes that would (check_memory=false runs it anyway). Rank 0 plans and every rank takes its
    choice, so all build the same engine. A resumed stage keeps the launcher its checkpoints were saved
    with. A CPU run is not planned."""
    if not plan.gpu:
        if cfg.gen_eval_batch_size == 0:
            cfg.gen_eval_batch_size = CPU_GEN_BATCH
        return None
    from finetune.memory_plan import run_memory_plan

    import torch.distributed as dist

    memory = run_memory_plan(cfg, plan) if is_rank_zero() else None
    if dist.is_available() and dist.is_initialized():
        shared = [memory]
        dist.broadcast_object_list(shared, src=0)
        memory = shared[0]
    if cfg.deepspeed == "auto":
        cfg.deepspeed = resumed_launcher(cfg, stages) if resume else None
        cfg.deepspeed = cfg.deepspeed if cfg.deepspeed is not None else (memory.deepspeed or "auto")
    if cfg.gen_eval_batch_size == 0:
        cfg.gen_eval_batch_size = max(memory.gen_batch, 1)
    say(f"memory plan: {memory.describe()}")
    if memory.fits or not cfg.check_memory:
        return memory
    options = "; ".join(memory.describe_options()) or "a larger GPU, or more GPUs"
    raise config_mod.ConfigError(f"this run would not fit the GPU: {memory.describe()}. Instead: {options}. "
                                 "--dry-run shows each peak by component; check_memory=false runs it anyway")


def resumed_launcher(cfg: FinetuneConfig, stages: list[Stage]) -> str | None:
    """For `deepspeed=auto` on --resume: "none" when the checkpoint to resume was saved without DeepSpeed
    (a DeepSpeed checkpoint has the global_step* folder that resuming under DeepSpeed requires); None, the
    plan's ZeRO-2, when it was saved with it or when there is nothing to resume."""
    for stage in stages:
        checkpoint = latest_checkpoint(stage_dir(cfg, stage))
        if checkpoint is not None and not is_complete(stage_dir(cfg, stage)):
            return None if any(checkpoint.glob("global_step*")) else "none"
    return None


def check_model_config(cfg: FinetuneConfig, model_config, attention: str) -> None:
    """Settings the model cannot take, known from its config (cache, shipped copy or hub), so said before
    minutes of loading instead of after: dropout on `auto` targets that put LoRA on a MoE's fused experts
    (PEFT has no dropout there), sdpa_varlen (the plan's `attention`) on a model it was not checked on."""
    from finetune.model import check_attention
    from finetune.moe import is_moe

    if cfg.lora_dropout and cfg.lora_target_parameters == ["auto"] and is_moe(model_config):
        config_mod.check_no_expert_dropout(
            cfg, f"{cfg.model_name} is a MoE whose fused experts get LoRA (lora_target_parameters=auto)")
    check_attention(model_config, cfg, attention)


def read_run_data(cfg: FinetuneConfig, stages: list[Stage]) -> dict:
    """{path: records} of every task file the stages will read, and {("general", path): GeneralData} of the
    general-data files, each read once for the whole run: a bad record stops the run here, located, before
    any weights load (minutes per rank on the 30B model). Every rank reads (each needs the records), so all
    stop together without a collective."""
    paths = sorted({s.train_file for s in stages} | ({cfg.eval_file} if cfg.eval_file else set()))
    data: dict = {path: load_records(path) for path in paths}
    for path in sorted({cfg.rehearsal_data, cfg.general_eval_file} - {""}):
        data[("general", path)] = load_general(path)
    return data


def check_best_metric_reported(cfg: FinetuneConfig, eval_file_records: list[dict]) -> None:
    """A best_metric or constraint that no evaluation will report (a misspelt source, a shape the eval set
    lacks) stops the run before the model loads: it would otherwise leave adapter/ at the last step."""
    from callbacks.generation_eval import reported_metrics
    from finetune.selection import unreported

    records = seeded_subset(seeded_subset(eval_file_records, cfg.eval_max_samples, cfg.seed),
                            cfg.gen_eval_max_samples, cfg.seed)  # the records the generation eval scores
    problems = unreported(cfg, {"eval_loss"} | (reported_metrics(records) if cfg.gen_eval else set()))
    if problems:
        raise config_mod.ConfigError(f"best_metric / best_metric_constraint: {problems[0]} (on {cfg.eval_file})")
