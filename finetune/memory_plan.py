"""The memory plan: which launcher a run uses (`deepspeed=auto`), whether its peaks (finetune/memory.py)
fit the device, the generation-eval batch that fits, and what would fit instead. Nothing here loads
weights: the dry run and the real run's pre-load check (`run_memory_plan`) both plan from the meta model
with LoRA on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from callbacks.generation_eval import ANSWER_MARGIN_TOKENS, answer_token_budget, prompt_lengths
from finetune.config_schema import FinetuneConfig
from finetune.data import gen_eval_records
from finetune.lora import count_parameters, plan_targets
from finetune.memory import (DEFAULT_DEVICE_GIB, FIT_SHARE, GIB, REPO, ZERO2_OFFLOAD, ZERO2_ON_GPU, Estimate, Shape,
                             estimate, launcher_of, shape_of)
from finetune.model_source import load_tokenizer_if_available, meta_model
from finetune.quant_experts import NF4_BYTES_PER_WEIGHT

if TYPE_CHECKING:
    from finetune.run_plan import RunPlan


@dataclass
class Workload:
    """The run's sizes that the peaks depend on (the dry run measures the token counts when it can)."""
    tokens: int  # per micro-batch: micro_batch_size x max_length (packed rows are full)
    gen_batch: int  # 0: no generation eval
    prompt_tokens: int  # the longest eval prompt (else max_length)
    new_tokens: int  # the answer budget
    checkpointing: bool = True
    distill: bool = False
    gen_batch_auto: bool = False  # gen_eval_batch_size=0: the plan picks the largest of AUTO_GEN_BATCHES that fits


# A decode step on the MoE reads about the same weights for 16 rows as for 64 (and on PEFT's path refolds
# every expert): bigger batches cost little more per step and share it (finetune/timing.py).
AUTO_GEN_BATCHES = (64, 32, 16, 8, 4, 2, 1)
CPU_GEN_BATCH = 16  # a CPU decodes 16 rows faster than 32 (bench/generation_eval.py)


def deepspeed_candidates(cfg, world: int, gpu: bool) -> tuple[list[str], str]:
    """([DeepSpeed config, or "" for none, in order of preference], why). `deepspeed=auto`: ZeRO-2 in bf16 on
    several GPUs, the optimizer on the GPU first (faster: no CPU Adam, nothing to compile), offloaded when
    that alone fits; plain DDP elsewhere."""
    if cfg.deepspeed not in ("auto", "none", ""):
        return [cfg.deepspeed], "deepspeed set"
    if cfg.deepspeed != "auto":
        return [""], "deepspeed=none"
    if cfg.load_in_4bit:
        return [""], "auto: 4-bit weights cannot be sharded by ZeRO; DDP"
    if world <= 1:
        return [""], "auto: one rank, nothing to shard"
    if not gpu:
        return [""], "auto: no GPU (DDP over gloo)"
    return [str(ZERO2_ON_GPU), str(ZERO2_OFFLOAD)], f"auto: bf16 LoRA on {world} GPUs"


def device_gib(cfg) -> float:
    """The memory of this rank's device: `device_memory_gib` when set, else the GPU's, else the 80 GB card."""
    if cfg.device_memory_gib > 0:
        return cfg.device_memory_gib
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return DEFAULT_DEVICE_GIB


def fits(est: Estimate, device: float) -> bool:
    return max(est.training_peak, est.generation_peak) <= FIT_SHARE * device * GIB


def run_estimate(shape: Shape, deepspeed: str, world: int, work: Workload, gpu: bool = True) -> Estimate:
    return estimate(shape, launcher_of(deepspeed, world), tokens=work.tokens, gpu=gpu, checkpointing=work.checkpointing,
                    distill=work.distill, gen_batch=work.gen_batch, prompt_tokens=work.prompt_tokens,
                    new_tokens=work.new_tokens)


@dataclass
class MemoryPlan:
    deepspeed: str  # the chosen config ("" = none)
    why: str
    estimate: Estimate
    device_gib: float
    fits: bool
    options: list[tuple[str, Estimate]] = field(default_factory=list)  # what would fit, when it does not
    gen_batch: int = 0  # the generation-eval batch planned (chosen here for gen_eval_batch_size=0)
    gen_batch_auto: bool = False

    def report(self) -> dict:
        def gib(x: float) -> float:
            return round(x / GIB, 2)

        est = self.estimate
        return {"launcher": est.launcher.describe(), "deepspeed": self.deepspeed or None, "why": self.why,
                "training_peak_gib": gib(est.training_peak), "gen_eval_peak_gib": gib(est.generation_peak),
                "device_gib": round(self.device_gib, 1), "fits": self.fits,
                "training_gib": {k: gib(v) for k, v in est.training.items()},
                "gen_eval_gib": {k: gib(v) for k, v in est.generation.items()},
                "overhead_gib": gib(est.overhead),
                "gen_eval_batch_size": self.gen_batch or None, "gen_eval_batch_size_auto": self.gen_batch_auto,
                "options": [{"change": change, "training_peak_gib": gib(o.training_peak),
                             "gen_eval_peak_gib": gib(o.generation_peak)} for change, o in self.options]}

    def describe(self) -> str:
        est, limit = self.estimate, FIT_SHARE * self.device_gib
        verdict = "fits" if self.fits else "does NOT fit"
        gen = f", generation eval {est.generation_peak / GIB:.1f} GiB" if est.generation else ""
        return (f"training {est.training_peak / GIB:.1f} GiB{gen} per device with {est.launcher.describe()} "
                f"({self.why}): {verdict} a device of {self.device_gib:.0f} GiB (limit {limit:.0f} GiB, 90%)")

    def describe_options(self) -> list[str]:
        """One line per way out: what to change, its peaks, whether it fits alone."""
        return [f"{change}: training {est.training_peak / GIB:.1f} GiB, generation eval "
                f"{est.generation_peak / GIB:.1f} GiB ({'fits' if fits(est, self.device_gib) else 'still over'})"
                for change, est in self.options]


def plan(cfg, shape: Shape, world: int, work: Workload, gpu: bool = True,
         four_bit: Shape | None = None) -> MemoryPlan:
    """The launcher (for `deepspeed=auto`) and the verdict; when it does not fit, the changes that would
    (or, when none does alone, the three that come closest). `four_bit`: the same run with 4-bit base
    weights, offered as a way out of a bf16 plan."""
    device = device_gib(cfg)
    candidates, why = deepspeed_candidates(cfg, world, gpu)
    # the launcher first (a faster training step matters more than a larger generation batch), then the
    # largest generation batch it fits (gen_eval_batch_size=0)
    batches = AUTO_GEN_BATCHES if work.gen_batch and work.gen_batch_auto else (work.gen_batch,)
    scored = [(ds, replace(work, gen_batch=batch)) for ds in candidates for batch in batches]
    scored = [(ds, w, run_estimate(shape, ds, world, w, gpu)) for ds, w in scored]
    chosen = next(((ds, w, est) for ds, w, est in scored if fits(est, device)),
                  min(scored, key=lambda item: max(item[2].training_peak, item[2].generation_peak)))
    work = chosen[1]
    result = MemoryPlan(chosen[0], why, chosen[2], device, fits(chosen[2], device), gen_batch=work.gen_batch,
                        gen_batch_auto=work.gen_batch_auto)
    if not result.fits:
        options = list(alternatives(shape, chosen[0], world, work, gpu, four_bit))
        result.options = [(change, est) for change, est in options if fits(est, device)] or sorted(
            options, key=lambda pair: max(pair[1].training_peak, pair[1].generation_peak))[:3]
    return result


def alternatives(shape: Shape, deepspeed: str, world: int, work: Workload, gpu: bool, four_bit: Shape | None):
    """(change, estimate) for the usual ways out, each alone: the other ZeRO-2 placement, the largest
    generation batch that fits, shorter rows, 4-bit base weights."""
    if shape.lora_params and world > 1:
        for ds, change in ((str(ZERO2_ON_GPU), f"--deepspeed {ZERO2_ON_GPU.relative_to(REPO)}"),
                           (str(ZERO2_OFFLOAD), f"--deepspeed {ZERO2_OFFLOAD.relative_to(REPO)}")):
            if ds != deepspeed:
                yield change, run_estimate(shape, ds, world, work, gpu)
    batch = work.gen_batch // 2
    while batch >= 1:
        est = run_estimate(shape, deepspeed, world, Workload(**{**vars(work), "gen_batch": batch}), gpu)
        if est.generation_peak <= est.training_peak or batch == 1:  # smaller batches gain nothing more
            yield f"gen_eval_batch_size={batch}", est
            break
        batch //= 2
    if work.tokens > 512:
        yield (f"max_length={work.tokens // 2} (micro-batch tokens halved)",
               run_estimate(shape, deepspeed, world, Workload(**{**vars(work), "tokens": work.tokens // 2}), gpu))
    if four_bit is not None:
        yield "--mode two-stage or load_in_4bit=true (4-bit NF4 base weights, DDP)", \
            run_estimate(four_bit, "", world, work, gpu)


# --- the plan of a run from its meta model (no weights), for the dry run and the real run's check ---------

QUANTIZED = ("attention", "dense_mlp", "experts")  # what load_in_4bit stores as NF4 (experts: quant_experts)


def planned_storage(model, cfg: FinetuneConfig, backend: str) -> dict[str, dict[str, float]]:
    """{category: {storage: bytes}} the run will hold, from the meta model: NF4 where 4-bit applies,
    else the load dtype; on the hf backend PEFT's kbit preparation upcasts the rest to float32."""
    from finetune.lora import category

    rest = cfg.dtype
    if cfg.load_in_4bit and backend == "hf":
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


def memory_shape(cfg: FinetuneConfig, model, model_config, trainable: int, backend: str) -> Shape:
    """What the memory estimate needs of the meta model with LoRA on it: the base weights as they will be
    stored (LoRA left out: it is its own component), the LoRA size, and how LoRA reaches the experts."""
    storage = planned_storage(model, cfg, backend)
    base = sum(size for kinds in storage.values() for size in kinds.values())
    experts_lora = any("lora_" in name and ".experts." in name for name, _ in model.named_parameters())
    # Unsloth keeps PEFT's fold on a CPU (finetune.moe.expert_lora_path) and replaces it on a GPU (its
    # source; unmeasured there): the plan counts the fold on every backend until a GPU shows otherwise
    fold = "nf4" if cfg.load_in_4bit else "peft"
    return shape_of(model_config, base, trainable, fold=fold if experts_lora else "",
                    dtype_bytes=4 if cfg.dtype == "float32" else 2,
                    head_fp32=bool(storage.get("embeddings", {}).get("float32")),
                    lora_bytes=2 if cfg.load_in_4bit and backend == "hf" else 4)


def plan_from_model(cfg: FinetuneConfig, model, model_config, trainable: int, backend: str, world: int,
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


def run_memory_plan(cfg: FinetuneConfig, run: RunPlan) -> MemoryPlan:
    """The real run's plan on a GPU, before any weight loads (seconds: the meta model, the tokenizer, the
    eval set's lengths)."""
    model, model_config, _ = meta_model(cfg)
    _, peft_model = with_lora(model, cfg)
    tokenizer, _ = load_tokenizer_if_available(cfg, model_config.model_type)
    work, _ = workload(cfg, tokenizer, gen_eval_records(cfg))
    return plan_from_model(cfg, peft_model, model_config, count_parameters(peft_model)["trainable"],
                           run.backend, run.world, work)
