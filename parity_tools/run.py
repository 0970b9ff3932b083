"""`parity.py run --preset tiny`: the whole comparison on CPU, end to end.

--pair axolotl (default): check the Axolotl config, train `qwen_finetune.py
--mode single` (Unsloth backend where it imports) and Axolotl on the same
data with the same hyperparameters (the tiny preset and
axolotl_configs/tiny_cpu.yml agree key by key: LoRA r/alpha/targets, lr and
schedule, epochs or steps, micro-batch, dtype float32, seed), evaluate the
untrained base and both adapters with the one shared evaluator on the same
validation sample, compare.

--pair legacy: `qwen_finetune_legacy.py` against `qwen_finetune.py --mode
two-stage` given the legacy run's saved configuration: the losses must be
identical, and so must the metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from core.records import DataError
from finetune.config_schema import TINY_MODELS
from finetune.presets import PRESETS
from parity_tools import compare as cmp
from parity_tools.axolotl_env import REPO, axolotl_env, axolotl_python
from parity_tools.axolotl_tiny import AXOLOTL_TINY, axolotl_model_changes, tiny_axolotl_training_config
from parity_tools.evaluate import evaluate

# "Learnt" means: beats the untrained base by at least this much on both, names included (the tiny
# models read the article: a stack that loses the article loses the names).
LEARNT_MARGIN = {"gen_json_parse_rate": 0.2, "gen_offender_presence_f1": 0.2, "gen_offender_name_set_f1": 0.3}


def say(text: str) -> None:
    print(f"[parity] {text}", flush=True)


def step(name: str, cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run one phase, its output in `log`; on failure show the end of it."""
    say(f"{name} ... (log: {log})")
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise DataError(f"{name} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    say(f"{name}: done in {seconds:.0f}s")
    return seconds


def tiny_model_dir(name: str) -> str:
    from finetune.model import resolve_model_path

    return resolve_model_path(name)


def ours_args(max_steps: int) -> list[str]:
    return [f"max_steps={max_steps}"] if max_steps > 0 else []


def aux_loss_settings(ours_summary: Path, axolotl_config: Path) -> dict:
    """The router load-balancing loss each stack trained with, as each recorded it."""
    ours = json.loads(ours_summary.read_text()).get("router_aux_loss") or {}
    theirs = (yaml.safe_load(axolotl_config.read_text(encoding="utf-8")) or {}).get("model_config") or {}
    return {"ours": f"coef {ours['coef']}" if ours.get("on") else "off" if ours.get("moe") else "dense model",
            "axolotl": (f"coef {theirs.get('router_aux_loss_coef')}" if theirs.get("output_router_logits")
                        else "off" if "output_router_logits" in theirs else "the checkpoint's config")}


def tiny_warmup_steps(max_steps: int) -> int:
    """Our trainer's warm-up steps on the tiny preset: transformers rounds warmup_ratio x steps up."""
    from core.records import load_records

    tiny = PRESETS["tiny"]
    steps = max_steps if max_steps > 0 else math.ceil(
        len(load_records(str(REPO / tiny["train_file"]))) / tiny["micro_batch_size"] * tiny["num_epochs"])
    return math.ceil(tiny["warmup_ratio"] * steps)


def run_axolotl_pair(out: Path, model: str, max_steps: int, eval_samples: int,
                     router_aux_loss_coef: float = 0.0) -> dict:
    py = sys.executable
    model_dir = tiny_model_dir(model)
    # Training only: both stacks are evaluated afterwards by the same evaluator. Both start from the same
    # seeded LoRA init and warm up for as many steps (Axolotl rounds warmup_ratio x steps down, we up).
    changes = {"logging_steps": 1, **({"max_steps": max_steps, "save_steps": max_steps} if max_steps > 0 else {}),
               **axolotl_model_changes(model, router_aux_loss_coef),
               "plugins": ["callbacks.axolotl_plugins.SeededLoraInitPlugin", "callbacks.axolotl_plugins.RunSummaryPlugin"],
               "warmup_ratio": None, "warmup_steps": tiny_warmup_steps(max_steps)}
    config = tiny_axolotl_training_config(out / "axolotl_config.yml", model_dir, out / "axolotl", **changes)

    step("data (tiny set, messages export)", [py, "-m", "data_tools", "axolotl-data", str(AXOLOTL_TINY)],
         out / "data.log")
    step("config check (Axolotl)", [py, "parity.py", "check-axolotl", str(config), "--model", model_dir,
                                    "--num-gpus", "1"], out / "check.log")
    times = {
        "ours": step("train qwen_finetune.py --mode single", [py, "qwen_finetune.py", "--mode", "single",
                     "--preset", "tiny", "--overwrite", f"output_dir={out / 'ours'}", "gen_eval=false",
                     f"model_name={model}", f"router_aux_loss_coef={router_aux_loss_coef}",
                     "logging_steps=1", "eval_steps=100000", "save_steps=100000", *ours_args(max_steps)],
                     out / "train_ours.log"),
        "axolotl": step("train Axolotl", [str(axolotl_python()), "-m", "axolotl.cli.train", str(config)],
                        out / "train_axolotl.log", env=axolotl_env()),
    }
    ours_summary = out / "ours" / "single" / "run_summary.json"
    backend = json.loads(ours_summary.read_text())["backend"]
    adapters = {"base": None, f"ours ({backend})": str(out / "ours" / "single" / "adapter"),
                "axolotl": str(out / "axolotl")}
    summaries = {f"ours ({backend})": str(ours_summary), "axolotl": str(out / "axolotl" / "run_summary.json")}
    aux = aux_loss_settings(ours_summary, config)
    return _evaluate_and_compare(out, model, adapters, summaries, eval_samples, times,
                                 reference=f"ours ({backend})", candidate="axolotl", learnt_check=True,
                                 tolerance=AXOLOTL_PAIR_TOLERANCE,
                                 notes=[f"Model: {model}. Router load-balancing loss: ours {aux['ours']}, "
                                        f"Axolotl {aux['axolotl']}.\n"])


# Two stacks (other TRL and transformers versions, their own data order) trained on the same data score
# the same records: a headline metric may differ by this much either way. On 100 records one answer moves
# a rate by 0.01 and the runs differ by 0.00-0.02 (bench/RESULTS.md parity runs); 0.05 fails a real gap.
AXOLOTL_PAIR_TOLERANCE = 0.05


def legacy_command(out: Path, model: str, max_steps: int, max_train_samples: int, *overrides: str) -> list[str]:
    """qwen_finetune_legacy.py on a tiny model into `out`: the frozen recipe, training only (the pair
    evaluates afterwards), every step's loss logged. tests/legacy_reference.py runs the same command."""
    return [sys.executable, "qwen_finetune_legacy.py", "--preset", "tiny", "--backend", "hf", "--overwrite",
            "gen_eval=false", "logging_steps=1", f"model_name={model}", "eval_steps=100000", "save_steps=100000",
            f"max_train_samples={max_train_samples}", *ours_args(max_steps), f"output_dir={out}", *overrides]


def run_legacy_pair(out: Path, model: str, max_steps: int, eval_samples: int, max_train_samples: int) -> dict:
    py = sys.executable
    times = {"legacy": step("train qwen_finetune_legacy.py",
                            legacy_command(out / "legacy", model, max_steps, max_train_samples), out / "train_legacy.log")}
    # The new script, given exactly the legacy run's configuration.
    times["two-stage"] = step("train qwen_finetune.py --mode two-stage",
                              [py, "qwen_finetune.py", "--config", str(out / "legacy" / "stage1" / "config.yaml"),
                               "--overwrite", f"output_dir={out / 'two-stage'}"], out / "train_two_stage.log")
    adapters = {"legacy": str(out / "legacy" / "stage2" / "adapter"),
                "two-stage": str(out / "two-stage" / "stage2" / "adapter")}
    summaries = {name: str(out / name / "stage2" / "run_summary.json") for name in adapters}
    result = _evaluate_and_compare(out, model, adapters, summaries, eval_samples, times, reference="legacy",
                                   candidate="two-stage", learnt_check=False, notes=[f"Model: {model}.\n"])
    same = all(cmp.losses_of(str(out / "legacy" / s / "run_summary.json"))
               == cmp.losses_of(str(out / "two-stage" / s / "run_summary.json")) for s in ("stage1", "stage2"))
    say(f"losses per step identical in both stages: {same}")
    result["ok"] = result["ok"] and same
    result["identical_losses"] = same
    return result


def _evaluate_and_compare(out: Path, model: str, adapters: dict, summaries: dict, eval_samples: int,
                          times: dict, *, reference: str, candidate: str, learnt_check: bool,
                          notes: list[str] = (), tolerance: float | None = None) -> dict:
    eval_file = str(REPO / "data" / "tiny" / "hawks_val_mixed.json")
    metrics, files = {}, {}
    for name, adapter in adapters.items():
        say(f"evaluate {name} on {eval_samples} validation records (shared evaluator)")
        folder = out / "eval" / name.split()[0]
        metrics[name] = evaluate(model, adapter, eval_file, folder, max_samples=eval_samples, seed=0)
        files[name] = str(folder / "metrics.json")
    tolerances = {k: tolerance for k in cmp.DEFAULT_TOLERANCES} if tolerance else dict(cmp.DEFAULT_TOLERANCES)
    rows = cmp.compare(metrics[reference], metrics[candidate], tolerances)
    learnt = {}
    if learnt_check:
        for name in (reference, candidate):
            learnt[name] = {k: metrics[name][k] - metrics["base"][k] for k in LEARNT_MARGIN}
    # two-sided: a pair is meant to be the same run, so either side worse beyond the tolerance fails
    ok = not any(r.apart for r in rows) and all(
        gain[k] >= LEARNT_MARGIN[k] for gain in learnt.values() for k in LEARNT_MARGIN)
    table = headline_table(metrics)
    report = out / "parity_report.md"
    extra = [f"\n## All runs (headline metrics)\n\n{table}\n",
             f"Training wall time (s): {', '.join(f'{k} {v:.0f}' for k, v in times.items())}\n", *notes]
    if learnt:
        extra.append("Gain over the untrained base (must be >= "
                     + ", ".join(f"{k} {v}" for k, v in LEARNT_MARGIN.items()) + "): "
                     + "; ".join(f"{n}: " + ", ".join(f"{k} {v:+.3f}" for k, v in g.items())
                                 for n, g in learnt.items()) + "\n")
    cmp.write_report(out, rows, (reference, candidate), (files[reference], files[candidate]),
                     (cmp.losses_of(summaries.get(reference)), cmp.losses_of(summaries.get(candidate))),
                     appendix="".join(extra),
                     errors=cmp.error_table(metrics[reference], metrics[candidate], reference, candidate),
                     two_sided=True)
    print(table)
    for line in extra[1:]:
        print(line.strip())
    return {"ok": ok, "metrics": metrics, "learnt": learnt, "failed": [r.name for r in rows if r.apart],
            "train_seconds": times, "report": str(report)}


def headline_table(metrics: dict) -> str:
    keys = list(cmp.DEFAULT_TOLERANCES)
    lines = ["| run | " + " | ".join(k.removeprefix("gen_") for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def run(preset: str, pair: str, out: Path, max_steps: int, eval_samples: int, max_train_samples: int,
        model: str = "", router_aux_loss_coef: float = 0.0) -> int:
    if preset != "tiny":
        raise DataError(f"preset '{preset}': `run` is the CPU loop on the tiny preset; on GPUs run the two "
                        "stacks with their configs, then `parity.py evaluate` and `compare`")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = model or PRESETS["tiny"]["model_name"]
    if model not in TINY_MODELS:
        raise DataError(f"--model {model}: `run` trains the tiny models only ({', '.join(TINY_MODELS)})")
    if pair == "axolotl":
        result = run_axolotl_pair(out, model, max_steps, eval_samples, router_aux_loss_coef)
    else:
        result = run_legacy_pair(out, model, max_steps, eval_samples, max_train_samples)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "parity_result.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    verdict = "PASS" if result["ok"] else "FAIL"
    say(f"{verdict} ({pair} pair) in {result['total_seconds']:.0f}s; report: {result['report']}")
    return 0 if result["ok"] else 1
