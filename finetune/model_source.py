"""Where a model's config and tokenizer come from without its weights: the Hugging Face cache (or a local
folder), the configs this repository ships (finetune/model_configs/), the hub when it answers, and for
the Qwen3 family the tokenizer carried in qwen3_tokenizer/. The dry run builds its meta model from here;
the real run checks the model's config from here before any weight loads."""

from __future__ import annotations

import functools

from finetune.config import ConfigError
from finetune.config_schema import FinetuneConfig

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
