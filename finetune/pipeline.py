"""The fine-tuning job, top to bottom: config -> data -> model + LoRA -> stages -> summary.

`qwen_finetune.py` and `qwen_finetune_legacy.py` are thin command lines over
`Recipe(cfg).run()`; the legacy one only differs by its frozen defaults. From
the command line to `trainer.train()`: `Recipe.run` -> `Recipe.train_stage`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.distributed import is_local_zero, is_rank_zero, world_size
from core.distributed import nodes as node_count
from core.metrics import HEADLINE
from core.records import file_sha256, load_records, seeded_subset
from core import run_summary
from core.runinfo import library_versions
from data_tools.tiny_data import ensure_tiny_data
from data_tools.stats import length_report
from finetune import config as config_mod
from finetune.config import FinetuneConfig
from finetune.data import StageData, describe_packing, stage_data
from finetune.forgetting import measure_forgetting
from finetune.memory import CPU_GEN_BATCH
from finetune.moe import TaskLossCallback, expert_lora_path, router_aux_loss_setting, use_experts_implementation
from finetune.moe import describe as describe_aux_loss
from finetune.nodes import check_shared_output, describe_launch, launch_table, record_launch
from finetune.rehearsal import load_general, plan_general, text_rows
from finetune.selection import describe as describe_best
from finetune.selection import describe_plan, selects_best
from finetune.stages import (MARKER, Stage, aux_losses, checkpoint_step, distill_losses, is_complete,
                             latest_checkpoint, plan_stage_dirs, sft_trainer, stage_dir, stages_for)

SUMMARY_METRICS = (*HEADLINE, "general_loss_base", "general_loss_tuned", "general_loss_increase")


class PhaseTimer:
    """Wall time of each start-up phase, printed as it ends (where did the minutes go?)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
        say(f"[time] {name}: {self.seconds[name]:.1f}s")


def say(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)


@dataclass
class StageInputs:
    """What a stage trains and evaluates on: its eval records, its finished datasets, the rehearsal plan
    (None without one) and the data's identity for the summary."""
    eval_records: list[dict]
    rows: StageData
    general: object
    identity: dict


class Recipe:
    """The fine-tuning job as one object, read top to bottom: `run` checks the data and config, `setup`
    loads the model and puts LoRA on it, `train_stage` trains each stage (its finished datasets, its
    trainer, training, the saved adapter and run summary), and the summary is printed at the end.
    What every stage shares (config, model, LoRA plan, timer) lives on the object, decided once."""

    def __init__(self, cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
                 import_seconds: float = 0.0):
        """`import_seconds`: what the command line spent importing the backend and this module."""
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.timer = PhaseTimer()
        self.timer.seconds["imports"] = round(import_seconds, 2)
        self.launch: dict | None = None  # nodes x ranks, gathered when the run starts (finetune/nodes.py)

    def run(self, dry_run: bool = False, world: int | None = None, nodes: int = 1) -> int:
        """`world`, `nodes`: the dry run's ranks and nodes (--nproc x --nnodes; default: this launch's)."""
        cfg, timer = self.cfg, self.timer
        files = config_mod.data_files(cfg)
        say("resolved configuration:\n" + config_mod.describe(cfg))
        init_distributed(cfg)
        if cfg.preset == "tiny" and is_local_zero():  # per node: its own disk may not be shared
            ensure_tiny_data(files)
        _wait_for_rank_zero()
        if dry_run:
            from finetune.preflight import preflight

            return preflight(cfg, world or world_size(), nodes if world else node_count())
        check_shared_output(cfg.output_dir)
        self.launch = launch_table()
        if self.launch["world_size"] > 1:
            say(describe_launch(self.launch))

        stages = stages_for(cfg)
        self.memory = check_memory(cfg, stages, self.resume)
        plan_stage_dirs(cfg, stages, self.resume, self.overwrite)
        _wait_for_rank_zero()
        todo = [s for s in stages if not is_complete(stage_dir(cfg, s))]
        if not todo:
            say(f"every stage in {cfg.output_dir} is already complete; nothing to do "
                "(pass --overwrite to train again)")
            print_summary(cfg, [json.loads((stage_dir(cfg, s) / "run_summary.json").read_text()) for s in stages])
            return 0

        say(describe_plan(cfg))
        with timer("data_check"):
            self.data = read_run_data(cfg, todo)
            if selects_best(cfg):
                check_best_metric_reported(cfg, self.data[cfg.eval_file])
        check_model_config(cfg)
        if cfg.mlflow and cfg.mlflow_require and is_rank_zero():
            mlflow_logger(cfg, Path(cfg.output_dir), "check").check()
        self.setup()

        parent = None
        if cfg.mlflow and len(stages) > 1:  # two-stage: the stages are nested runs under one parent
            parent = mlflow_logger(cfg, Path(cfg.output_dir), cfg.mlflow_run_name or Path(cfg.output_dir).name)
            parent.start({"config": config_mod.to_dict(cfg), "backend": self.backend,
                          "libraries": library_versions()})
        summaries, previous = [], None
        for stage in stages:
            out = stage_dir(cfg, stage)
            if is_complete(out):
                say(f"{stage.name}: already complete in {out}; skipping")
                summaries.append(json.loads((out / "run_summary.json").read_text()))
                previous = out
                continue
            if previous is not None:  # an earlier stage finished in another process, or chose an earlier step
                from finetune.model import load_adapter_weights

                load_adapter_weights(self.model, previous / "adapter")
                say(f"{stage.name}: continuing the adapter of {previous / 'adapter'} "
                    f"(step {adapter_step(summaries[-1])})")
            summaries.append(self.train_stage(stage, parent))
            gc.collect()  # the finished stage's trainer (released above) before the next one builds its own
            _empty_cuda_cache()
            # The model in memory carries the last step's adapter; the next stage continues the chosen one
            previous = out if selects_best(cfg) else None
        if parent is not None:
            parent.end()
        print_summary(cfg, summaries, parent.spool_counts() if parent is not None else None)
        return 0

    def setup(self) -> None:
        """The backend, the base model and its LoRA: what every stage trains."""
        cfg, timer = self.cfg, self.timer
        with timer("imports"):
            from finetune.model import add_lora, attention_implementation, has_cuda, import_backend, load_base

            backend, backend_why = import_backend(cfg.backend)
            import transformers
            import trl  # noqa: F401

            if backend == "hf":
                from finetune import trl_cpu

                if trl_cpu.install_if_needed():
                    say("no GPU: TRL's Triton loss kernel replaced by its torch equivalent (finetune/trl_cpu.py)")

            import callbacks.generation_eval  # noqa: F401
            from finetune.lora import check_trainable, plan_targets
            from finetune.quant_experts import describe_storage, storage_by_category
        transformers.set_seed(cfg.seed)
        say(f"backend: {backend} ({backend_why})")
        with timer("model_load"):
            model, tokenizer = load_base(cfg, backend)
            experts = use_experts_implementation(model, cfg.experts_implementation, has_cuda())
        with timer("lora"):
            plan = plan_targets(model, cfg)
            model = add_lora(model, cfg, backend, plan)
            params = check_trainable(model, plan)
        say(f"LoRA targets: modules {plan.modules}, parameters {plan.parameters}, router "
            f"{'trained' if plan.router else 'frozen'}; trainable {params['trainable']:,} of "
            f"{params['total']:,} ({params['trainable_by_category']})")
        storage = storage_by_category(model)
        say(f"weight storage: {describe_storage(storage)}")
        aux = router_aux_loss_setting(cfg, model.config)
        asked = attention_implementation(cfg)
        # what the model runs: a backend may choose otherwise (Unsloth falls back to sdpa where flash-attn
        # cannot run), and the run summary records this one
        attention = getattr(model.config, "_attn_implementation", None) or asked
        if attention != asked:
            say(f"attention: {asked} was asked for; the loaded model runs {attention}")
        model_info = {"router_aux_loss": aux, "weight_storage": storage, "experts_implementation": experts,
                      "attn_implementation": attention, "expert_lora": expert_lora_path(model)}
        if aux["moe"]:
            say(f"MoE router {describe_aux_loss(aux)}")
            say(f"MoE experts run as {experts} (experts_implementation={cfg.experts_implementation}); "
                f"expert LoRA: {model_info['expert_lora']}")
        self.backend, self.model, self.tokenizer = backend, model, tokenizer
        self.plan, self.params, self.model_info = plan, params, model_info

    def stage_datasets(self, stage: Stage) -> StageInputs:
        """The stage's records (rehearsal mixed in) and their finished datasets, with what was cut or left
        out said before training starts."""
        cfg, tokenizer, timer = self.cfg, self.tokenizer, self.timer
        with timer(f"{stage.name}.data_load"):
            train_records = seeded_subset(self.data[stage.train_file], cfg.max_train_samples, cfg.seed)
            eval_records = (seeded_subset(self.data[cfg.eval_file], cfg.eval_max_samples, cfg.seed)
                            if cfg.eval_file else [])
            lengths = length_report(train_records, tokenizer, cfg.max_length)
            general = plan_general(cfg.rehearsal_data, cfg.rehearsal_ratio, cfg.general_eval_file,
                                   cfg.general_eval_samples, len(train_records), cfg.seed)
        rehearsal_text: list[dict] = []
        if general is not None and general.examples:
            r = general.report
            say(f"rehearsal: {r['examples']:,} {general.kind} examples from {r['file']} mixed with "
                f"{r['task_examples']:,} task examples (share {r['share']:.1%}, {r['passes_over_pool']} passes "
                f"over {r['pool']:,}; {r['skipped_empty_documents']} empty documents skipped)")
            if general.kind == "records":
                train_records = train_records + general.examples
            else:
                rehearsal_text = text_rows(general.examples, tokenizer, cfg.max_length)
        if lengths["over_max_length"]:
            say(f"warning: about {lengths['over_max_length']:,} of {len(train_records):,} training examples "
                f"are longer than max_length {cfg.max_length} and will be cut (answer end lost); "
                f"token length percentiles: {lengths['tokens']}")
        with timer(f"{stage.name}.tokenise"):
            stage_rows = stage_data(cfg, train_records, eval_records, tokenizer, rehearsal_text)
        say(f"{stage.name}: {describe_packing(stage_rows.report())}")
        if stage_rows.dropped:
            say(f"warning: {stage_rows.dropped:,} training examples left out: max_length {cfg.max_length} cuts "
                "away their whole answer (no trained token left); raise max_length to keep them")
        if stage_rows.eval_dropped:
            say(f"warning: {stage_rows.eval_dropped:,} eval examples leave eval_loss: max_length {cfg.max_length} cuts "
                "away their whole answer (the generation eval still scores them)")
        data_identity = {"train_file": stage.train_file, "train_sha256": file_sha256(stage.train_file),
                         "train_examples": len(train_records), "eval_file": cfg.eval_file,
                         "eval_sha256": file_sha256(cfg.eval_file) if cfg.eval_file else None,
                         "eval_examples": len(eval_records), "token_lengths": lengths,
                         "sources": dict(Counter(r.get("source") or "(none)" for r in train_records)
                                         + Counter(r["source"] for r in rehearsal_text)),
                         "general": general.report if general else None}
        return StageInputs(eval_records, stage_rows, general, data_identity)

    def train_stage(self, stage: Stage, parent_logger=None) -> dict:
        """One stage: its finished datasets, its trainer and callbacks, training, then (rank 0) the adapter,
        config.yaml, run_summary.json and COMPLETE."""
        cfg, model, tokenizer, timer = self.cfg, self.model, self.tokenizer, self.timer
        backend, plan, params, model_info, resume = self.backend, self.plan, self.params, self.model_info, self.resume
        from callbacks.generation_eval import GenerationEvalCallback
        from callbacks.watchdog import StallWatchdog

        out = stage_dir(cfg, stage)
        inputs = self.stage_datasets(stage)
        eval_records, stage_rows, general = inputs.eval_records, inputs.rows, inputs.general
        data_identity, packing = inputs.identity, inputs.rows.report()
        trainer_callbacks = [_import_object(path)() for path in cfg.extra_callbacks]
        gen_eval = None
        if cfg.gen_eval and eval_records:
            gen_eval = GenerationEvalCallback(eval_records, batch_size=cfg.gen_eval_batch_size,
                                              max_samples=cfg.gen_eval_max_samples, seed=cfg.seed, output_dir=out)
            trainer_callbacks.append(gen_eval)
        checkpoint = latest_checkpoint(out) if resume else None
        best = None
        if selects_best(cfg):
            from finetune.best import BestAdapterCallback
            from finetune.selection import parse_constraint

            best = BestAdapterCallback(cfg.best_metric, [parse_constraint(c) for c in cfg.best_metric_constraint], out,
                                       resume_step=checkpoint_step(checkpoint) if checkpoint else None)
            trainer_callbacks.append(best)
        libraries = library_versions()
        tracker = None
        if cfg.mlflow:
            run_name = stage.name if parent_logger else (cfg.mlflow_run_name or Path(cfg.output_dir).name)
            tracker = mlflow_logger(cfg, out, run_name, parent_logger)
            tracker.params = {"config": config_mod.to_dict(cfg), "stage": stage.name, "backend": backend,
                              "data": data_identity, "packing": packing, "libraries": libraries,
                              "trainable_parameters": params["trainable_by_category"], "launch": self.launch}
            trainer_callbacks.append(tracker)
        # Last: its pause over an evaluation then covers every other callback's evaluation work
        watchdog = StallWatchdog(cfg.watchdog_first_step_s, cfg.watchdog_step_s, log_dir=out,
                                 pause_timeout_s=cfg.watchdog_pause_s)
        trainer_callbacks.append(watchdog)
        with timer(f"{stage.name}.build_trainer"):
            trainer = sft_trainer(cfg, stage, out, model, tokenizer, stage_rows, trainer_callbacks)
        for callback in (gen_eval, best):
            if callback is not None:
                callback.trainer = trainer
        # First of all callbacks, before transformers' report_to loggers: they all see loss_task next to aux_loss
        trainer.callback_handler.callbacks.insert(0, TaskLossCallback(model_info["router_aux_loss"]["coef"]))
        if checkpoint:
            say(f"{stage.name}: resuming from {checkpoint}")
        record_launch(out, self.launch)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_s = time.perf_counter() - start
        if watchdog.first_step_s is not None:
            timer.seconds[f"{stage.name}.first_optimizer_step"] = round(watchdog.first_step_s, 2)
            say(f"[time] {stage.name}.first_optimizer_step: {watchdog.first_step_s:.1f}s")
        for kind, (count, seconds) in watchdog.pause_totals().items():  # the pauses the watchdog did not time
            if count:
                timer.seconds[f"{stage.name}.{kind}"] = seconds
                say(f"[time] {stage.name}.{kind}: {seconds:.1f}s ({count})")
        metrics = dict(result.metrics)
        if eval_records:
            # The scheduled evaluation may already have run at the last step (eval_steps divides it):
            # on a 30B model a second pass costs minutes.
            last = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
            metrics.update({k: v for k, v in last[-1].items() if k.startswith("eval_")} if last else trainer.evaluate())
        if gen_eval is not None and gen_eval.history:
            metrics.update({k: v for k, v in gen_eval.history[-1].items() if k != "step"})
        if general is not None and general.heldout and trainer.is_world_process_zero():
            with timer(f"{stage.name}.forgetting_measure"):
                metrics.update(measure_forgetting(model, tokenizer, general.heldout_kind, general.heldout,
                                                  cfg.max_length, cfg.eval_batch_size))
        log = trainer.state.log_history
        summary = run_summary.build(
            backend=backend, model=cfg.model_name, global_step=trainer.state.global_step, log_history=log,
            metrics=metrics, stage=stage.name, mode=cfg.mode, train_seconds=round(train_s, 1),
            distill_losses=distill_losses(log),
            router_aux_loss={**model_info["router_aux_loss"], "aux_losses": aux_losses(log)},
            weight_storage_bytes=model_info["weight_storage"], phase_seconds=dict(timer.seconds),
            trainable_parameters=params,
            lora_targets={"modules": plan.modules, "parameters": plan.parameters, "matches": plan.matches,
                          "router_trained": plan.router, "expert_rank": plan.expert_rank},
            data=data_identity, packing=packing, mlflow_run_id=tracker.run_id if tracker else None,
            world_size=world_size(), launch=self.launch, watchdog_dumps=watchdog.dumps, attn_implementation=model_info["attn_implementation"],
            experts_implementation=model_info["experts_implementation"], expert_lora=model_info["expert_lora"],
            memory_plan=self.memory.report() if self.memory else None, libraries=libraries,
            ddp_find_unused_parameters=trainer.args.ddp_find_unused_parameters,
            python=sys.version.split()[0])
        if trainer.is_world_process_zero():
            import yaml

            if best is not None:
                summary["best"] = best.finish(trainer.state.global_step)
            else:
                trainer.save_model(str(out / "adapter"))
                tokenizer.save_pretrained(str(out / "adapter"))
            (out / "config.yaml").write_text(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False,
                                                            allow_unicode=True), encoding="utf-8")
            run_summary.write(out / "run_summary.json", summary)
            if tracker is not None:
                chosen = summary.get("best") or {}
                logged = dict(metrics)
                if chosen.get("step") is not None:
                    logged.update({"best_step": chosen["step"], f"best_{chosen['metric']}": chosen["value"]})
                tracker.log_metrics(logged, trainer.state.global_step)
                tracker.end(files=(out / "config.yaml", out / "run_summary.json"))
                summary["mlflow_run_id"] = tracker.run_id  # created late when the server was down at the start
                if tracker.spool_counts():  # the server was unreachable for a while (or refused records)
                    summary["mlflow_spool"] = tracker.spool_counts()
                    run_summary.write(out / "run_summary.json", summary)
            (out / MARKER).write_text(f"{stage.name} finished at step {trainer.state.global_step}\n")
        trainer.accelerator.wait_for_everyone()
        release(trainer)
        return summary


def check_memory(cfg: FinetuneConfig, stages: list[Stage] = (), resume: bool = False):
    """On a GPU, before any weight loads: the memory plan (finetune/memory.py) picks DeepSpeed for
    `deepspeed=auto` and stops a run whose training or generation-eval peak would not fit the device, with
    the changes that would (check_memory=false runs it anyway). Rank 0 plans and every rank takes its
    choice, so all build the same engine. A resumed stage keeps the launcher its checkpoints were saved
    with. A CPU run is not planned."""
    import torch

    if not torch.cuda.is_available():
        if cfg.gen_eval_batch_size == 0:
            cfg.gen_eval_batch_size = CPU_GEN_BATCH
        return None
    from finetune.preflight import run_memory_plan

    import torch.distributed as dist

    memory = run_memory_plan(cfg, world_size()) if is_rank_zero() else None
    if dist.is_available() and dist.is_initialized():
        shared = [memory]
        dist.broadcast_object_list(shared, src=0)
        memory = shared[0]
    if cfg.deepspeed == "auto":
        cfg.deepspeed = resumed_launcher(cfg, stages) if resume else None
        cfg.deepspeed = cfg.deepspeed if cfg.deepspeed is not None else (memory.deepspeed or "auto")
    if cfg.gen_eval_batch_size == 0:
        cfg.gen_eval_batch_size = max(memory.gen_batch, 1)
    say(f"memory plan: {memory.describe()}")
    if memory.fits or not cfg.check_memory:
        return memory
    options = "; ".join(memory.describe_options()) or "a larger GPU, or more GPUs"
    raise config_mod.ConfigError(f"this run would not fit the GPU: {memory.describe()}. Instead: {options}. "
                                 "--dry-run shows each peak by component; check_memory=false runs it anyway")


def resumed_launcher(cfg: FinetuneConfig, stages: list[Stage]) -> str | None:
    """For `deepspeed=auto` on --resume: "none" when the checkpoint to resume was saved without DeepSpeed
    (a DeepSpeed checkpoint has the global_step* folder that resuming under DeepSpeed requires); None, the
    plan's ZeRO-2, when it was saved with it or when there is nothing to resume."""
    for stage in stages:
        checkpoint = latest_checkpoint(stage_dir(cfg, stage))
        if checkpoint is not None and not is_complete(stage_dir(cfg, stage)):
            return None if any(checkpoint.glob("global_step*")) else "none"
    return None


def check_model_config(cfg: FinetuneConfig) -> None:
    """Settings the model cannot take, known from its config (cache, shipped copy or hub), so said before
    minutes of loading instead of after: dropout on `auto` targets that put LoRA on a MoE's fused experts
    (PEFT has no dropout there), sdpa_varlen on a model it was not checked on."""
    from finetune.config import SDPA_VARLEN
    from finetune.model import attention_implementation, check_attention
    from finetune.moe import is_moe
    from finetune.preflight import load_model_config

    expert_dropout = cfg.lora_dropout and cfg.lora_target_parameters == ["auto"]
    if not expert_dropout and attention_implementation(cfg) != SDPA_VARLEN:
        return
    model_config = load_model_config(cfg)[0]
    if expert_dropout and is_moe(model_config):
        config_mod.check_no_expert_dropout(
            cfg, f"{cfg.model_name} is a MoE whose fused experts get LoRA (lora_target_parameters=auto)")
    check_attention(model_config, cfg)


def read_run_data(cfg: FinetuneConfig, stages: list[Stage]) -> dict[str, list[dict]]:
    """{path: records} of every task file the stages will read, and the general-data files checked too:
    a bad record stops the run here, located, before any weights load (minutes per rank on the 30B
    model). Every rank reads (each needs the records), so all stop together without a collective."""
    paths = sorted({s.train_file for s in stages} | ({cfg.eval_file} if cfg.eval_file else set()))
    data = {path: load_records(path) for path in paths}
    for path in {cfg.rehearsal_data, cfg.general_eval_file} - {""}:
        load_general(path)
    return data


def check_best_metric_reported(cfg: FinetuneConfig, eval_file_records: list[dict]) -> None:
    """A best_metric or constraint that no evaluation will report (a misspelt source, a shape the eval set
    lacks) stops the run before the model loads: it would otherwise leave adapter/ at the last step."""
    from callbacks.generation_eval import reported_metrics
    from finetune.selection import unreported

    records = seeded_subset(seeded_subset(eval_file_records, cfg.eval_max_samples, cfg.seed),
                            cfg.gen_eval_max_samples, cfg.seed)  # the records the generation eval scores
    problems = unreported(cfg, {"eval_loss"} | (reported_metrics(records) if cfg.gen_eval else set()))
    if problems:
        raise config_mod.ConfigError(f"best_metric / best_metric_constraint: {problems[0]} (on {cfg.eval_file})")


def mlflow_logger(cfg, output_dir: Path, run_name: str, parent=None):
    """A logger whose own files (its offline spool) go to `output_dir` (a stage's folder), and whose default
    store (no mlflow_tracking_uri, no $MLFLOW_TRACKING_URI) is the run's one `cfg.output_dir/mlflow.db`:
    the parent run and every stage's run in the same store, so the stages nest under the parent. `parent`:
    the parent run's logger (its run may only be created by a replay, when the server was down at start)."""
    from callbacks.mlflow_logger import MLflowLoggerCallback

    return MLflowLoggerCallback(output_dir, tracking_uri=cfg.mlflow_tracking_uri or None,
                                experiment=cfg.mlflow_experiment, run_name=run_name,
                                parent=parent, require=cfg.mlflow_require,
                                store_dir=Path(cfg.output_dir))


def release(trainer) -> None:
    """Let go of a finished stage's optimizer state, wrappers and dataloaders; the caller collects.

    Two references outlive the trainer otherwise: the generation eval logs through it (a cycle), and
    DeepSpeed leaves its engine's forward hooks on the model, which the next stage trains again: the old
    engine (its ZeRO optimizer included) would stay alive and run its hooks in every later forward."""
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "trainer", None) is trainer:
            callback.trainer = None
    engine = getattr(trainer, "deepspeed", None)
    for hook in (getattr(engine, "module_forward_pre_hook", None), getattr(engine, "module_forward_post_hook", None)):
        if hook is not None:
            hook.remove()
    trainer.accelerator.free_memory()  # destroys the engine (its gradient hooks) and accelerate's references
    for param in trainer.model.parameters():  # what destroy() leaves: the offloaded optimizer and its mapping
        param.__dict__.pop("_zero_optimizer", None)
        param.__dict__.pop("_hp_mapping", None)


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


def _import_object(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise config_mod.ConfigError(f"extra_callbacks: cannot import '{dotted}': {e}") from None


def init_distributed(cfg: FinetuneConfig) -> None:
    """The process group, created here (before the trainer) so rank 0 can write shared files while the
    others wait. accelerate then keeps it as it is, so the timeout and the device are given here: NCCL's
    own 10-minute default would end the run while rank 0 tokenises a large set alone."""
    if world_size() <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs = {"timeout": datetime.timedelta(seconds=cfg.ddp_timeout)}
    if torch.cuda.is_available():
        from finetune.model import local_gpu

        device = torch.device("cuda", local_gpu())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU: no guessing, no hang
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _wait_for_rank_zero() -> None:
    """Other ranks wait while rank 0 writes shared files (tiny data, cleared folders)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
