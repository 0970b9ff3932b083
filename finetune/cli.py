"""Command line shared by qwen_finetune.py and qwen_finetune_legacy.py."""

from __future__ import annotations

import argparse
import os
import sys
import time

from core.errors import ConfigError, UserError
from core.quiet import silence_known_noise, verbose_requested
from finetune import config as config_mod
from finetune.config_schema import BACKENDS, MODES, describe_keys
from finetune.presets import PRESETS


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any configuration key can be set as key=value or --key value "
               "(e.g. learning_rate=1e-4 --lora_r 8); --help-config lists them.")
    p.add_argument("--mode", choices=MODES, help="single (bf16 LoRA, one stage) or two-stage "
                   "(4-bit QLoRA, positives then the mix)")
    p.add_argument("--config", help="YAML file of configuration keys")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--backend", choices=BACKENDS, help="auto (Unsloth when it imports), unsloth, hf")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (e.g. deepspeed_configs/zero2.json), none, or auto "
                   "(the default: ZeRO-2 for bf16 LoRA on several GPUs, chosen to fit; see the dry run)")
    p.add_argument("--dry-run", action="store_true", help="print the preflight report and exit")
    p.add_argument("--nproc", type=int, metavar="N", help="with --dry-run: the number of ranks (GPUs) the run "
                   "will use, for the memory estimate and the DeepSpeed batch check (default: $WORLD_SIZE, else 1)")
    p.add_argument("--nnodes", type=int, metavar="M", help="with --dry-run: the number of nodes, each running "
                   "--nproc ranks (default 1); the plan is per device of the M x N ranks")
    # DeepSpeed's launcher appends --local_rank=N; the rank is read from LOCAL_RANK, which it also sets
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue an unfinished stage from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete and retrain stages that already exist")
    p.add_argument("--help-config", action="store_true", help="list every configuration key: type, default, description")
    p.add_argument("--verbose", action="store_true", help="also show the known harmless library messages that are "
                   "hidden by default (core/quiet.py; or QWEN_FINETUNE_VERBOSE=1)")
    return p


def split_overrides(extra: list[str]) -> list[str]:
    """`key=value`, `--key=value`, `--key value` and `--flag` (true) -> ["key=value", ...]."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            out.append(item)
        elif "=" in item:
            out.append(item[2:])
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--") and "=" not in extra[i + 1]:
            out.append(f"{item[2:]}={extra[i + 1]}")
            i += 1
        else:
            out.append(f"{item[2:]}=true")
        i += 1
    return out


def main(argv: list[str] | None, prog: str, description: str, *, fixed: dict | None = None,
         default_preset: str | None = None) -> int:
    """`fixed`: keys a restore path freezes over any preset (the user may still override them)."""
    silence_known_noise(verbose_requested(argv))
    if argv and argv[0] in ("export", "mlflow-replay"):
        argv = [a for a in argv if a != "--verbose"]
    if argv and argv[0] == "export":
        from finetune.export import main as export_main

        return export_main(argv[1:], prog)
    if argv and argv[0] == "mlflow-replay":
        from callbacks.mlflow_spool import replay_main

        return replay_main(argv[1:], prog)
    # before CUDA's allocator starts: one growable segment instead of fixed blocks, so the generation eval's
    # differently sized tensors reuse what training freed (PyTorch's advice for fragmentation OOMs)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args, extra = build_parser(prog, description).parse_known_args(argv)
    if args.help_config:
        print(describe_keys())
        return 0
    try:
        if args.nproc is not None and (not args.dry_run or args.nproc < 1):
            # a real run's world size is torchrun's (--nproc_per_node), never a second source
            raise ConfigError("--nproc N (N >= 1) goes with --dry-run only; to train on N GPUs use "
                              "torchrun --nproc_per_node=N")
        if args.nnodes is not None and (not args.dry_run or args.nnodes < 1):
            raise ConfigError("--nnodes M (M >= 1) goes with --dry-run only; to train on M nodes start "
                              "torchrun --nnodes=M on each (docs/multi-node.md)")
        nodes = args.nnodes or 1
        world = (args.nproc or 1) * nodes if args.nproc is not None or args.nnodes is not None else None
        overrides = config_mod.parse_overrides(split_overrides(extra))
        cfg = config_mod.resolve(
            args.mode, args.preset, args.config, overrides,
            {"backend": args.backend, "deepspeed": args.deepspeed}, fixed=fixed or {},
            dry_run=args.dry_run, world=world, default_preset=default_preset or "tiny")
        started = time.perf_counter()
        if not args.dry_run:
            from finetune.model import import_backend

            import_backend(cfg.backend)  # Unsloth before the pipeline imports transformers, TRL and PEFT
        from finetune.pipeline import Recipe

        recipe = Recipe(cfg, resume=args.resume, overwrite=args.overwrite,
                        import_seconds=time.perf_counter() - started)
        return recipe.run(dry_run=args.dry_run, world=world, nodes=nodes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from callbacks.mlflow_logger import MLflowUnavailable

        if not isinstance(e, MLflowUnavailable):
            raise
        print(f"error: {e}. Start the server, fix mlflow_tracking_uri, or set mlflow_require=false "
              "to keep training and spool the logs", file=sys.stderr)
        return 1
