"""How long the run takes: its optimizer steps, one generation eval, and the eval's share of the run.

A roofline over the memory plan's `Shape` (finetune/memory.py). A training step and a prefill are matmul
FLOPs at a share of the device's bf16 rate; a decode step is the bytes it reads (the attention weights,
the experts its tokens route to, PEFT's fold of LoRA into every expert, the KV cache, the LM head) at a
share of the memory bandwidth, plus a fixed cost per layer (kernel launches). On a GPU the shares are
assumptions until a GPU measures them; on this CPU `bench/memory.py --time` measures the per-layer times
at the real widths and sets them against this model with the CPU's measured rates (docs/memory.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from callbacks.generation_eval import ANSWER_MARGIN_TOKENS, gold_answer_lengths, prompt_lengths
from finetune.data import gen_eval_records, load_split
from finetune.memory import Shape
from finetune.quant_experts import NF4_BYTES_PER_WEIGHT
from finetune.stages import stages_for

# Memory traffic of one forward's fold per expert weight, bf16: baddbmm(W, B, A) reads W and writes
# W + s·BA (4 bytes), and PEFT's ParamWrapper on a fused expert parameter runs it twice (nested wrappers:
# 4 baddbmm per layer for its 2 parameters, seen in bench/memory.py's runs); the NF4 path first
# dequantizes (reads the codes, writes bf16). peft/tuners/lora/layer.py, finetune/quant_experts.py.
FOLD_TRAFFIC = {"peft": 8.0, "nf4": 8.0 + NF4_BYTES_PER_WEIGHT + 2, "": 0.0}


@dataclass(frozen=True)
class Rates:
    """A device's peak rates and the shares of them the run is assumed (or measured) to reach."""
    name: str
    flops: float  # dense bf16 matmul, FLOP/s
    bandwidth: float  # memory, bytes/s
    matmul_share: float = 0.25  # training and prefill MFU (assumed on a GPU)
    bandwidth_share: float = 0.60  # decode's share of the memory bandwidth (assumed on a GPU)
    layer_overhead_s: float = 4e-4  # per layer and decode step: ~50 kernel launches at ~8 us
    source: str = "datasheet peaks; shares assumed until a GPU probe measures them"


# Dense bf16 peaks without sparsity, HBM bandwidth (NVIDIA's datasheets, SXM parts)
GPUS = {
    "H100": Rates("H100 80GB", 989e12, 3.35e12),
    "H200": Rates("H200 141GB", 989e12, 4.8e12),
    "A100": Rates("A100 80GB", 312e12, 2.039e12),
}
DEFAULT_GPU = "H100"  # the dry run's device without a GPU: the user's 80 GB card


def gpu_rates(device_name: str | None) -> Rates:
    """The rates of the GPU named `device_name` (torch.cuda.get_device_name), else the default's."""
    for key, rates in GPUS.items():
        if device_name and key in device_name.upper():
            return rates
    rates = GPUS[DEFAULT_GPU]
    return replace(rates, name=f"{rates.name} (rates assumed: {device_name} is not in finetune.timing.GPUS)") \
        if device_name else rates


def _per_layer(shape: Shape) -> tuple[float, float, float]:
    """Matmul weights of one layer: (attention + router, the experts one token runs, every expert's)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = h * (2 * q + 2 * kv) + h * shape.experts
    if not shape.experts:
        return attention, 3 * h * shape.expert_width, 3 * h * shape.expert_width
    one_expert = 3 * h * shape.expert_width
    return attention, shape.top_k * one_expert, shape.experts * one_expert


def experts_touched(shape: Shape, tokens: int) -> float:
    """Expected experts one layer runs for `tokens` tokens, each routed to top_k of them (uniform routing:
    the load-balanced case; a skewed router touches fewer)."""
    if not shape.experts:
        return 1.0
    return shape.experts * (1 - (1 - shape.top_k / shape.experts) ** tokens)


def weight_bytes(shape: Shape) -> float:
    """Bytes per stored expert weight: NF4 on the 4-bit path, else the compute dtype."""
    return NF4_BYTES_PER_WEIGHT if shape.fold == "nf4" else shape.dtype_bytes


def train_flops(shape: Shape, tokens: int, *, context: float, rank: int, checkpointing: bool = True) -> float:
    """FLOPs of one micro-batch of `tokens` trained tokens: forward, the input gradients of the frozen
    weights, the forward again under gradient checkpointing; attention over `context` tokens on average
    (a packed row attends within its example); the LM head's forward and input gradient; on PEFT's path the
    fold (B @ A for every expert, its gradient, and the full expert weight gradient it needs)."""
    attention, routed, all_experts = _per_layer(shape)
    passes = 3 if checkpointing else 2
    dense = 2 * (attention + routed) * passes
    scores = 2 * 2 * context * shape.heads * shape.head_dim * passes
    per_token = shape.layers * (dense + scores) + 2 * 2 * shape.vocab * shape.hidden
    fold = 0.0
    if shape.fold:
        fold = shape.layers * (2 * rank * all_experts * (passes - 1 + 2) + 2 * routed * tokens)
    return per_token * tokens + fold


def decode_step_bytes(shape: Shape, batch: int, context: float) -> float:
    """Bytes one decode step reads for `batch` rows at `context` tokens of KV cache."""
    attention, _, all_experts = _per_layer(shape)
    touched = experts_touched(shape, batch) / max(shape.experts, 1)
    layer = (attention * shape.dtype_bytes + all_experts * touched * weight_bytes(shape)
             + all_experts * FOLD_TRAFFIC[shape.fold]
             + batch * context * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes)
    return shape.layers * layer + shape.vocab * shape.hidden * shape.dtype_bytes


def decode_step_seconds(shape: Shape, rates: Rates, batch: int, context: float) -> float:
    return (decode_step_bytes(shape, batch, context) / (rates.bandwidth * rates.bandwidth_share)
            + shape.layers * rates.layer_overhead_s)


def prefill_seconds(shape: Shape, rates: Rates, batch: int, prompt: int, rank: int) -> float:
    """One left-padded batch's first forward: every position through the layers, one fold per layer."""
    attention, routed, all_experts = _per_layer(shape)
    tokens = batch * prompt
    flops = tokens * shape.layers * (2 * (attention + routed) + 2 * prompt * shape.heads * shape.head_dim)
    flops += shape.layers * 2 * rank * all_experts if shape.fold else 0
    fold_bytes = shape.layers * all_experts * FOLD_TRAFFIC[shape.fold]
    weights = shape.layers * (attention * shape.dtype_bytes + all_experts * weight_bytes(shape))
    return max(flops / (rates.flops * rates.matmul_share),
               (weights + fold_bytes) / (rates.bandwidth * rates.bandwidth_share)) \
        + shape.layers * rates.layer_overhead_s


@dataclass
class EvalCost:
    """One generation eval on the slowest rank: `expected` with answers as long as the gold ones (a model
    that learnt the task stops there), `worst` with every batch decoding to the answer budget."""
    records: int
    batches: int  # on the slowest rank
    expected_s: float
    worst_s: float
    decode_steps: int  # expected, summed over the slowest rank's batches
    loss_s: float = 0.0  # the eval_loss pass that comes with it (every rank its share, one forward per batch)


def eval_cost(shape: Shape, rates: Rates, prompts: Sequence[int], answers: Sequence[int], *, batch: int,
              world: int, budget: int, rank: int) -> EvalCost:
    """Each rank generates its shard (records[rank::world], as callbacks.generation_eval) in the
    evaluator's batch order; a batch decodes until its longest answer (and its end-of-turn token) is out."""
    from callbacks.generation_eval import batch_order

    slowest = None
    for r in range(world):
        p, a = list(prompts[r::world]), list(answers[r::world])
        order = batch_order(p, a)
        expected = worst = 0.0
        steps_total = batches = 0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            prompt = max(p[i] for i in rows)
            steps = min(max(a[i] for i in rows) + 1, budget)
            head = prefill_seconds(shape, rates, len(rows), prompt, rank)
            expected += head + steps * decode_step_seconds(shape, rates, len(rows), prompt + steps / 2)
            worst += head + budget * decode_step_seconds(shape, rates, len(rows), prompt + budget / 2)
            steps_total += steps
            batches += 1
        if slowest is None or expected > slowest.expected_s:
            slowest = EvalCost(len(prompts), batches, expected, worst, steps_total)
    return slowest or EvalCost(0, 0, 0.0, 0.0, 0)


@dataclass
class TimePlan:
    """The run's time on one device kind: training, the generation evals, and their share."""
    rates: Rates
    optimizer_steps: int
    step_s: float
    evaluations: int
    eval: EvalCost | None
    examples_per_step: float = 0.0  # across the ranks (packed: rows x the examples a row holds)

    @property
    def training_s(self) -> float:
        return self.optimizer_steps * self.step_s

    @property
    def eval_total_s(self) -> float:
        return self.evaluations * (self.eval.expected_s + self.eval.loss_s) if self.eval else 0.0

    @property
    def eval_share(self) -> float:
        """Evaluation time (generation with expected answers, and eval_loss) over training time."""
        return self.eval_total_s / self.training_s if self.training_s else 0.0

    def report(self) -> dict:
        out = {"device": self.rates.name, "rates": self.rates.source, "optimizer_steps": self.optimizer_steps,
               "examples_per_step": round(self.examples_per_step, 1),
               "step_s": round(self.step_s, 2), "training_hours": round(self.training_s / 3600, 2),
               "evaluations": self.evaluations, "eval_share": round(self.eval_share, 3)}
        if self.eval:
            out.update({"gen_eval_records": self.eval.records, "gen_eval_s": round(self.eval.expected_s, 1),
                        "eval_loss_s": round(self.eval.loss_s, 1),
                        "gen_eval_worst_s": round(self.eval.worst_s, 1),
                        "gen_eval_total_minutes": round(self.eval_total_s / 60, 1)})
        return out

    def describe(self) -> list[str]:
        examples = f" of ~{self.examples_per_step:.0f} examples" if self.examples_per_step else ""
        lines = [f"{self.optimizer_steps:,} optimizer steps{examples} x {_duration(self.step_s)} = "
                 f"{_duration(self.training_s)} of training per device ({self.rates.name}: {self.rates.source})"]
        if self.eval:
            e = self.eval
            plural = "" if self.evaluations == 1 else "s"
            lines.append(f"{self.evaluations} evaluation{plural} x ({_duration(e.expected_s)} generating {e.records} "
                         f"records, {e.batches} batch{'' if e.batches == 1 else 'es'} on the slowest rank, at most "
                         f"{_duration(e.worst_s)} if no answer stops early; + {_duration(e.loss_s)} eval_loss) = "
                         f"{_duration(self.eval_total_s)}, {self.eval_share:.1%} of training")
        return lines


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def evaluations(steps: int, eval_steps: int) -> int:
    """Scheduled evaluations (every eval_steps) and the one at the end when the last step is not one."""
    if steps <= 0:
        return 0
    scheduled = steps // eval_steps if eval_steps > 0 else 0
    return scheduled + (0 if eval_steps > 0 and steps % eval_steps == 0 else 1)


def time_plan(shape: Shape, rates: Rates, *, step_tokens: int, micro_tokens: int, steps: int, eval_steps: int,
              context: float, rank: int, checkpointing: bool, prompts: Sequence[int] = (),
              answers: Sequence[int] = (), gen_batch: int = 0, world: int = 1, budget: int = 0,
              loss_examples: int = 0, loss_batch: int = 1, loss_tokens: int = 0,
              examples_per_step: float = 0.0) -> TimePlan:
    """`step_tokens`: tokens one device trains per optimizer step (micro-batches x their tokens);
    `micro_tokens`: one micro-batch's; `loss_examples` eval_loss examples of `loss_tokens` tokens each."""
    micro = train_flops(shape, micro_tokens, context=context, rank=rank, checkpointing=checkpointing)
    step_s = micro * (step_tokens / micro_tokens) / (rates.flops * rates.matmul_share)
    cost = None
    if gen_batch and prompts:
        cost = eval_cost(shape, rates, prompts, answers, batch=gen_batch, world=world, budget=budget, rank=rank)
        batches = math.ceil(math.ceil(loss_examples / world) / loss_batch)
        cost.loss_s = batches * prefill_seconds(shape, rates, loss_batch, loss_tokens, rank) if loss_tokens else 0.0
    return TimePlan(rates, steps, step_s, evaluations(steps, eval_steps) if cost else 0, cost, examples_per_step)


# --- the dry run's time plans, per stage ------------------------------------------------------------

def stage_steps(cfg, stage, report: dict, world: int) -> int:
    """Optimizer steps of a stage from its measured lengths and, packed, the examples a row holds."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = world * cfg.micro_batch_size * cfg.gradient_accumulation_steps
    packed = cfg.packing and report["examples_per_row"]  # an empty file has no rows to pack
    rows = report["examples"] / report["examples_per_row"] if packed else report["examples"]
    return max(1, math.ceil(rows * stage.num_epochs / per_step))


def time_plans(cfg, shape, rank: int, world: int, tokenizer, data: dict,
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
