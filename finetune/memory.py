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

Nothing here loads weights. The plan built on these peaks (which launcher, whether it fits, what would
fit instead) is finetune/memory_plan.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
