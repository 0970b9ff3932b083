"""What a run tells its user: progress lines (rank 0 only) and the run summary printed at the end."""

from __future__ import annotations

from pathlib import Path

from core.distributed import is_rank_zero
from core.metrics import HEADLINE
from finetune.config_schema import FinetuneConfig
from finetune.selection import describe as describe_best

SUMMARY_METRICS = (*HEADLINE, "general_loss_base", "general_loss_tuned", "general_loss_increase")


def say(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)


def print_summary(cfg: FinetuneConfig, summaries: list[dict], mlflow_parent: dict | None = None) -> None:
    """`mlflow_parent`: the parent run's spool counts (two-stage), when it had any."""
    say("\n=== run summary ===")
    for s in summaries:
        m = s["metrics"]
        first = s["train_losses"][0][1] if s["train_losses"] else float("nan")
        last = s["train_losses"][-1][1] if s["train_losses"] else float("nan")
        eval_loss = f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
        aux = s.get("router_aux_loss") or {}
        moe = (f"; router aux loss {'coef ' + str(aux['coef']) if aux['on'] else 'off'}"
               if aux.get("moe") else "")
        packed = s.get("packing") or {}
        rows = f"; packed, {packed['examples_per_row']:.2f} examples per row" if packed.get("packing") else ""
        say(f"{s['stage']:>7}: {s['global_step']} steps in {s['train_seconds']:.0f}s, "
            f"train loss {first:.4f} -> {last:.4f}{eval_loss}; backend {s['backend']}{moe}{rows}")
        gen = {k: v for k, v in m.items() if k in SUMMARY_METRICS}
        if gen:
            say("         " + ", ".join(f"{k} {v:.3f}" for k, v in gen.items()))
        if s.get("best"):
            say("         " + describe_best(s["best"]))
        if s.get("mlflow_spool"):
            say("         " + describe_spool(s["mlflow_spool"], cfg))
    if mlflow_parent:
        say("  parent: " + describe_spool(mlflow_parent, cfg))
    if summaries:
        say(f"adapter: {Path(cfg.output_dir) / summaries[-1]['stage'] / 'adapter'} (step {adapter_step(summaries[-1])})")


def adapter_step(summary: dict) -> int:
    """The step a stage's adapter/ holds: the chosen one, else the last."""
    return (summary.get("best") or {}).get("adapter_step", summary["global_step"])


def describe_spool(counts: dict, cfg: FinetuneConfig) -> str:
    """One line: what the MLflow logger kept in its spool while the server was unreachable, and its fate."""
    text = (f"mlflow: {counts['spooled']} records spooled while the server was unreachable, "
            f"{counts['replayed']} replayed")
    if counts.get("rejected"):
        text += f", {counts['rejected']} rejected by the server"
    if counts.get("pending"):
        text += (f", {counts['pending']} still in the spool: python qwen_finetune.py mlflow-replay "
                 f"{cfg.output_dir}")
    return text
