"""Load the base model and put LoRA on it, with Unsloth or with plain transformers + PEFT.

Unsloth patches transformers/TRL/PEFT process-wide when imported, so it is
imported only when its backend is chosen; `auto` prefers it when it imports.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from core.distributed import local_rank, world_size
from finetune.config import ConfigError
from finetune.config_schema import SDPA_VARLEN, TINY_MODELS, FinetuneConfig
from finetune.lora import TargetPlan

if TYPE_CHECKING:
    from finetune.run_plan import RunPlan

# config.json of models this repository knows, named after the model (the last part of its hub id):
# lets the dry run and the Axolotl check work without the hub
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def resolve_model_path(name: str) -> str:
    """The tiny names point at the models shipped in tiny/; anything else is a hub id or a folder."""
    if name in TINY_MODELS:
        from tiny import model_dir

        return str(model_dir(name))
    return name


def shipped_model_config(name: str) -> Path | None:
    """finetune/model_configs/<last part of the hub id>.json when this repository ships one."""
    stem = str(name).rstrip("/").split("/")[-1]
    shipped = MODEL_CONFIGS / f"{stem}.json"
    return shipped if stem and shipped.is_file() else None


@functools.cache
def import_backend(requested: str) -> tuple[str, str]:
    """(backend, why), Unsloth imported when it is the one. It patches transformers/TRL/PEFT and must come
    before them (else it warns that "your code may run slower"), so the command line calls this before it
    imports the pipeline; cached, the pipeline's own call returns the same answer. `auto` falls back to
    PEFT when an installed Unsloth refuses to import (a GPU or driver it does not support, a broken
    install); asked for by name, that is an error."""
    from finetune.run_plan import Machine, choose_backend

    backend, why = choose_backend(requested, Machine.this_launch())
    if backend != "unsloth":
        return backend, why
    if world_size() > 1 and has_cuda():
        import torch

        torch.cuda.set_device(local_gpu())  # Unsloth's import touches the current GPU: this rank's, not GPU 0
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # Unsloth raises more than ImportError at import (NotImplementedError, RuntimeError)
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        if requested == "unsloth":
            raise ConfigError(f"backend 'unsloth' requested but unsloth fails to import ({problem}); "
                              "fix the install (bash scripts/setup.sh) or use --backend hf") from None
        return "hf", f"auto: unsloth is installed but fails to import ({problem}); training with PEFT"
    return backend, why


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register_attention(name: str) -> str:
    """The attention implementation's name, known to transformers before a model is loaded with it."""
    if name == SDPA_VARLEN:
        from finetune.attention import register

        register()
    return name


def check_attention(model_config, cfg: FinetuneConfig, attention: str) -> None:
    """Refuse sdpa_varlen (the plan's `attention`) on a model it was not checked on, from the model's config:
    called before the weights load (finetune/checks.check_model_config) and by the dry run."""
    from finetune.attention import MODEL_TYPES

    if attention != SDPA_VARLEN:
        return
    model_type = model_config.model_type
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"attn_implementation={SDPA_VARLEN} is checked on {', '.join(MODEL_TYPES)} only, and "
                          f"{cfg.model_name} is {model_type}; set attn_implementation=sdpa")
    if getattr(model_config, "sliding_window", None) is not None:  # else a ValueError at the first step
        raise ConfigError(f"attn_implementation={SDPA_VARLEN} has no sliding-window attention, and "
                          f"{cfg.model_name} uses a sliding window of {model_config.sliding_window}; "
                          "set attn_implementation=sdpa")


def runs_unsloth_attention(model) -> bool:
    """Whether the model's attention layers run Unsloth's own forward (its patched Llama-family models on a
    GPU, dense Qwen3 among them). That forward ignores transformers' attention masks: packed examples stay
    apart there only in a one-row batch, whose boundaries it reads from the position ids. Unsloth leaves
    Qwen3-MoE to transformers' modeling, and patches nothing on a CPU."""
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "o_proj"):
            # unsloth.models.*: its own attention; a compiled copy of transformers' modeling
            # (unsloth_compiled_module_*) keeps transformers' attention and masks
            return type(module).forward.__module__.startswith("unsloth.models.")
    return False


def torch_dtype(cfg: FinetuneConfig):
    import torch

    return getattr(torch, cfg.dtype)


def apply_chat_template_choice(tokenizer, cfg: FinetuneConfig) -> None:
    if cfg.chat_template == "tokenizer_default":
        if not tokenizer.chat_template:
            raise ConfigError(f"{cfg.model_name} has no chat template of its own; set "
                              "chat_template=qwen3_2507")
        return
    from core.prompt import QWEN3_2507_CHAT_TEMPLATE

    tokenizer.chat_template = QWEN3_2507_CHAT_TEMPLATE


def load_tokenizer(cfg: FinetuneConfig, **hub_kwargs):
    """`hub_kwargs`: e.g. local_files_only=True (the dry run tries the cache before the hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model_name),
                                        trust_remote_code=cfg.trust_remote_code, **hub_kwargs)
    apply_chat_template_choice(tok, cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: FinetuneConfig, plan: RunPlan):
    """(model, tokenizer) with nothing trainable yet, on the plan's backend with its attention."""
    path, attention = resolve_model_path(cfg.model_name), plan.attention
    if plan.backend == "unsloth":
        from unsloth import FastLanguageModel

        placement = {"device_map": rank_device_map()} if has_cuda() else {}  # CPU: Unsloth's own default
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=cfg.max_length, dtype=torch_dtype(cfg),
            load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=register_attention(attention), random_state=cfg.seed,
            use_gradient_checkpointing=False, **placement)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        apply_chat_template_choice(tokenizer, cfg)
        quantize_experts_if_4bit(model, cfg)
        return model, tokenizer

    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(cfg), "attn_implementation": register_attention(attention),
              "trust_remote_code": cfg.trust_remote_code, "device_map": rank_device_map()}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(cfg))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    quantize_experts_if_4bit(model, cfg)
    return model, load_tokenizer(cfg)


def local_gpu() -> int:
    """This rank's GPU: LOCAL_RANK among the visible ones (as accelerate counts; a launcher that shows each
    process only its own GPU makes that index 0)."""
    import torch

    return local_rank() % torch.cuda.device_count()


def rank_device_map() -> dict | None:
    """Every weight straight onto this rank's GPU: without it each of the ranks first builds the whole
    model in host memory (4 x 61 GB for Qwen3-30B-A3B) before moving it. None on CPU."""
    return {"": local_gpu()} if has_cuda() else None


def quantize_experts_if_4bit(model, cfg: FinetuneConfig) -> None:
    """`load_in_4bit` quantizes nn.Linear only (transformers and Unsloth's CPU path); fused MoE experts,
    ~95% of Qwen3-30B-A3B, get NF4 here (finetune/quant_experts.py). Then check that it took."""
    if not cfg.load_in_4bit:
        return
    from finetune.quant_experts import quantize_fused_experts, storage_by_category

    quantize_fused_experts(model, torch_dtype(cfg))
    import torch

    if torch.cuda.is_available():  # the bf16 experts just freed (~57 GiB on the 30B) stay reserved otherwise
        torch.cuda.empty_cache()
    experts = storage_by_category(model).get("experts", {})
    if set(experts) - {"4bit"}:
        raise ConfigError(f"load_in_4bit: the MoE experts of {cfg.model_name} are stored as {sorted(experts)}, "
                          "not 4-bit (an expert layout finetune/quant_experts.py does not know). Train in "
                          "bf16 (--mode single, load_in_4bit=false) instead")


def add_lora(model, cfg: FinetuneConfig, backend: str, plan: TargetPlan):
    lora_kwargs = plan.lora_kwargs(cfg)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, random_state=cfg.seed,
            use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False,
            **lora_kwargs)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Continue an adapter saved by an earlier stage (same LoRA layout)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"{adapter_dir}: {len(unexpected)} adapter weights do not fit this model, "
                           f"e.g. {unexpected[:3]}")
