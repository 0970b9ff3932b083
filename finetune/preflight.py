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
import functools
import json
import math
from pathlib import Path

from callbacks.generation_eval import ANSWER_MARGIN_TOKENS, answer_token_budget, gold_answer_lengths, prompt_lengths
from core.records import seeded_subset
from data_tools.stats import length_report
from finetune import config as config_mod
from finetune.config import ConfigError, FinetuneConfig
from finetune.data import load_split
from finetune.lora import CATEGORIES, count_parameters, plan_targets
from finetune.memory import AUTO_GEN_BATCHES, GIB, MemoryPlan, Shape, Workload, plan, shape_of
from finetune.moe import describe as describe_aux_loss
from finetune.moe import router_aux_loss_setting, use_experts_implementation
from finetune.quant_experts import NF4_BYTES_PER_WEIGHT, describe_storage
from finetune.selection import describe_plan
from finetune.stages import flattens_packed_rows, stages_for
from finetune.timing import TimePlan, gpu_rates, time_plan

REPO = Path(__file__).resolve().parent.parent
HUB_PROBE_TIMEOUT_S = 3


@functools.cache
def hub_reachable() -> bool:
    """False in offline mode (HF_HUB_OFFLINE=1) or when the hub does not answer within a few seconds.
    Asked once, before any download: for a file missing from the cache, huggingface_hub retries an
    unreachable hub 5 times with backoff (~25 s) before it gives up."""
    import httpx
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return True


def load_model_config(cfg: FinetuneConfig):
    """(config, the shipped file used or None): the local cache (or folder) first, then the config this
    repository ships, then the hub."""
    from transformers import AutoConfig

    from finetune.model import resolve_model_path, shipped_model_config

    path, kwargs = resolve_model_path(cfg.model_name), {"trust_remote_code": cfg.trust_remote_code}
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs), None
    except (OSError, ValueError):  # not cached (ValueError: not a valid repo id or folder either)
        pass
    shipped = shipped_model_config(cfg.model_name)
    if shipped:
        return AutoConfig.from_pretrained(str(shipped), **kwargs), shipped
    if not hub_reachable():
        raise ConfigError(f"no config for {cfg.model_name}: it is not in the Hugging Face cache, "
                          "finetune/model_configs/ ships none, and the hub is unreachable (HF_HUB_OFFLINE or "
                          f"no network). Fetch it where the hub is reachable (hf download {cfg.model_name} "
                          "config.json), or set model_name to a local model folder")
    try:
        return AutoConfig.from_pretrained(path, **kwargs), None
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the config of {cfg.model_name} from the hub: "
                          f"{first_line}") from None


def load_tokenizer_if_available(cfg: FinetuneConfig, model_type: str = ""):
    """(tokenizer, where it came from): the cache (or a local folder), else the hub when it answers, else for
    a Qwen3-family model the copy this repository carries (core/qwen3_tokenizer.py); else (None, why)."""
    from finetune.model import load_tokenizer

    try:
        return load_tokenizer(cfg, local_files_only=True), "cache"
    except (OSError, ValueError):
        pass
    if hub_reachable():
        try:
            return load_tokenizer(cfg), "hub"
        except (OSError, ValueError):
            pass
    if model_type.startswith("qwen3"):
        from transformers import AutoTokenizer

        from core import qwen3_tokenizer
        from finetune.model import apply_chat_template_choice

        tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer.folder()))
        apply_chat_template_choice(tokenizer, cfg)
        return tokenizer, "carried"
    return None, "unavailable"


def meta_model(cfg: FinetuneConfig):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model import torch_dtype

    model_config, shipped = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, model_config, shipped


QUANTIZED = ("attention", "dense_mlp", "experts")  # what load_in_4bit stores as NF4 (experts: quant_experts)


def planned_storage(model, cfg: FinetuneConfig) -> dict[str, dict[str, float]]:
    """{category: {storage: bytes}} the run will hold, from the meta model: NF4 where 4-bit applies,
    else the load dtype; on the hf backend PEFT's kbit preparation upcasts the rest to float32."""
    from finetune.lora import category
    from finetune.model import choose_backend

    rest = cfg.dtype
    if cfg.load_in_4bit and choose_backend(cfg.backend)[0] == "hf":
        rest = "float32"
    out: dict[str, dict[str, float]] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:  # the LoRA weights are the plan's own component (finetune/memory.py)
            continue
        cat = category(name)
        kind = "4bit" if cfg.load_in_4bit and cat in QUANTIZED else rest
        size = param.numel() * (NF4_BYTES_PER_WEIGHT if kind == "4bit" else {"float32": 4}.get(kind, 2))
        out.setdefault(cat, {})
        out[cat][kind] = out[cat].get(kind, 0) + size
    return out


def weights_while_loading(storage: dict) -> float | None:
    """Bytes of the weights before the MoE experts are quantized (they load in the 16-bit compute dtype;
    finetune/quant_experts.py packs them after loading); None when no expert is 4-bit."""
    experts = storage.get("experts", {}).get("4bit", 0)
    if not experts:
        return None
    weights = sum(size for kinds in storage.values() for size in kinds.values())
    return weights - experts + experts / NF4_BYTES_PER_WEIGHT * 2


def workload(cfg: FinetuneConfig, tokenizer, eval_records: list[dict] | None) -> tuple[Workload, bool]:
    """(the sizes the memory peaks depend on, whether the generation eval's were measured): packed rows
    are full (micro_batch_size x max_length tokens); the generation batch's prompt and answer budget are
    the eval set's longest, else bounded by max_length."""
    gen_batch = (cfg.gen_eval_batch_size or AUTO_GEN_BATCHES[0]) if cfg.gen_eval and cfg.eval_file else 0
    prompt, answer, measured = cfg.max_length, cfg.max_length + ANSWER_MARGIN_TOKENS, False
    if gen_batch and tokenizer is not None and eval_records:
        prompt = max(prompt_lengths(eval_records, tokenizer))
        answer, measured = answer_token_budget(eval_records, tokenizer), True
    work = Workload(tokens=cfg.micro_batch_size * cfg.max_length, gen_batch=gen_batch, prompt_tokens=prompt,
                    new_tokens=answer, checkpointing=cfg.gradient_checkpointing, distill=cfg.distill_lambda > 0,
                    gen_batch_auto=cfg.gen_eval_batch_size == 0)
    return work, measured


def gen_eval_records(cfg: FinetuneConfig) -> list[dict] | None:
    """The records the generation eval will score (None without an eval file or generation eval)."""
    if not (cfg.gen_eval and cfg.eval_file and Path(cfg.eval_file).is_file()):
        return None
    return seeded_subset(load_split(cfg.eval_file, cfg.eval_max_samples, cfg.seed), cfg.gen_eval_max_samples,
                         cfg.seed) or None


def memory_shape(cfg: FinetuneConfig, model, model_config, trainable: int, backend: str) -> Shape:
    """What the memory estimate needs of the meta model with LoRA on it: the base weights as they will be
    stored (LoRA left out: it is its own component), the LoRA size, and how LoRA reaches the experts."""
    storage = planned_storage(model, cfg)
    base = sum(size for kinds in storage.values() for size in kinds.values())
    experts_lora = any("lora_" in name and ".experts." in name for name, _ in model.named_parameters())
    # Unsloth keeps PEFT's fold on a CPU (finetune.moe.expert_lora_path) and replaces it on a GPU (its
    # source; unmeasured there): the plan counts the fold on every backend until a GPU shows otherwise
    fold = "nf4" if cfg.load_in_4bit else "peft"
    return shape_of(model_config, base, trainable, fold=fold if experts_lora else "",
                    dtype_bytes=4 if cfg.dtype == "float32" else 2,
                    head_fp32=bool(storage.get("embeddings", {}).get("float32")),
                    lora_bytes=2 if cfg.load_in_4bit and backend == "hf" else 4)


def memory_plan(cfg: FinetuneConfig, model, model_config, trainable: int, backend: str, world: int,
                work: Workload, *, gpu: bool = True) -> MemoryPlan:
    """The plan of one rank from the meta model (LoRA applied); a bf16 plan also prices 4-bit as a way out."""
    four_bit = None
    if not cfg.load_in_4bit and cfg.dtype != "float32":
        four_bit = memory_shape(dataclasses.replace(cfg, load_in_4bit=True), model, model_config, trainable, backend)
    return plan(cfg, memory_shape(cfg, model, model_config, trainable, backend), world, work, gpu=gpu,
                four_bit=four_bit)


def with_lora(model, cfg: FinetuneConfig):
    """(target plan, the meta model with PEFT's LoRA on it, as the hf backend puts it)."""
    from peft import LoraConfig, get_peft_model

    plan = plan_targets(model, cfg)
    return plan, get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **plan.lora_kwargs(cfg)),
                                low_cpu_mem_usage=True)


def run_memory_plan(cfg: FinetuneConfig, world: int) -> MemoryPlan:
    """The real run's plan on a GPU, before any weight loads (seconds: the meta model, the tokenizer, the
    eval set's lengths)."""
    from finetune.model import choose_backend

    model, model_config, _ = meta_model(cfg)
    _, peft_model = with_lora(model, cfg)
    tokenizer, _ = load_tokenizer_if_available(cfg, model_config.model_type)
    work, _ = workload(cfg, tokenizer, gen_eval_records(cfg))
    return memory_plan(cfg, peft_model, model_config, count_parameters(peft_model)["trainable"],
                       choose_backend(cfg.backend)[0], world, work)


def stage_steps(cfg: FinetuneConfig, stage, report: dict, world: int) -> int:
    """Optimizer steps of a stage from its measured lengths and, packed, the examples a row holds."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = world * cfg.micro_batch_size * cfg.gradient_accumulation_steps
    packed = cfg.packing and report["examples_per_row"]  # an empty file has no rows to pack
    rows = report["examples"] / report["examples_per_row"] if packed else report["examples"]
    return max(1, math.ceil(rows * stage.num_epochs / per_step))


def describe_lengths(cfg: FinetuneConfig, d: dict) -> str:
    """One stage's measured token figures: percentiles, what max_length cuts, the examples per packed row."""
    cut = f"over max_length {d['max_length']}: ~{d['over_max_length']:,} ({d['over_share']:.1%})"
    if d["over_max_length"]:
        cut += (f": ~{d['answer_cut']:,} lose the end of their answer, ~{d['prompt_over']:,} are dropped "
                "(the prompt alone fills max_length)")
    rows = f"; ~{d['examples_per_row']:.1f} examples per packed row" if cfg.packing else ""
    return (f"tokens {d['tokens']}, mean {d['tokens_mean']:.0f} (measured on {d['measured']:,}); {cut}{rows}")


def time_plans(cfg: FinetuneConfig, shape, rank: int, world: int, tokenizer, data: dict,
               gen_batch: int) -> dict[str, TimePlan]:
    """Each stage's time on the GPU the run will use (the default's rates without one): training from the
    measured lengths, the generation eval on the records it will score."""
    import torch

    rates = gpu_rates(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    records = gen_eval_records(cfg) if tokenizer is not None else None
    prompts = prompt_lengths(records, tokenizer) if records else []
    answers = gold_answer_lengths(records, tokenizer) if records else []
    budget = max(answers) + ANSWER_MARGIN_TOKENS if answers else 0
    evaluated = load_split(cfg.eval_file, cfg.eval_max_samples, cfg.seed) if records else []
    eval_examples = len(evaluated)
    # eval_loss runs the full chats: a prompt and its answer
    eval_mean = (sum(prompts) + sum(answers)) / len(prompts) if prompts else 0
    plans = {}
    for stage in stages_for(cfg):
        report = data.get(stage.name)
        if not report or "tokens_mean" not in report or not report["examples"]:
            continue
        mean = min(report["tokens_mean"], cfg.max_length)
        micro = cfg.micro_batch_size * (cfg.max_length if cfg.packing else mean)
        plans[stage.name] = time_plan(
            shape, rates, step_tokens=round(micro * cfg.gradient_accumulation_steps), micro_tokens=round(micro),
            steps=stage_steps(cfg, stage, report, world), eval_steps=cfg.eval_steps, context=mean / 2, rank=rank,
            checkpointing=cfg.gradient_checkpointing, prompts=prompts, answers=answers,
            gen_batch=gen_batch, world=world, budget=budget,
            loss_examples=eval_examples, loss_batch=cfg.eval_batch_size, loss_tokens=round(eval_mean),
            examples_per_step=world * cfg.micro_batch_size * cfg.gradient_accumulation_steps
            * (report["examples_per_row"] if cfg.packing else 1))
    return plans


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


def preflight(cfg: FinetuneConfig, world: int = 1, nodes: int = 1) -> int:
    """`world`: the number of ranks the run will use (--nproc x --nnodes, or torchrun's WORLD_SIZE), on
    `nodes` machines."""
    from finetune.model import attention_implementation, check_attention, choose_backend, expects_unsloth_attention

    model, model_config, shipped_config = meta_model(cfg)
    check_attention(model_config, cfg)
    attention = attention_implementation(cfg)
    # the choice of the run this plans: on a GPU, with the backend `auto` resolves to here
    backend = choose_backend(cfg.backend)[0]
    experts = use_experts_implementation(model, cfg.experts_implementation, on_gpu=True)
    if experts and backend == "unsloth" and cfg.experts_implementation == "auto":
        experts = "unsloth"  # on a GPU, Unsloth's own MoE forward is its default (unsloth_zoo moe_experts_interface)
    shipped_config = str(shipped_config.relative_to(REPO)) if shipped_config else None
    base_counts = count_parameters(model)
    plan, peft_model = with_lora(model, cfg)
    counts = count_parameters(peft_model)
    tokenizer, tokenizer_source = load_tokenizer_if_available(cfg, model_config.model_type)
    missing = config_mod.missing_data(cfg)  # only a dry run gets here with files missing
    data = {}
    for stage in stages_for(cfg):
        if not Path(stage.train_file).is_file():
            continue
        records = load_split(stage.train_file, cfg.max_train_samples, cfg.seed)
        data[stage.name] = (length_report(records, tokenizer, cfg.max_length) if tokenizer is not None
                            else {"examples": len(records)})
    storage = planned_storage(model, cfg)
    work, gen_measured = workload(cfg, tokenizer, gen_eval_records(cfg))
    memory = memory_plan(cfg, peft_model, model_config, counts["trainable"], backend, world, work)
    launcher = memory.estimate.launcher
    timing = time_plans(cfg, memory_shape(cfg, peft_model, model_config, counts["trainable"], backend),
                        plan.expert_rank or cfg.lora_r, world, tokenizer, data, memory.gen_batch)
    loading = weights_while_loading(storage)
    report = {
        "model": cfg.model_name, "model_config_shipped": shipped_config, "model_class": type(model).__name__,
        "mode": cfg.mode, "world_size": world, "nodes": nodes, "deepspeed": memory.deepspeed or None,
        "zero_stage": launcher.zero_stage, "optimizer_offload": launcher.offload, "quantization": "4-bit NF4" if cfg.load_in_4bit else cfg.dtype,
        "base_parameters": base_counts["total"],
        "lora_targets": {"modules": plan.modules, "parameters": plan.parameters,
                         "matches": plan.matches, "router": "trained" if plan.router else "frozen",
                         "expert_rank": plan.expert_rank if plan.parameters else None},
        "trainable_parameters": counts["trainable"],
        "trainable_by_category": counts["trainable_by_category"],
        "router_aux_loss": router_aux_loss_setting(cfg, model_config),
        "weight_storage_bytes": {cat: {kind: round(size) for kind, size in kinds.items()}
                                 for cat, kinds in storage.items()},
        "data": data, "missing_data": missing, "token_lengths": tokenizer is not None,
        "tokenizer": tokenizer_source,
        "gen_eval_answer_tokens": work.new_tokens if gen_measured else None,
        "gen_eval_prompt_tokens": work.prompt_tokens if gen_measured else None,
        "memory": {**memory.report(), "weights_while_loading_gib": round(loading / GIB, 2) if loading else None},
        "packing": cfg.packing, "experts_implementation": experts, "attn_implementation": attention,
        "time": {name: t.report() for name, t in timing.items()},
    }
    print("\n=== preflight (dry run: nothing was trained) ===")
    print(f"model        {cfg.model_name} ({report['model_class']}), {base_counts['total']:,} parameters, "
          f"{report['quantization']}")
    if shipped_config:
        print(f"model config: {shipped_config} (shipped copy; the Hugging Face cache has none)")
    print(f"mode         {cfg.mode}, world size {world}"
          + (f" ({nodes} nodes x {world // nodes} ranks)" if nodes > 1 else ""))
    for target, n in plan.matches.items():
        print(f"target       {target:<28} matched {n}")
    print(f"router       {report['lora_targets']['router']}")
    aux = report["router_aux_loss"]
    if aux["moe"]:
        print(f"router loss  {describe_aux_loss(aux)}")
    share = counts["trainable"] / max(base_counts["total"], 1)
    print(f"trainable    {counts['trainable']:,} ({share:.3%} of the base)")
    for cat in CATEGORIES:
        print(f"  {cat:<11} {counts['trainable_by_category'][cat]:,}")
    for problem in missing:
        print(f"data missing {problem}")
    if tokenizer_source == "carried":
        print(f"tokenizer    Qwen3's own, carried in qwen3_tokenizer/ ({cfg.model_name}'s is not in the Hugging Face "
              "cache and the hub is unreachable; the Qwen3 family shares it)")
    if tokenizer is None:
        where = "offline (not in the Hugging Face cache; the hub is unreachable)" if not hub_reachable() else \
            "(not in the Hugging Face cache, and the hub did not give it)"
        print(f"data         token lengths skipped: the tokenizer of {cfg.model_name} is not available {where}; "
              "examples counted only")
    for name, d in data.items():
        print(f"data {name:<7} {d['examples']:,} examples" + (f"; {describe_lengths(cfg, d)}" if "tokens" in d else ""))
    print(f"weights      {describe_storage(storage)}")
    print_memory(cfg, memory, work, gen_measured, loading)
    for name, t in timing.items():
        for i, line in enumerate(t.describe()):
            print(f"{'time ' + name if i == 0 else '':<12} {line}")
    if experts:
        print(f"experts      {experts} on a GPU (experts_implementation={cfg.experts_implementation}, "
              f"backend {backend})")
    packing = (f"on: several examples per padding-free row of up to {cfg.max_length} tokens" if cfg.packing
               else "off: one example per row")
    flattened = cfg.packing and (flattens_packed_rows(cfg)
                                 or expects_unsloth_attention(model_config.model_type, backend))
    layout = ("; a micro-batch's rows flattened into one sequence" if flattened
              else "; rows side by side" if cfg.packing else "")
    print(f"packing      {packing}{layout} (rows counted when training starts)")
    print(f"attention    {attention} on this machine (attn_implementation={cfg.attn_implementation})")
    print(f"adapter      {describe_plan(cfg).removeprefix('adapter/ = ')}")
    print(json.dumps(report, ensure_ascii=False))
    return 0
