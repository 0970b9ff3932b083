"""How much memory one rank of a run needs: a training peak and a generation-eval peak, by component.

Built from what the pinned libraries allocate, and checked against tensor-level
measurements at Qwen3-30B-A3B's real widths on a CPU (`python -m bench.memory`):

- resident through the run: the base weights as stored, the LoRA weights,
  gradients and optimizer state, placed by the launcher (plain DDP or
  DeepSpeed ZeRO-2, with or without optimizer offload) and sharded by the
  world size;
- training step: with gradient checkpointing, every layer's input is kept and
  one layer at a time is recomputed during backward; the LM head and loss (TRL's
  chunked kernel on a GPU, full-vocabulary float32 logits on a CPU); on the hf
  backend PEFT folds W + BA over all of a layer's experts at every forward;
- generation eval: the KV cache of one batch, the prefill of one layer and the
  same fold, while the training state stays resident.

Nothing here loads weights: the dry run and the real run's pre-load check
both call `plan(...)` with the meta model's parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 1024 ** 3
REPO = Path(__file__).resolve().parent.parent
ZERO2_OFFLOAD = REPO / "deepspeed_configs" / "zero2.json"
ZERO2_ON_GPU = REPO / "deepspeed_configs" / "zero2_no_offload.json"
FIT_SHARE = 0.9  # a plan fits when both peaks stay under 90% of the device: fragmentation, CUDA context
CUDA_CONTEXT_GIB = 0.75  # CUDA context, cuBLAS/NCCL workspaces: outside the caching allocator's tensors
DEFAULT_DEVICE_GIB = 80.0  # the dry run's device without a GPU: the user's 80 GB H100/A100


@dataclass(frozen=True)
class Launcher:
    """How the LoRA state is placed: zero_stage 0 = plain DDP (or one process)."""
    zero_stage: int = 0
    offload: bool = False
    world: int = 1
    deepspeed: str = ""  # the config file, for the report

    def describe(self) -> str:
        if not self.zero_stage:
            return "DDP" if self.world > 1 else "one process"
        return f"ZeRO-{self.zero_stage}" + (", optimizer offloaded to the CPU" if self.offload else "")


def launcher_of(deepspeed: str, world: int) -> Launcher:
    if not deepspeed:
        return Launcher(world=world)
    zero = json.loads(Path(deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    return Launcher(int(zero.get("stage", 0)), offload, world, deepspeed)


@dataclass
class Shape:
    """What the estimate needs of the model and the run, all counts (no weights)."""
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int  # 0: dense
    top_k: int
    expert_width: int  # moe_intermediate_size (dense: intermediate_size)
    base_bytes: float  # the base weights as stored (4-bit where quantized), LoRA excluded
    lora_params: int
    # fused expert weights of one layer that get LoRA folded in at each forward, and how: "peft" (hf backend,
    # PEFT's ParamWrapper), "nf4" (our 4-bit experts dequantize, then fold), "" (none, or Unsloth's kernels)
    expert_fold_weights: int = 0
    fold: str = ""
    dtype_bytes: int = 2
    head_fp32: bool = False  # the LM head weight in float32 under bf16 compute (PEFT's 4-bit preparation)
    # LoRA weights (and so their gradients and AdamW moments): float32 as PEFT upcasts them; the 4-bit hf
    # path keeps them in bf16 (measured: bench/memory.py, optimizer state 4 bytes per trainable parameter)
    lora_bytes: int = 4


def shape_of(model_config, base_bytes: float, lora_params: int, *, fold: str = "", dtype_bytes: int = 2,
             head_fp32: bool = False, lora_bytes: int = 4) -> Shape:
    text = model_config.get_text_config()
    experts = getattr(text, "num_experts", 0) or 0
    width = getattr(text, "moe_intermediate_size", None) if experts else text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shape(text.num_hidden_layers, text.hidden_size, text.vocab_size, text.num_attention_heads,
                 text.num_key_value_heads, head_dim, experts, getattr(text, "num_experts_per_tok", 0) or 0,
                 width, base_bytes, lora_params,
                 expert_fold_weights=experts * 3 * width * text.hidden_size if fold and experts else 0,
                 fold=fold if experts else "", dtype_bytes=dtype_bytes, head_fp32=head_fp32,
                 lora_bytes=lora_bytes)


def resident(shape: Shape, launcher: Launcher) -> dict[str, float]:
    """Bytes held from the first step to the end: weights and the LoRA training state.

    Plain DDP (transformers + PEFT): LoRA in float32 (PEFT upcasts adapters), float32 gradients and, with
    more than one rank, DDP's gradient buckets of the same size; AdamW's two float32 moments.
    DeepSpeed (bf16): the module, LoRA included, is cast to bf16; ZeRO-1/2 shard the float32 master copy
    and the moments over the ranks (in CPU memory when offloaded) and ZeRO-2 the gradients too."""
    p, w, lb = shape.lora_params, launcher.world, shape.lora_bytes
    if not launcher.zero_stage:
        grads = lb * p * (2 if w > 1 else 1)
        return {"weights": shape.base_bytes, "lora_weights": lb * p, "lora_grads": grads, "optimizer": 2 * lb * p}
    optimizer = 0 if launcher.offload else 12 * p / w  # fp32 master + two moments, this rank's shard
    grads = (4 * p / w) if launcher.zero_stage >= 2 else 2 * p
    if launcher.offload:
        grads = 0  # reduced straight into the pinned CPU partition
    return {"weights": shape.base_bytes, "lora_weights": 2 * p, "lora_grads": grads, "optimizer": optimizer}


# Bytes per fused expert weight of one layer while LoRA is folded in, measured at real widths on a CPU
# (bench/memory.py, bench/RESULTS.md). Forward: PEFT's `_LoraFactorsProxy` makes W + BA with one baddbmm, a
# bf16 copy of each expert weight (2); our NF4 experts dequantize, then fold: the folded gate_up stays while
# down_proj (a third of the weights) is dequantized and folded (2 + 2/3). The recomputed layer's backward
# holds about 7 (the folded copies, their bf16 gradients and the dequantized weights, both paths).
# "" = no fold (a model without expert LoRA).
FOLD_BYTES = {"peft": {"forward": 2, "backward": 7}, "nf4": {"forward": 8 / 3, "backward": 7},
              "": {"forward": 0, "backward": 0}}
# The CPU fallback of TRL's loss (finetune/trl_cpu.py) holds, per trained position (TRL computes the head
# on positions with a label only) and vocabulary entry: the logits in the compute dtype, their float32
# copy, the log-softmax, and its exp and product for the entropy (measured 16-18 bytes). A float32 head
# weight under bf16 autocast is also cast to a bf16 copy at every call.
CPU_HEAD_FLOAT_BYTES = 4 * 4


def layer_activations(shape: Shape, tokens: int) -> float:
    """One layer's forward tensors kept for its backward: norms, q/k/v/o and the attention output; the
    router's float32 logits and softmax; per routed token its input, gate/up, the activation, the down
    projection (dense: the MLP's three projections)."""
    h, b = shape.hidden, shape.dtype_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = tokens * (4 * h * b + (2 * q + 2 * kv) * b + shape.heads * 4)
    if not shape.experts:
        return attention + tokens * 3 * shape.expert_width * b
    routed = tokens * shape.top_k
    router = tokens * shape.experts * 4 * 2
    return attention + router + routed * (2 * h * b + 5 * shape.expert_width * b)


def training_step(shape: Shape, tokens: int, *, gpu: bool, checkpointing: bool = True, distill: bool = False,
                  trained_tokens: int | None = None) -> dict[str, float]:
    """Transient bytes of one micro-batch of `tokens` tokens at its peak: the kept layer inputs (or every
    layer's activations without checkpointing), then the larger of the two phases that never overlap, the
    LM head and loss, or one layer's backward with its recomputed forward and the expert fold."""
    h, b = shape.hidden, shape.dtype_bytes
    layer = layer_activations(shape, tokens)
    kept = shape.layers * tokens * h * b if checkpointing else (shape.layers - 1) * layer
    trained = tokens if trained_tokens is None else trained_tokens
    if gpu:  # TRL's chunked LM-head kernel: never the whole logits; the hidden states and their gradient
        head = tokens * h * 4 * 2
    else:
        head = trained * shape.vocab * (b + CPU_HEAD_FLOAT_BYTES)
        if shape.head_fp32 and b == 2:
            head += shape.vocab * h * b
    # distillation: the teacher's logits and the KL's float32 softmaxes, full vocabulary, every position
    teacher = tokens * shape.vocab * (b + 4 * 3) if distill else 0
    backward = layer + shape.expert_fold_weights * FOLD_BYTES[shape.fold]["backward"]
    if head + teacher < backward:
        return {"kept_layer_inputs": kept, "layer_backward": backward}
    return {"kept_layer_inputs": kept, "lm_head_loss": head, **({"distill_teacher": teacher} if distill else {})}


def generation_batch(shape: Shape, batch: int, prompt_tokens: int, new_tokens: int, *,
                     eager_experts: bool = False) -> dict[str, float]:
    """Transient bytes of one generation-eval batch: its KV cache at the last token, and the prefill of one
    layer: the residual stream and its copies, q/k/v, the router, the fold, the last position's logits.
    `eager_experts`: transformers' loop over experts (a CPU) one-hot encodes the routing (int64)."""
    h, b = shape.hidden, shape.dtype_bytes
    kv = batch * (prompt_tokens + new_tokens) * shape.layers * 2 * shape.kv_heads * shape.head_dim * b
    tokens = batch * prompt_tokens
    q, kvw = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    prefill = tokens * (5 * h * b + (q + 2 * kvw) * b + shape.experts * 4) + batch * shape.vocab * 4 * 2
    if eager_experts:
        prefill += tokens * shape.top_k * shape.experts * 8
    return {"kv_cache": kv, "prefill": prefill,
            "expert_fold": shape.expert_fold_weights * FOLD_BYTES[shape.fold]["forward"]}


@dataclass
class Estimate:
    launcher: Launcher
    training: dict[str, float]
    generation: dict[str, float] = field(default_factory=dict)
    overhead: float = 0.0

    @property
    def training_peak(self) -> float:
        return sum(self.training.values()) + self.overhead

    @property
    def generation_peak(self) -> float:
        return sum(self.generation.values()) + self.overhead if self.generation else 0.0


def estimate(shape: Shape, launcher: Launcher, *, tokens: int, gpu: bool = True, checkpointing: bool = True,
             distill: bool = False, gen_batch: int = 0, prompt_tokens: int = 0, new_tokens: int = 0,
             first_step: bool = False, trained_tokens: int | None = None) -> Estimate:
    """Both peaks of one rank. `gen_batch` 0: no generation eval. `gpu`: the CUDA context counts, the LM head
    runs TRL's chunked kernel and the experts a grouped kernel (else the CPU fallback's full logits and the
    eager loop). `first_step`: the optimizer state does not exist yet during the first backward (a bench
    that runs one step measures that peak; every later step holds it)."""
    held = resident(shape, launcher)
    during_step = {k: (0 if first_step and k == "optimizer" else v) for k, v in held.items()}
    training = {**during_step, **training_step(shape, tokens, gpu=gpu, checkpointing=checkpointing,
                                               distill=distill, trained_tokens=trained_tokens)}
    generation = {}
    if gen_batch:
        # gradients were set to None by the step's zero_grad; weights and optimizer state stay
        generation = {**{k: v for k, v in held.items() if k != "lora_grads"},
                      **generation_batch(shape, gen_batch, prompt_tokens, new_tokens, eager_experts=not gpu)}
    return Estimate(launcher, training, generation, CUDA_CONTEXT_GIB * GIB if gpu else 0.0)


# --- the plan: which launcher, and whether it fits ------------------------------------------------------

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
