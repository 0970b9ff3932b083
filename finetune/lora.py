"""LoRA targets that are right for dense and MoE Qwen3, and checks that they were.

Qwen3-MoE in transformers 5 keeps its experts as fused 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not `nn.Linear`
modules, so module names like `gate_proj` match no expert: they need PEFT's
`target_parameters`. The router (`mlp.gate`, a top-k router, not a Linear) is
a different thing from the experts' `gate_proj` and stays frozen unless
`train_router` is set (Unsloth also never trains it, for stability).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from finetune.config import ConfigError, check_no_expert_dropout
from finetune.config_schema import ATTENTION_TARGETS, DENSE_MLP_TARGETS, EXPERT_TARGETS

CATEGORIES = ("attention", "dense_mlp", "experts", "router", "embeddings", "other")
ROUTER_MODULE = "mlp.gate"


def category(param_name: str) -> str:
    """Which part of the network a (possibly LoRA-wrapped) parameter belongs to."""
    if ".experts." in param_name or param_name.endswith(".experts"):
        return "experts"
    if re.search(r"\.mlp\.gate(\.|$)", param_name):
        return "router"
    if any(f".{t}." in param_name or param_name.endswith(f".{t}") for t in ATTENTION_TARGETS):
        return "attention"
    if any(f".{t}." in param_name or param_name.endswith(f".{t}") for t in DENSE_MLP_TARGETS):
        return "dense_mlp"
    if "embed_tokens" in param_name or "lm_head" in param_name:
        return "embeddings"
    return "other"


@dataclass
class TargetPlan:
    modules: list[str]
    parameters: list[str]
    matches: dict[str, int] = field(default_factory=dict)  # requested name -> how many it matched
    router: bool = False
    expert_rank: int = 0

    def lora_kwargs(self, cfg) -> dict:
        """The LoRA settings of this plan, as PEFT's LoraConfig and Unsloth's get_peft_model take them: the
        one definition the trainer and the dry run both use."""
        kwargs = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
                  "target_modules": self.modules or None, "target_parameters": self.parameters or None}
        if self.parameters and self.expert_rank != cfg.lora_r:
            kwargs["rank_pattern"] = {re.escape(p): self.expert_rank for p in self.parameters}
        if self.router:
            kwargs["modules_to_save"] = [ROUTER_MODULE]
        return kwargs


def _module_matches(model, name: str) -> int:
    import torch

    # nn.Linear, and quantized linears (bitsandbytes Linear4bit etc.) that may not subclass it
    return sum(1 for full, mod in model.named_modules()
               if (full == name or full.endswith("." + name))
               and (isinstance(mod, torch.nn.Linear) or type(mod).__name__.startswith("Linear")))


def _parameter_matches(model, name: str) -> int:
    return sum(1 for full, _ in model.named_parameters() if full == name or full.endswith("." + name))


def plan_targets(model, cfg) -> TargetPlan:
    """Resolve "auto" and check that every requested target matches something."""
    auto_modules = cfg.lora_target_modules == ["auto"]
    auto_params = cfg.lora_target_parameters == ["auto"]
    modules = ATTENTION_TARGETS + DENSE_MLP_TARGETS if auto_modules else list(cfg.lora_target_modules)
    params = list(EXPERT_TARGETS) if auto_params else list(cfg.lora_target_parameters)
    matches = {m: _module_matches(model, m) for m in modules}
    matches.update({p: _parameter_matches(model, p) for p in params})
    if auto_modules:  # e.g. an all-MoE model has no dense MLP: drop what is absent
        modules = [m for m in modules if matches[m]]
    if auto_params:
        params = [p for p in params if matches[p]]
    missing = [t for t in modules + params if not matches[t]]
    if missing:
        experts_hint = ""
        if any(m in DENSE_MLP_TARGETS for m in missing) and any(_parameter_matches(model, p) for p in EXPERT_TARGETS):
            experts_hint = (" This model keeps its experts as fused parameters: target them with "
                            "lora_target_parameters=" + ",".join(EXPERT_TARGETS) + ".")
        raise ConfigError(f"LoRA target(s) {', '.join(missing)} match nothing in {type(model).__name__}."
                          f"{experts_hint} Remove them, or use 'auto'.")
    if params:
        check_no_expert_dropout(cfg, f"the LoRA targets include fused expert parameters ({', '.join(params)})")
    if not modules and not params:
        raise ConfigError("no LoRA targets left: set lora_target_modules or lora_target_parameters")
    if cfg.train_router and not any(name.endswith(ROUTER_MODULE) for name, _ in model.named_modules()):
        raise ConfigError(f"train_router is set but {type(model).__name__} has no router ({ROUTER_MODULE})")
    return TargetPlan(modules, params, {t: matches[t] for t in modules + params}, cfg.train_router,
                      cfg.expert_lora_r or cfg.lora_r)


def count_parameters(model) -> dict:
    """Total and trainable parameter counts, the trainable ones per category."""
    import torch

    total, trainable = 0, Counter()
    for name, p in model.named_parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit (Params4bit, NF4 experts): two per byte
        total += n
        if p.requires_grad:
            trainable[category(name)] += n
    return {"total": total, "trainable": sum(trainable.values()),
            "trainable_by_category": {c: trainable.get(c, 0) for c in CATEGORIES}}


def check_trainable(model, plan: TargetPlan) -> dict:
    """After LoRA is applied: what is trained is what was asked, nothing else."""
    counts = count_parameters(model)
    by_cat = counts["trainable_by_category"]
    if by_cat["router"] and not plan.router:
        raise RuntimeError("the MoE router became trainable although train_router is off; "
                           "a LoRA target name matched it (PEFT renames 'gate' to the router)")
    if plan.parameters and not by_cat["experts"]:
        raise RuntimeError("expert targets were requested but no expert parameter is trainable")
    if by_cat["other"] or by_cat["embeddings"]:
        names = [n for n, p in model.named_parameters()
                 if p.requires_grad and category(n) in ("other", "embeddings")][:5]
        raise RuntimeError(f"unexpected trainable parameters: {names}")
    return counts
