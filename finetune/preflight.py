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

import functools
import json
from pathlib import Path

from callbacks.generation_eval import ANSWER_MARGIN_TOKENS, answer_token_budget
from core.records import seeded_subset
from finetune import config as config_mod
from finetune.config import ConfigError, FinetuneConfig
from finetune.data import length_report, load_split
from finetune.lora import CATEGORIES, count_parameters, plan_targets
from finetune.moe import describe as describe_aux_loss
from finetune.moe import router_aux_loss_setting, use_experts_implementation
from finetune.quant_experts import describe_storage
from finetune.selection import describe_plan
from finetune.stages import flattens_packed_rows, stages_for

GIB = 1024 ** 3
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


def load_tokenizer_if_available(cfg: FinetuneConfig):
    """The tokenizer from the cache (or a local folder), else from the hub when it answers; else None."""
    from finetune.model import load_tokenizer

    try:
        return load_tokenizer(cfg, local_files_only=True)
    except (OSError, ValueError):
        pass
    if hub_reachable():
        try:
            return load_tokenizer(cfg)
        except (OSError, ValueError):
            pass
    return None


def meta_model(cfg: FinetuneConfig):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model import torch_dtype

    model_config, shipped = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(cfg),
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, model_config, shipped


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


def zero_setup(cfg: FinetuneConfig) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded off the GPU) of the DeepSpeed config given; none: plain DDP (0, False).
    validate() has already checked that the file exists and is JSON."""
    if not cfg.deepspeed:
        return 0, False
    zero = json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {})
    return int(zero.get("stage", 0)), (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")


def estimate_memory_gib(cfg: FinetuneConfig, model_config, storage: dict, trainable: int, world: int = 1,
                        answer_tokens: int | None = None) -> dict:
    """A rough per-device estimate: weights (as stored, per category) + LoRA training state + activations
    + the generation eval's KV cache. `world`: the number of ranks; `answer_tokens`: the generation eval's
    answer budget when it could be measured (see kv_cache below)."""
    text = model_config.get_text_config()
    dtype_bytes = 4 if cfg.dtype == "float32" else 2
    stage, offload = zero_setup(cfg)
    # ZeRO-1 shards the optimizer states over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too
    shards = {s: world if stage >= s else 1 for s in (1, 2, 3)}
    weights = sum(size for kinds in storage.values() for size in kinds.values())
    # fp32 LoRA weights + fp32 grads + AdamW's two fp32 moments; an offloaded optimizer keeps the
    # moments in CPU memory. Plain DDP (no DeepSpeed): all of it in full on every rank.
    moments = 0 if offload else 8 / shards[1]
    lora_state = trainable * (4 / shards[3] + 4 / shards[2] + moments)
    seq, batch = cfg.max_length, cfg.micro_batch_size
    hidden, layers = text.hidden_size, text.num_hidden_layers
    if cfg.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        acts = batch * seq * hidden * 2 * layers + batch * seq * hidden * 2 * 20
    else:
        acts = batch * seq * hidden * 2 * 20 * layers
    logits = batch * seq * text.vocab_size * 4 * 2  # fp32 logits and their gradient
    overhead = 1.5 * GIB if not cfg.dtype == "float32" else 0.5 * GIB
    parts = {"weights": weights / shards[3], "lora_params_grads_optimizer": lora_state, "activations": acts,
             "logits": logits, "runtime_overhead": overhead}
    if cfg.gen_eval and cfg.eval_file:
        # Greedy generation keeps K and V of every layer for the whole batch, each rank its own batches.
        # Tokens per sequence: the prompt (never truncated; assumed to fit max_length, as the training
        # examples do) + the answer budget (longest gold answer + a margin; when it could not be
        # measured, bounded by max_length: a gold answer is part of an example that fits it). Added to
        # the total: the caching allocator keeps the training step's blocks while generation runs.
        tokens = seq + (answer_tokens or seq + ANSWER_MARGIN_TOKENS)
        head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
        parts["kv_cache_gen_eval"] = (cfg.gen_eval_batch_size * tokens * layers * 2 * text.num_key_value_heads
                                      * head_dim * dtype_bytes)
    if cfg.distill_lambda > 0:
        # The teacher is the same weights (adapter disabled): no second copy. Extra: its logits
        # (model dtype) and the float32 softmaxes of the KL, upper bound = every position trained;
        # its forward runs under no_grad, so one layer's activations at a time.
        parts["distill_teacher"] = batch * seq * text.vocab_size * (dtype_bytes + 4 * 2) \
            + batch * seq * hidden * 2 * 20
    parts = {k: round(v / GIB, 4) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    experts = storage.get("experts", {}).get("4bit", 0)
    if experts:  # loaded in the 16-bit compute dtype first, quantized after loading (finetune/quant_experts.py)
        parts["weights_while_loading"] = round((weights - experts + experts / NF4_BYTES_PER_WEIGHT * 2) / GIB, 4)
    return parts


def gen_eval_answer_tokens(cfg: FinetuneConfig, tokenizer) -> int | None:
    """The generation eval's answer budget, as the callback computes it, from the records it will use."""
    if tokenizer is None or not (cfg.gen_eval and cfg.eval_file and Path(cfg.eval_file).is_file()):
        return None
    records = seeded_subset(load_split(cfg.eval_file, cfg.eval_max_samples, cfg.seed), cfg.gen_eval_max_samples,
                            cfg.seed)
    return answer_token_budget(records, tokenizer) if records else None


def preflight(cfg: FinetuneConfig, world: int = 1) -> int:
    """`world`: the number of ranks the run will use (--nproc, or torchrun's WORLD_SIZE)."""
    from peft import LoraConfig, get_peft_model

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
    plan = plan_targets(model, cfg)
    lora = LoraConfig(task_type="CAUSAL_LM", **plan.lora_kwargs(cfg))
    peft_model = get_peft_model(model, lora, low_cpu_mem_usage=True)
    counts = count_parameters(peft_model)
    tokenizer = load_tokenizer_if_available(cfg)
    missing = config_mod.missing_data(cfg)  # only a dry run gets here with files missing
    data = {}
    for stage in stages_for(cfg):
        if not Path(stage.train_file).is_file():
            continue
        records = load_split(stage.train_file, cfg.max_train_samples, cfg.seed)
        data[stage.name] = (length_report(records, tokenizer, cfg.max_length) if tokenizer is not None
                            else {"examples": len(records)})
    storage = planned_storage(model, cfg)
    answer_tokens = gen_eval_answer_tokens(cfg, tokenizer)
    memory = estimate_memory_gib(cfg, model_config, storage, counts["trainable"], world, answer_tokens)
    zero_stage, offload = zero_setup(cfg)
    report = {
        "model": cfg.model_name, "model_config_shipped": shipped_config, "model_class": type(model).__name__,
        "mode": cfg.mode, "world_size": world, "deepspeed": cfg.deepspeed or None, "zero_stage": zero_stage,
        "optimizer_offload": offload, "quantization": "4-bit NF4" if cfg.load_in_4bit else cfg.dtype,
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
        "gen_eval_answer_tokens": answer_tokens, "memory_estimate_gib_per_device": memory,
        "packing": cfg.packing, "experts_implementation": experts, "attn_implementation": attention,
    }
    print("\n=== preflight (dry run: nothing was trained) ===")
    print(f"model        {cfg.model_name} ({report['model_class']}), {base_counts['total']:,} parameters, "
          f"{report['quantization']}")
    if shipped_config:
        print(f"model config: {shipped_config} (shipped copy; the Hugging Face cache has none)")
    print(f"mode         {cfg.mode}, world size {world}")
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
    if tokenizer is None:
        where = "offline (not in the Hugging Face cache; the hub is unreachable)" if not hub_reachable() else \
            "(not in the Hugging Face cache, and the hub did not give it)"
        print(f"data         token lengths skipped: the tokenizer of {cfg.model_name} is not available {where}; "
              "examples counted only")
    for name, d in data.items():
        lengths = (f"; tokens {d['tokens']} (measured on {d['measured']:,}); over max_length {d['max_length']}: "
                   f"~{d['over_max_length']:,}" if "tokens" in d else "")
        print(f"data {name:<7} {d['examples']:,} examples{lengths}")
    print(f"weights      {describe_storage(storage)}")
    sharding = f"DeepSpeed ZeRO-{zero_stage}" if cfg.deepspeed else "no DeepSpeed" + (" (DDP)" if world > 1 else "")
    sharding += ", optimizer offloaded off the GPU" if offload else ", optimizer on the GPU"
    kv = f", gen-eval KV cache {memory['kv_cache_gen_eval']}" if "kv_cache_gen_eval" in memory else ""
    print(f"memory/dev   ~{memory['total']} GiB with world size {world}, {sharding} (rough: weights "
          f"{memory['weights']}, LoRA state {memory['lora_params_grads_optimizer']}, activations "
          f"{memory['activations']}, logits {memory['logits']}{kv}, overhead {memory['runtime_overhead']})")
    if kv:
        budget = (f"{answer_tokens} (measured)" if answer_tokens else
                  f"<= {cfg.max_length + ANSWER_MARGIN_TOKENS} (not measured: no tokenizer or eval file)")
        print(f"gen eval     KV cache: batch {cfg.gen_eval_batch_size} x (max_length {cfg.max_length} prompt + "
              f"answer budget {budget}) tokens")
    if "weights_while_loading" in memory:
        print(f"loading      the MoE experts load in {cfg.dtype} and are quantized after loading: weights peak at "
              f"~{memory['weights_while_loading']} GiB per device before they drop to {memory['weights']} GiB")
    if "distill_teacher" in memory:
        print(f"distillation teacher pass: +{memory['distill_teacher']} GiB (its logits and the KL's "
              "softmaxes, upper bound; no second copy of the weights: the teacher is the adapter-disabled model)")
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
