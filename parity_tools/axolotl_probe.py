"""Ask Axolotl itself what it makes of a config. Runs in Axolotl's environment.

    <axolotl-venv>/bin/python -m parity_tools.axolotl_probe CONFIG.yml [MODEL_CONFIG.json]

Prints one JSON object: the keys Axolotl (with the config's plugins) knows,
its chat templates, which plugins and dataset types load, its own
validation errors, and, given a model config, what Axolotl's LoRA config
really trains on that architecture (built on the meta device, no weights).
`parity_tools.axolotl_check` turns this into one line per problem.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import sys
import traceback


def plugin_errors(names: list, raw: dict) -> dict:
    """What Axolotl would log and skip (import), or stop on (the plugin's own config check)."""
    from axolotl.integrations.base import BasePlugin, PluginManager, load_plugin
    from axolotl.utils.dict import DictDefault

    errors = {}
    manager = PluginManager.get_instance()
    for name in names:
        try:
            if not isinstance(name, str) or "." not in name:
                raise ImportError("not a dotted path package.module.ClassName")
            plugin = load_plugin(name)
            if not isinstance(plugin, BasePlugin):
                raise TypeError(f"{type(plugin).__name__} is not a subclass of axolotl's BasePlugin")
        except Exception as e:
            errors[name] = f"does not load ({type(e).__name__}: {e}); Axolotl logs this and trains without it"
            continue
        manager.plugins[name] = plugin
        try:
            plugin.register(DictDefault(raw))
        except Exception as e:
            errors[name] = f"rejects the config: {e}"
    return errors


def known_keys() -> tuple[list, list]:
    from axolotl.integrations.config import merge_input_args
    from axolotl.utils.schemas.datasets import SFTDataset

    _, input_config = merge_input_args()
    top = set()
    for name, f in input_config.model_fields.items():
        top.add(name)
        if f.alias:
            top.add(f.alias)
    return sorted(top), sorted(SFTDataset.model_fields)


def dataset_type_loads(ds_type) -> bool:
    """Mirror of axolotl.prompt_strategies.load + the built-in handlers, without loading data."""
    if not isinstance(ds_type, str):
        return isinstance(ds_type, dict)  # a user-defined format
    from axolotl.utils.data.wrappers import DATASET_HANDLERS

    base = ds_type.split(":")[0]
    if base in DATASET_HANDLERS or base == "messages" or base.startswith(("bradley_terry", "stepwise_supervised")):
        return True
    parts = base.split(".")
    if parts[-1] == "load" or parts[-1].startswith("load_"):
        parts = parts[:-1]
    candidates = [f"axolotl.prompt_strategies.{'.'.join(parts)}", ".".join(parts)]
    for module in candidates:
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module) is not None:
                return True
    return False


def validation_errors(raw: dict) -> list:
    from pydantic import ValidationError

    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    try:
        validate_config(DictDefault(json.loads(json.dumps(raw, default=str))))
    except ValidationError as e:
        return [{"loc": ".".join(str(p) for p in err["loc"]), "msg": err["msg"]} for err in e.errors()]
    except Exception as e:  # a model validator raising a plain error
        return [{"loc": "", "msg": f"{type(e).__name__}: {e}"}]
    return []


def lora_report(raw: dict, model_config_path: str) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from axolotl.loaders.adapter import _build_peft_lora_config
    from axolotl.utils.dict import DictDefault
    from finetune.lora import CATEGORIES, category

    model_config = AutoConfig.from_pretrained(model_config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    lora_config = _build_peft_lora_config(model, DictDefault(raw))
    report = {"model_type": model_config.model_type,
              "experts_in_model": sum(1 for n, p in model.named_parameters() if category(n) == "experts"),
              "target_modules": sorted(lora_config.target_modules or []),
              "target_parameters": sorted(lora_config.target_parameters or [])}
    try:
        peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        return report
    trainable = dict.fromkeys(CATEGORIES, 0)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            trainable[category(name)] += p.numel()
    report["trainable_by_category"] = trainable
    report["target_parameters_after_peft"] = sorted(peft_model.peft_config["default"].target_parameters or [])
    return report


def probe(config_path: str, model_config_path: str | None) -> dict:
    import yaml

    from axolotl.utils.schemas.enums import ChatTemplate

    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    out = {"plugin_errors": plugin_errors(list(raw.get("plugins") or []), raw)}
    out["top_level_keys"], out["dataset_keys"] = known_keys()
    out["chat_templates"] = [c.value for c in ChatTemplate]
    types = [d.get("type") for key in ("datasets", "test_datasets") for d in raw.get(key) or []
             if isinstance(d, dict)]
    out["dataset_types"] = {str(t): dataset_type_loads(t) for t in types}
    out["validation_errors"] = validation_errors(raw)
    if model_config_path:
        try:
            out["lora"] = lora_report(raw, model_config_path)
        except Exception as e:
            out["lora"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
    return out


def main() -> int:
    logging.disable(logging.CRITICAL)  # Axolotl's chatter would bury the JSON
    with contextlib.redirect_stdout(io.StringIO()):
        result = probe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
