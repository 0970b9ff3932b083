"""The MoE router load-balancing loss as a decision of this project, not of the checkpoint.

TRL's SFTTrainer adds `router_aux_loss_coef * aux_loss` to the loss of a MoE
model and, left alone, takes the coefficient from the checkpoint's config
(0.001 for Qwen3-MoE). We always pass `router_aux_loss_coef` from our config
(default 0: see finetune/config.py), report it, and log the task loss apart
from the aux loss so that losses stay comparable with Axolotl's.
"""

from __future__ import annotations

from finetune.config import ConfigError

try:
    from transformers import TrainerCallback
except ImportError:  # pure helpers stay importable
    TrainerCallback = object


def is_moe(model_config) -> bool:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return hasattr(text, "output_router_logits")


def auto_experts_implementation(on_gpu: bool) -> str | None:
    """What `experts_implementation=auto` runs; None leaves the library's choice. On a GPU that is
    transformers' grouped_mm (torch's grouped GEMM; the per-expert loop is what leaves MoE fine-tuning at
    10-20% GPU use), or Unsloth's own kernels on its backend. On a CPU the loop over experts is faster
    (bench/experts.py: about 1.1x grouped_mm on the tiny MoE; batched_mm far slower)."""
    return None if on_gpu else "eager"


def own_experts_forward(model) -> str | None:
    """'unsloth' when Unsloth replaced the experts' forward (its GPU backend: transformers'
    experts_implementation is then not read), else None."""
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            forward = type(module).forward
            if "unsloth" in (forward.__module__ or "") or forward.__name__ == "forward_moe_backend":
                return "unsloth"
    return None


def expert_lora_path(model) -> str | None:
    """How LoRA reaches the fused experts in the loaded model (None: no expert LoRA): "unsloth" when
    Unsloth replaced PEFT's ParamWrapper forward (LoRA beside its MoE kernels), "nf4-fold" where our
    4-bit experts dequantize and fold B @ A in (finetune/quant_experts.py), else "peft-fold" (PEFT adds
    B @ A to the whole expert weight at every forward). Read from the model, for the run summary."""
    for module in model.modules():
        if type(module).__name__ != "ParamWrapper" or ".experts" not in f".{getattr(module, 'parameter_name', '')}" \
                and "experts" not in type(module.get_base_layer()).__name__.lower():
            continue
        forward = type(module).forward
        if "unsloth" in (forward.__module__ or "") or "unsloth" in (getattr(forward, "__qualname__", "") or ""):
            return "unsloth"
        if module.get_base_layer().__dict__.get("_nf4_states"):
            return "nf4-fold"
        return "peft-fold"
    return None


def use_experts_implementation(model, requested: str, on_gpu: bool) -> str | None:
    """Set how the fused experts of a MoE run and return the implementation in effect (None: a dense model)."""
    if not is_moe(model.config):
        return None
    own = own_experts_forward(model)
    if own:
        if requested != "auto":
            raise ConfigError(f"experts_implementation={requested} has no effect here: Unsloth runs the experts "
                              "with its own MoE kernels. Use experts_implementation=auto, or --backend hf")
        return own
    chosen = auto_experts_implementation(on_gpu) if requested == "auto" else requested
    if chosen is not None:
        model.set_experts_implementation(chosen)
    return model.config._experts_implementation


def router_aux_loss_setting(cfg, model_config) -> dict:
    """What the run does with the load-balancing loss (dry-run report, run summary)."""
    if not is_moe(model_config):
        if cfg.router_aux_loss_coef:
            raise ConfigError(f"router_aux_loss_coef={cfg.router_aux_loss_coef} applies to mixture-of-experts "
                              f"models only; {cfg.model_name} is dense. Set router_aux_loss_coef=0")
        return {"moe": False, "on": False, "coef": 0.0}
    text = model_config.get_text_config()
    return {"moe": True, "on": cfg.router_aux_loss_coef > 0, "coef": cfg.router_aux_loss_coef,
            "checkpoint_coef": getattr(text, "router_aux_loss_coef", None)}


def describe(setting: dict) -> str:
    """One line for a MoE's setting (start-up output and --dry-run)."""
    state = f"on, coef {setting['coef']}" if setting["on"] else "off"
    return (f"load-balancing aux loss {state} (router_aux_loss_coef; the checkpoint's value "
            f"{setting['checkpoint_coef']} is not used)")


def task_loss(loss: float, aux_loss: float, coef: float) -> float:
    """TRL logs `loss` = task loss + coef * aux_loss (both averaged over the same logging window)."""
    return loss - coef * aux_loss


class TaskLossCallback(TrainerCallback):
    """Adds `loss_task` (and `eval_loss_task`) next to TRL's `loss` / `aux_loss`, for the loggers
    that follow it and for the log history the run summary reads."""

    def __init__(self, coef: float):
        self.coef = coef

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        added = {}
        for prefix in ("", "eval_"):
            if f"{prefix}loss" in logs and f"{prefix}aux_loss" in logs and f"{prefix}loss_task" not in logs:
                added[f"{prefix}loss_task"] = task_loss(logs[f"{prefix}loss"], logs[f"{prefix}aux_loss"], self.coef)
        logs.update(added)
        if added and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
