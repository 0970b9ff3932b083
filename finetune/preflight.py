"""`--dry-run`: what a run would train and need, without loading any weights.

The model is built from its config on the meta device (no memory, seconds even
for 30B), LoRA is applied with PEFT exactly as the hf backend would, and the
data is tokenised with the model's own chat template. It also works offline:
the config comes from the Hugging Face cache, else from the copy this
repository ships (finetune/model_configs/), else from the hub; without the
tokenizer the token lengths are skipped, and missing data files are reported
instead of stopping the report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_tools.stats import length_report
from finetune import config as config_mod
from finetune.config_schema import FinetuneConfig
from finetune.data import gen_eval_records, load_split
from finetune.lora import CATEGORIES, count_parameters
from finetune.memory import GIB
from finetune.memory_plan import (MemoryPlan, Workload, memory_shape, plan_from_model, planned_storage,
                                  weights_while_loading, with_lora, workload)
from finetune.model_source import hub_reachable, load_tokenizer_if_available, meta_model
from finetune.moe import describe as describe_aux_loss
from finetune.moe import router_aux_loss_setting
from finetune.quant_experts import describe_storage
from finetune import run_plan
from finetune.run_plan import Machine, RunPlan
from finetune.selection import describe_plan
from finetune.stages import stages_for
from finetune.timing import time_plans

REPO = Path(__file__).resolve().parent.parent


def describe_lengths(cfg: FinetuneConfig, d: dict) -> str:
    """One stage's measured token figures: percentiles, what max_length cuts, the examples per packed row."""
    cut = f"over max_length {d['max_length']}: ~{d['over_max_length']:,} ({d['over_share']:.1%})"
    if d["over_max_length"]:
        cut += (f": ~{d['answer_cut']:,} lose the end of their answer, ~{d['prompt_over']:,} are dropped "
                "(the prompt alone fills max_length)")
    rows = f"; ~{d['examples_per_row']:.1f} examples per packed row" if cfg.packing else ""
    return (f"tokens {d['tokens']}, mean {d['tokens_mean']:.0f} (measured on {d['measured']:,}); {cut}{rows}")


def print_memory(cfg: FinetuneConfig, memory: MemoryPlan, work: Workload, gen_measured: bool,
                 loading: float | None) -> None:
    """The memory lines of the report: the verdict, each peak by component, and what would fit instead."""
    def parts(components: dict) -> str:
        return ", ".join(f"{name} {size / GIB:.2f}" for name, size in components.items() if size >= GIB / 100)

    est = memory.estimate
    print(f"memory       {memory.describe()}")
    print(f"  training   {est.training_peak / GIB:.1f} GiB: {parts(est.training)}, CUDA context "
          f"{est.overhead / GIB:.2f} (1 x {work.tokens} tokens per micro-batch)")
    if est.generation:
        budget = "measured on the eval set" if gen_measured else "not measured: bounded by max_length"
        batch = f"batch {memory.gen_batch}" + ((" (auto: the largest that fits)" if memory.fits else " (auto)")
                                               if memory.gen_batch_auto else "")
        print(f"  gen eval   {est.generation_peak / GIB:.1f} GiB: {parts(est.generation)} ({batch} "
              f"x ({work.prompt_tokens} prompt + {work.new_tokens} answer) tokens, {budget})")
    for option in memory.describe_options():
        print(f"  instead    {option}")
    if "distill_teacher" in est.training:
        print(f"distillation teacher pass: +{est.training['distill_teacher'] / GIB:.2f} GiB (its logits and the KL's "
              "softmaxes; no second copy of the weights: the teacher is the adapter-disabled model)")
    if loading:
        print(f"loading      the MoE experts load in {cfg.dtype} and are quantized after loading: weights peak at "
              f"~{loading / GIB:.2f} GiB per device before they drop to {est.training['weights'] / GIB:.2f} GiB")


@dataclasses.dataclass
class DryRun:
    """What the dry run found out, without any weight: the meta model with LoRA, its data, its plans."""
    cfg: FinetuneConfig
    world: int
    nodes: int
    model: object
    model_config: object
    shipped_config: str | None
    here: RunPlan  # the run plan on this machine, as the real run decides it
    gpus: RunPlan  # the same launch on GPUs (`here` when this machine has them): memory and time are planned for it
    targets: object  # finetune.lora.TargetPlan
    base_counts: dict
    counts: dict
    tokenizer: object
    tokenizer_source: str
    missing: list[str]
    data: dict
    storage: dict
    work: Workload
    gen_measured: bool
    memory: MemoryPlan
    timing: dict
    loading: float | None


def plan_dry_run(cfg: FinetuneConfig, world: int, nodes: int) -> DryRun:
    from finetune.model import check_attention

    model, model_config, shipped_config = meta_model(cfg)
    machine = Machine.this_launch(world, nodes)
    here = run_plan.decide(cfg, model_config, machine)
    gpus = here if machine.gpu else run_plan.decide(cfg, model_config, machine.with_gpus())
    check_attention(model_config, cfg, here.attention)
    base_counts = count_parameters(model)
    targets, peft_model = with_lora(model, cfg)
    counts = count_parameters(peft_model)
    tokenizer, tokenizer_source = load_tokenizer_if_available(cfg, model_config.model_type)
    data = {}
    for stage in stages_for(cfg):
        if Path(stage.train_file).is_file():
            records = load_split(stage.train_file, cfg.max_train_samples, cfg.seed)
            data[stage.name] = (length_report(records, tokenizer, cfg.max_length) if tokenizer is not None
                                else {"examples": len(records)})
    storage = planned_storage(model, cfg, gpus.backend)
    work, gen_measured = workload(cfg, tokenizer, gen_eval_records(cfg))
    memory = plan_from_model(cfg, peft_model, model_config, counts["trainable"], gpus.backend, world, work)
    gpus = gpus.with_launcher(memory.deepspeed)
    here = gpus if machine.gpu else here
    timing = time_plans(cfg, memory_shape(cfg, peft_model, model_config, counts["trainable"], gpus.backend),
                        targets.expert_rank or cfg.lora_r, world, tokenizer, data, memory.gen_batch)
    return DryRun(cfg, world, nodes, model, model_config,
                  str(shipped_config.relative_to(REPO)) if shipped_config else None, here, gpus,
                  targets, base_counts, counts, tokenizer, tokenizer_source,
                  config_mod.missing_data(cfg),  # only a dry run gets here with files missing
                  data, storage, work, gen_measured, memory, timing, weights_while_loading(storage))


def dry_run_report(d: DryRun) -> dict:
    """The dry run as one JSON object (its last line of output)."""
    cfg, plan, launcher = d.cfg, d.targets, d.memory.estimate.launcher
    return {
        "model": cfg.model_name, "model_config_shipped": d.shipped_config, "model_class": type(d.model).__name__,
        "mode": cfg.mode, "world_size": d.world, "nodes": d.nodes, "deepspeed": d.memory.deepspeed or None,
        "zero_stage": launcher.zero_stage, "optimizer_offload": launcher.offload,
        "quantization": "4-bit NF4" if cfg.load_in_4bit else cfg.dtype,
        "base_parameters": d.base_counts["total"],
        "lora_targets": {"modules": plan.modules, "parameters": plan.parameters,
                         "matches": plan.matches, "router": "trained" if plan.router else "frozen",
                         "expert_rank": plan.expert_rank if plan.parameters else None},
        "trainable_parameters": d.counts["trainable"],
        "trainable_by_category": d.counts["trainable_by_category"],
        "router_aux_loss": router_aux_loss_setting(cfg, d.model_config),
        "weight_storage_bytes": {cat: {kind: round(size) for kind, size in kinds.items()}
                                 for cat, kinds in d.storage.items()},
        "data": d.data, "missing_data": d.missing, "token_lengths": d.tokenizer is not None,
        "tokenizer": d.tokenizer_source,
        "gen_eval_answer_tokens": d.work.new_tokens if d.gen_measured else None,
        "gen_eval_prompt_tokens": d.work.prompt_tokens if d.gen_measured else None,
        "memory": {**d.memory.report(),
                   "weights_while_loading_gib": round(d.loading / GIB, 2) if d.loading else None},
        "packing": cfg.packing, "experts_implementation": d.gpus.experts, "attn_implementation": d.here.attention,
        "run_plan": d.here.report(), "gpu_run_plan": d.gpus.report(),
        "time": {name: t.report() for name, t in d.timing.items()},
    }


def print_model(d: DryRun, report: dict) -> None:
    """The model, its LoRA targets and trainable parameters."""
    cfg, counts, total = d.cfg, d.counts, d.base_counts["total"]
    print(f"model        {cfg.model_name} ({report['model_class']}), {total:,} parameters, "
          f"{report['quantization']}")
    if d.shipped_config:
        print(f"model config: {d.shipped_config} (shipped copy; the Hugging Face cache has none)")
    print(f"mode         {cfg.mode}, world size {d.world}"
          + (f" ({d.nodes} nodes x {d.world // d.nodes} ranks)" if d.nodes > 1 else ""))
    for target, n in d.targets.matches.items():
        print(f"target       {target:<28} matched {n}")
    print(f"router       {report['lora_targets']['router']}")
    if report["router_aux_loss"]["moe"]:
        print(f"router loss  {describe_aux_loss(report['router_aux_loss'])}")
    print(f"trainable    {counts['trainable']:,} ({counts['trainable'] / max(total, 1):.3%} of the base)")
    for cat in CATEGORIES:
        print(f"  {cat:<11} {counts['trainable_by_category'][cat]:,}")


def print_run(d: DryRun) -> None:
    """The data, weights, memory and time plans, experts, packing, attention, the run plan and the adapter kept."""
    cfg = d.cfg
    for problem in d.missing:
        print(f"data missing {problem}")
    if d.tokenizer_source == "carried":
        print(f"tokenizer    Qwen3's own, carried in qwen3_tokenizer/ ({cfg.model_name}'s is not in the Hugging Face "
              "cache and the hub is unreachable; the Qwen3 family shares it)")
    if d.tokenizer is None:
        where = "offline (not in the Hugging Face cache; the hub is unreachable)" if not hub_reachable() else \
            "(not in the Hugging Face cache, and the hub did not give it)"
        print(f"data         token lengths skipped: the tokenizer of {cfg.model_name} is not available {where}; "
              "examples counted only")
    for name, lengths in d.data.items():
        print(f"data {name:<7} {lengths['examples']:,} examples"
              + (f"; {describe_lengths(cfg, lengths)}" if "tokens" in lengths else ""))
    print(f"weights      {describe_storage(d.storage)}")
    print_memory(cfg, d.memory, d.work, d.gen_measured, d.loading)
    for name, t in d.timing.items():
        for i, line in enumerate(t.describe()):
            print(f"{'time ' + name if i == 0 else '':<12} {line}")
    if d.gpus.experts:
        print(f"experts      {d.gpus.experts} on a GPU (experts_implementation={cfg.experts_implementation}, "
              f"backend {d.gpus.backend})")
    packing = (f"on: several examples per padding-free row of up to {cfg.max_length} tokens" if cfg.packing
               else "off: one example per row")
    layout = ("; a micro-batch's rows flattened into one sequence" if d.here.rows_flattened
              else "; rows side by side" if cfg.packing else "")
    print(f"packing      {packing}{layout} (rows counted when training starts)")
    print(f"attention    {d.here.attention} on this machine (attn_implementation={cfg.attn_implementation})")
    print(f"run plan     {d.here.describe()}")
    if d.gpus is not d.here:  # this machine has no GPU: the plan the same launch gets on GPUs
        flash = (cfg.attn_implementation == "auto" and cfg.dtype != "float32" and d.gpus.attention != "flash_attention_2")
        print(f"  GPU run    {d.gpus.describe()}" + ("; flash_attention_2 where flash-attn imports" if flash else ""))
    print(f"adapter      {describe_plan(cfg).removeprefix('adapter/ = ')}")


def preflight(cfg: FinetuneConfig, world: int = 1, nodes: int = 1) -> int:
    """`world`: the number of ranks the run will use (--nproc x --nnodes, or torchrun's WORLD_SIZE), on
    `nodes` machines."""
    d = plan_dry_run(cfg, world, nodes)
    report = dry_run_report(d)
    print("\n=== preflight (dry run: nothing was trained) ===")
    print_model(d, report)
    print_run(d)
    print(json.dumps(report, ensure_ascii=False))
    return 0
