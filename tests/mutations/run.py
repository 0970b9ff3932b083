"""Mutations that each guarded test must catch: every one is applied to a copy of the repository, its
tests run there, and a mutation is "caught" when they fail. Not part of the default test run (minutes).

    .venv/bin/python tests/mutations/run.py [NAME ...]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name: (file, text, replacement, pytest selection), or ([(file, text, replacement), ...], selection)
MUTATIONS = {
    "control-trains-with-the-article": (
        "tests/blind_reader/sitecustomize.py",
        "prompt.prompt_messages = lambda instruction, article: [",
        "_unused = lambda instruction, article: [",
        ["tests/test_reading.py", "-k", "cannot_see"]),
    "legacy-stage2-lr-halved": (
        "qwen_finetune_legacy.py",
        '"stage2_learning_rate": 1e-4,',
        '"stage2_learning_rate": 5e-5,',
        ["tests/test_parity.py", "-k", "legacy_pair"]),
    # the recipe file edited along with the script: only the committed losses and adapter can tell
    "legacy-stage2-lr-halved-recipe-too": (
        [("qwen_finetune_legacy.py", '"stage2_learning_rate": 1e-4,', '"stage2_learning_rate": 5e-5,'),
         ("tests/reference/legacy_recipe.json", '"stage2_learning_rate": 0.0001,', '"stage2_learning_rate": 5e-05,')],
        ["tests/test_parity.py", "-k", "legacy_pair"]),
    "legacy-alpha-halved-recipe-too": (
        [("qwen_finetune_legacy.py", '"lora_alpha": 32,', '"lora_alpha": 16,'),
         ("tests/reference/legacy_recipe.json", '"lora_alpha": 32,', '"lora_alpha": 16,')],
        ["tests/test_parity.py", "-k", "legacy_pair"]),
    "legacy-key-unfrozen": (
        "qwen_finetune_legacy.py",
        '    "max_grad_norm": 1.0,\n',
        "",
        ["tests/test_parity.py", "-k", "legacy_pair"]),
    "unsloth-attention-unrecognised": (
        "finetune/model.py",
        'return type(module).forward.__module__.startswith("unsloth.models.")',
        'return type(module).forward.__module__.startswith("unsloth.kernels.")',
        ["tests/test_trainer_config.py", "-k", "unsloths_own"]),
    "compiled-transformers-attention-taken-for-unsloths": (
        "finetune/model.py",
        'return type(module).forward.__module__.startswith("unsloth.models.")',
        'return type(module).forward.__module__.startswith("unsloth")',
        ["tests/test_trainer_config.py", "-k", "unsloths_own"]),
    "rehearsal-read-again-per-stage": (
        "finetune/data.py",
        'rehearsal.plan_general(data.get(("general", cfg.rehearsal_data), cfg.rehearsal_data),',
        "rehearsal.plan_general(cfg.rehearsal_data,",
        ["tests/test_walk.py"]),
    "records-read-through-another-module": (
        "finetune/checks.py",
        "data: dict = {path: load_records(path) for path in paths}",
        "from finetune.data import load_split\n    data: dict = {path: load_split(path, 0, 0) for path in paths}",
        ["tests/test_walk.py"]),
    "dry-run-plans-another-machine": (
        "finetune/preflight.py",
        "here = run_plan.decide(cfg, model_config, machine)",
        "here = run_plan.decide(cfg, model_config, machine.with_gpus())",
        ["tests/test_moe.py", "-k", "keeps_training_as_it_was and unsloth"]),
    "run-token-lengths-count-the-answer-as-prompt": (
        "finetune/data.py",
        '"prompt_length": len(prompt)})',
        '"prompt_length": len(full)})',
        ["tests/test_token_lengths.py", "-k", "one_tokenisation"]),
    "distillation-term-without-gradient": (
        "finetune/distill.py",
        "loss = (task + self.distill_lambda * distill) / denominator",
        "loss = (task + self.distill_lambda * distill.detach()) / denominator",
        ["tests/test_distill.py", "-k", "off_is_the_plain"]),
    "demo-reference-off-by-0.1": (
        "tests/reference/demo_metrics.json",
        '"gen_offender_name_set_f1": 0.9138,',
        '"gen_offender_name_set_f1": 0.8138,',
        ["tests/test_reading.py", "-k", "committed_figures"]),
    "cpu-ranks-cannot-resume": (
        "finetune/checkpoints.py",
        "if checkpoint is None or device.type != \"cpu\" or device.index is None:",
        "if True:",
        ["tests/test_multinode.py", "-k", "killed"]),
    "mlflow-logged-by-every-node": (
        "callbacks/mlflow_logger.py",
        "from core.distributed import is_rank_zero\n",
        "from core.distributed import is_local_zero as is_rank_zero\n",
        ["tests/test_multinode.py", "-k", "killed"]),
    "output-folder-not-checked": (
        "finetune/nodes.py",
        "    if nodes() <= 1:\n        return\n    import torch.distributed as dist\n",
        "    return\n    import torch.distributed as dist\n",
        ["tests/test_multinode.py", "-k", "not_shared"]),
    "resume-on-any-world-size": (
        "finetune/nodes.py",
        'if before.get("world_size") != world_size():',
        "if False:",
        ["tests/test_nodes.py", "-k", "resume"]),
    "slurm-rendezvous-on-the-wrong-host": (
        "scripts/slurm/torchrun_args.py",
        'return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")',
        'return prefix + (ranges.split(",")[-1].split("-")[-1] if ranges else "")',
        ["tests/test_nodes.py", "-k", "slurm"]),
    "card-quotes-the-last-step": (
        "finetune/model_card.py",
        '    return (summary.get("best") or {}).get("adapter_step") or summary.get("global_step")',
        '    return summary.get("global_step")',
        ["tests/test_export.py", "-k", "model_card"]),
    "library-noise-shown": (
        "finetune/cli.py",
        "    silence_known_noise(verbose_requested(argv))\n",
        "",
        ["tests/test_preflight.py", "-k", "production_preset_dry_run_works_offline"]),
    "auto-deepspeed-stays-ddp": (
        "finetune/memory_plan.py",
        'return [str(ZERO2_ON_GPU), str(ZERO2_OFFLOAD)], f"auto: bf16 LoRA on {world} GPUs"',
        'return [""], f"auto: bf16 LoRA on {world} GPUs"',
        ["tests/test_memory.py", "-k", "users_command or stops_before"]),
    "gpu-run-not-refused": (
        "finetune/checks.py",
        "    if memory.fits or not cfg.check_memory:\n        return memory",
        "    if True:\n        return memory",
        ["tests/test_memory.py", "-k", "stops_before"]),
    "lm-head-on-every-position": (
        "finetune/memory.py",
        "trained = tokens if trained_tokens is None else trained_tokens",
        "trained = tokens",
        ["tests/test_memory.py", "-k", "narrow"]),
    "4bit-lora-in-float32": (
        "finetune/memory_plan.py",
        'lora_bytes=2 if cfg.load_in_4bit and backend == "hf" else 4',
        "lora_bytes=4",
        ["tests/test_memory.py", "-k", "narrow"]),
    "ddp-shards-nothing": (
        "finetune/memory.py",
        "optimizer = 0 if launcher.offload else 12 * p / w",
        "optimizer = 0 if launcher.offload else 12 * p",
        ["tests/test_memory.py", "-k", "resident"]),
    "decode-without-the-fold": (
        "finetune/timing.py",
        'FOLD_TRAFFIC = {"peft": 8.0,',
        'FOLD_TRAFFIC = {"peft": 0.0,',
        ["tests/test_timing.py", "-k", "refolds"]),
    "batches-decode-the-shortest-answer": (
        "finetune/timing.py",
        "steps = min(max(a[i] for i in rows) + 1, budget)",
        "steps = min(min(a[i] for i in rows) + 1, budget)",
        ["tests/test_timing.py", "-k", "longest_answer"]),
    "preset-evaluates-every-200-steps": (
        "finetune/presets.py",
        '"eval_steps": 800, "eval_max_samples": 500,',
        '"eval_steps": 200, "eval_max_samples": 500,',
        ["tests/test_timing.py", "-k", "production"]),
    "auto-gen-batch-ignores-the-plan": (
        "finetune/checks.py",
        "        cfg.gen_eval_batch_size = max(memory.gen_batch, 1)",
        "        cfg.gen_eval_batch_size = 64",
        ["tests/test_memory.py", "-k", "stops_before"]),
    "production-axolotl-config-drops-the-eos-mask": (
        "axolotl_configs/qwen_finetune.yml",
        "    train_on_eos: turn\ntest_datasets:",
        "    train_on_eos: none\ntest_datasets:",
        ["tests/test_parity.py", "-k", "qwen3s_tokenizer"]),
    "pair-gate-one-sided": (
        "parity_tools/compare.py",
        "        return self.failed or (self.tolerance is not None and self.diff is not None\n"
        "                               and abs(self.diff) > self.tolerance + 1e-12)",
        "        return self.failed",
        ["tests/test_parity.py", "-k", "two_sided"]),
    "overwrite-keeps-the-complete-stage": (
        "finetune/stages.py",
        "        if overwrite:\n            if is_rank_zero() and path.exists():",
        "        if False:\n            if is_rank_zero() and path.exists():",
        ["tests/test_trainer.py", "-k", "rerun_skips"]),
    "stage2-starts-from-a-fresh-adapter": (
        "finetune/pipeline.py",
        '                load_adapter_weights(self.model, previous / "adapter")',
        '                [p.data.zero_() for n, p in self.model.named_parameters() if "lora_B" in n]',
        ["tests/test_distributed.py", "-k", "zero2_two_stage"]),
    "score-and-compare-blind-to-a-worse-run": (
        "parity_tools/compare.py",
        "        return self.worse_by > self.tolerance + 1e-12",
        "        return False",
        ["tests/test_readme_commands.py", "-k", "run_as_written"]),
}


def run(name: str) -> bool:
    entry = MUTATIONS[name]
    edits, selection = ([entry[:3]], entry[3]) if isinstance(entry[0], str) else entry
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "data", "__pycache__"))
        for path, text, replacement in edits:
            source = (copy / path).read_text(encoding="utf-8")
            if source.count(text) != 1:
                raise SystemExit(f"{name}: the text to mutate is not once in {path}; update tests/mutations/run.py")
            (copy / path).write_text(source.replace(text, replacement), encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                                 *selection],
                                cwd=copy, capture_output=True, text=True)
    return result.returncode != 0


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="mutations to run (default: all): "
                        + ", ".join(MUTATIONS))
    names = parser.parse_args().names or list(MUTATIONS)
    unknown = [name for name in names if name not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}")
    missed = []
    for name in names:
        caught = run(name)
        print(f"{'caught' if caught else 'MISSED'}  {name}", flush=True)
        missed += [] if caught else [name]
    print(f"{len(names) - len(missed)} of {len(names)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
