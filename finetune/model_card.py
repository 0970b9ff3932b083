"""The model card (README.md) that `export` writes beside the adapter or merged model: what a team picking
the model up needs: base model, data (hashes and sizes), the run's settings, its generation metrics on the
validation set at the exported step, intended use and limits, licence; the Hub's metadata at the top."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.metrics import HEADLINE
from core.records import load_json

SETTINGS = ("mode", "backend", "load_in_4bit", "dtype", "max_length", "packing", "lora_r", "lora_alpha",
            "lora_dropout", "learning_rate", "stage1_learning_rate", "stage2_learning_rate", "num_epochs",
            "micro_batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_ratio", "seed",
            "router_aux_loss_coef", "chat_template")


def exported_step(adapter: Path, summary: dict) -> int | None:
    """The training step the adapter folder holds: adapter_last/ the last, adapter/ the chosen best step."""
    if adapter.name == "adapter_last":
        return summary.get("global_step")
    return (summary.get("best") or {}).get("adapter_step") or summary.get("global_step")


def step_metrics(stage: Path, step: int | None, summary: dict) -> dict:
    path = stage / f"gen_metrics_step{step}.json"
    if step is not None and path.is_file():
        return load_json(path)
    return summary.get("metrics") or {} if step == summary.get("global_step") else {}


def _data_rows(summary: dict, stage_name: str) -> list[str]:
    data = summary.get("data") or {}
    rows = []
    for kind in ("train", "eval"):
        if data.get(f"{kind}_file"):
            count = data.get(f"{kind}_examples")
            size, digest = (f"{count:,}", f"`{(data.get(kind + '_sha256') or '?')[:16]}`") \
                if isinstance(count, int) else ("?", "?")
            rows.append(f"| {stage_name} | {kind} | `{Path(data[kind + '_file']).name}` | {size} | {digest} |")
    return rows


def stage_summaries(stage: Path) -> dict[str, dict]:
    """{stage name: run_summary.json} of the exported stage and, for stage2, of stage1 before it."""
    folders = (stage.parent / "stage1", stage) if stage.name == "stage2" else (stage,)
    return {f.name: load_json(f / "run_summary.json") for f in folders if (f / "run_summary.json").is_file()}


def model_card(adapter: Path, base: str, merged: bool, license_id: str, config: dict) -> str:
    """`config`: the run's config.yaml beside the adapter, as export read it ({} when absent)."""
    stage = adapter.parent
    summaries = stage_summaries(stage)
    summary = summaries.get(stage.name, {})
    step = exported_step(adapter, summary) if summary else None
    metrics = step_metrics(stage, step, summary) if summary else {}
    data_rows = [row for name, s in summaries.items() for row in _data_rows(s, name)]
    front = {"base_model": base, "library_name": "transformers" if merged else "peft", "license": license_id,
             "language": ["ja"], "pipeline_tag": "text-generation",
             "tags": ["qwen3", "lora", "information-extraction", "japanese-news", "qwen-finetune"]}
    losses = summary.get("train_losses") or []
    launch = summary.get("launch") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# Offender extraction from Japanese news ({'merged model' if merged else 'LoRA adapter'})", "",
             f"A fine-tune of `{base}` that reads a Japanese news article and answers, as JSON, whether it names "
             "offenders (加害者) and, for each, the name, age, occupation, address and charge the article gives. "
             f"Trained with qwen-finetune ({config.get('mode', '?')} mode"
             + (f", step {step} of {summary.get('global_step')}" if step is not None else "") + ").", "",
             "## Evaluation (generation on the validation set)", ""]
    shown = [m for m in HEADLINE if m in metrics]
    if shown:
        lines += [f"At the exported step ({step}), on {metrics.get('gen_num_examples', '?')} validation records "
                  "(greedy decoding, the training prompt):", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {m} | {float(metrics[m]):.4f} |" for m in shown]
        best = summary.get("best") or {}
        if best.get("metric") and adapter.name != "adapter_last":
            lines += ["", f"The step was chosen for the highest `{best['metric']}` among the evaluated steps."]
    else:
        lines.append("No generation metrics were recorded for this step (gen_eval was off or there was no eval set).")
    lines += ["", "## Data", "", "| stage | split | file | examples | sha256 (first 16) |", "|---|---|---|---:|---|",
              *data_rows, "", "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {config[k]} |" for k in SETTINGS if k in config]
    if losses:
        lines.append(f"| training loss | {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} "
                     f"(step {losses[-1][0]}) |")
    if launch:
        lines.append(f"| launch | {launch.get('nodes')} node(s) x {launch.get('ranks_per_node')} rank(s) |")
    load = (f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
            'model = PeftModel.from_pretrained(model, "THIS_FOLDER_OR_REPO")') if not merged else \
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")'
    lines += ["", "## How to use", "",
              "Prompt it as it was trained: the system instruction and the article through the tokenizer's chat "
              "template (qwen-finetune's `core/prompt.py` builds both; `parity.py evaluate` scores a records "
              "file with it).", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              *(["from peft import PeftModel"] if not merged else []), "",
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")', load, "```"]
    lines += ["", "## Intended use and limits", "",
              "- For pulling offender information out of Japanese news text into structured records, with a "
              "person reviewing the output. It is not a judgement of guilt: an article names suspects and "
              "defendants, who are presumed innocent.",
              "- The answers name real people; store and share them under the rules that apply to personal data.",
              "- It can miss offenders, take a victim or witness for one, or write a name that is not in the "
              "article (see the metrics above: `gen_negative_hallucination_rate`, name-set F1); check names "
              "against the article before use.",
              "- Trained on one news style and prompt; other languages, domains or prompts are untested.", "",
              "## Licence", "",
              f"`{license_id}`; the base model's own licence and terms apply to this derivative as well.", ""]
    return "\n".join(lines)
