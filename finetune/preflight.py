"""`--dry-run`: what a run would train and need, without loading any weights.

The model is built from its config on the meta device (no memory, seconds even
for 30B), LoRA is applied with PEFT exactly as the hf backend would, and the
data is tokenised with the model's own chat template.
"""

from __future__ import annotations

import json

from finetune import config as config_mod
from finetune.config import FinetuneConfig
from finetune.data import length_report, load_split
from finetune.lora import CATEGORIES, count_parameters, plan_targets
from finetune.moe import describe as describe_aux_loss
from finetune.moe import router_aux_loss_setting
from finetune.quant_experts import describe_storage
from finetune.stages import stages_for

GIB = 1024 ** 3


def meta_model(cfg: FinetuneConfig):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.model import resolve_model_path, torch_dtype

    model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name),
                                              trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, model_config


# NF4 with double quantisation: 4 bits per weight + an 8-bit scale per 64-weight block (+ tiny second level)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64
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
        cat = category(name)
        kind = "4bit" if cfg.load_in_4bit and cat in QUANTIZED else rest
        size = param.numel() * (NF4_BYTES_PER_WEIGHT if kind == "4bit" else {"float32": 4}.get(kind, 2))
        out.setdefault(cat, {})
        out[cat][kind] = out[cat].get(kind, 0) + size
    return out


def estimate_memory_gib(cfg: FinetuneConfig, model_config, storage: dict, trainable: int) -> dict:
    """A rough per-device estimate: weights (as stored, per category) + LoRA training state + activations."""
    text = model_config.get_text_config()
    world = config_mod.world_size()
    weights = sum(size for kinds in storage.values() for size in kinds.values())
    # fp32 LoRA weights + grads + AdamW moments; ZeRO-2 shards grads and moments,
    # and the shipped zero2.json offloads the optimizer to CPU.
    zero2 = bool(cfg.deepspeed)
    lora_state = trainable * (4 + (4 + 8) / (world if zero2 else 1))
    seq, batch = cfg.max_length, cfg.micro_batch_size
    hidden, layers = text.hidden_size, text.num_hidden_layers
    if cfg.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        acts = batch * seq * hidden * 2 * layers + batch * seq * hidden * 2 * 20
    else:
        acts = batch * seq * hidden * 2 * 20 * layers
    logits = batch * seq * text.vocab_size * 4 * 2  # fp32 logits and their gradient
    overhead = 1.5 * GIB if not cfg.dtype == "float32" else 0.5 * GIB
    parts = {"weights": weights, "lora_params_grads_optimizer": lora_state, "activations": acts,
             "logits": logits, "runtime_overhead": overhead}
    if cfg.distill_lambda > 0:
        # The teacher is the same weights (adapter disabled): no second copy. Extra: its logits
        # (model dtype) and the float32 softmaxes of the KL, upper bound = every position trained;
        # its forward runs under no_grad, so one layer's activations at a time.
        dtype_bytes = 4 if cfg.dtype == "float32" else 2
        parts["distill_teacher"] = batch * seq * text.vocab_size * (dtype_bytes + 4 * 2) \
            + batch * seq * hidden * 2 * 20
    parts = {k: round(v / GIB, 4) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    experts = storage.get("experts", {}).get("4bit", 0)
    if experts:  # loaded in the 16-bit compute dtype first, quantized after loading (finetune/quant_experts.py)
        parts["weights_while_loading"] = round((weights - experts + experts / NF4_BYTES_PER_WEIGHT * 2) / GIB, 4)
    return parts


def preflight(cfg: FinetuneConfig) -> int:
    from peft import LoraConfig, get_peft_model

    from finetune.model import load_tokenizer

    model, model_config = meta_model(cfg)
    base_counts = count_parameters(model)
    plan = plan_targets(model, cfg)
    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, **plan.peft_kwargs(cfg))
    peft_model = get_peft_model(model, lora, low_cpu_mem_usage=True)
    counts = count_parameters(peft_model)
    tokenizer = load_tokenizer(cfg)
    data = {}
    for stage in stages_for(cfg):
        data[stage.name] = length_report(load_split(stage.train_file, cfg.max_train_samples, cfg.seed),
                                         tokenizer, cfg.max_length)
    storage = planned_storage(model, cfg)
    memory = estimate_memory_gib(cfg, model_config, storage, counts["trainable"])
    report = {
        "model": cfg.model_name, "model_class": type(model).__name__, "mode": cfg.mode,
        "world_size": config_mod.world_size(), "quantization": "4-bit NF4" if cfg.load_in_4bit else cfg.dtype,
        "base_parameters": base_counts["total"],
        "lora_targets": {"modules": plan.modules, "parameters": plan.parameters,
                         "matches": plan.matches, "router": "trained" if plan.router else "frozen",
                         "expert_rank": plan.expert_rank if plan.parameters else None},
        "trainable_parameters": counts["trainable"],
        "trainable_by_category": counts["trainable_by_category"],
        "router_aux_loss": router_aux_loss_setting(cfg, model_config),
        "weight_storage_bytes": {cat: {kind: round(size) for kind, size in kinds.items()}
                                 for cat, kinds in storage.items()},
        "data": data, "memory_estimate_gib_per_device": memory,
    }
    print("\n=== preflight (dry run: nothing was trained) ===")
    print(f"model        {cfg.model_name} ({report['model_class']}), {base_counts['total']:,} parameters, "
          f"{report['quantization']}")
    print(f"mode         {cfg.mode}, world size {report['world_size']}")
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
    for name, d in data.items():
        print(f"data {name:<7} {d['examples']:,} examples; tokens {d['tokens']} "
              f"(measured on {d['measured']:,}); over max_length {d['max_length']}: ~{d['over_max_length']:,}")
    print(f"weights      {describe_storage(storage)}")
    print("memory/dev   ~{total} GiB (rough: weights {weights}, LoRA state {lora_params_grads_optimizer}, "
          "activations {activations}, logits {logits}, overhead {runtime_overhead})".format(**memory))
    if "weights_while_loading" in memory:
        print(f"loading      the MoE experts load in {cfg.dtype} and are quantized after loading: weights peak at "
              f"~{memory['weights_while_loading']} GiB per device before they drop to {memory['weights']} GiB")
    if "distill_teacher" in memory:
        print(f"distillation teacher pass: +{memory['distill_teacher']} GiB (its logits and the KL's "
              "softmaxes, upper bound; no second copy of the weights: the teacher is the adapter-disabled model)")
    print(json.dumps(report, ensure_ascii=False))
    return 0
