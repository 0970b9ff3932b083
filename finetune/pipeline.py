"""The fine-tuning job, top to bottom: config -> checks -> model + LoRA -> stages -> summary.

`qwen_finetune.py` and `qwen_finetune_legacy.py` are thin command lines over
`Recipe(cfg).run()`; the legacy one only differs by its frozen defaults. From
the command line to `trainer.train()`: `Recipe.run` -> `prepare` (every check
before a weight loads) -> `setup` (model + LoRA) -> `train_stages` ->
`train_stage` (the stage's data, callbacks, trainer, training, finish).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path

from core import run_summary
from core.distributed import is_local_zero, is_rank_zero, world_size
from core.distributed import nodes as node_count
from core.runinfo import library_versions
from data_tools.tiny_data import ensure_tiny_data
from finetune import config as config_mod
from finetune import run_plan
from finetune.checks import check_best_metric_reported, check_memory, check_model_config, read_run_data
from finetune.config_schema import FinetuneConfig
from finetune.data import StageInputs, stage_inputs
from finetune.forgetting import measure_forgetting
from finetune.moe import expert_lora_path, router_aux_loss_setting, use_experts_implementation
from finetune.moe import describe as describe_aux_loss
from finetune.nodes import (check_shared_output, describe_launch, empty_cuda_cache, init_distributed,
                            launch_table, record_launch, wait_for_rank_zero)
from finetune.report import adapter_step, print_summary, say
from finetune.selection import describe_plan, selects_best
from finetune.stage_callbacks import StageCallbacks, mlflow_logger, release, stage_callbacks
from finetune.stages import (MARKER, Stage, aux_losses, distill_losses, is_complete, latest_checkpoint,
                             plan_stage_dirs, sft_trainer, stage_dir, stages_for)


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
        cfg = self.cfg
        files = config_mod.data_files(cfg)
        say("resolved configuration:\n" + config_mod.describe(cfg))
        init_distributed(cfg)
        if cfg.preset == "tiny" and is_local_zero():  # per node: its own disk may not be shared
            ensure_tiny_data(files)
        wait_for_rank_zero()
        if dry_run:
            from finetune.preflight import preflight

            return preflight(cfg, world or world_size(), nodes if world else node_count())
        stages = stages_for(cfg)
        if not self.prepare(stages):
            return 0
        self.setup()
        self.train_stages(stages)
        return 0

    def prepare(self, stages: list[Stage]) -> bool:
        """Everything checked before any weight loads: the launch, the memory plan, the stage folders, the
        records, the model's config. False when every stage is already complete."""
        cfg = self.cfg
        check_shared_output(cfg.output_dir)
        self.launch = launch_table()
        if self.launch["world_size"] > 1:
            say(describe_launch(self.launch))
        self.plan, model_config = run_plan.decide_here(cfg)
        self.memory = check_memory(cfg, self.plan, stages, self.resume)
        self.plan = self.plan.with_launcher(config_mod.deepspeed_file(cfg))  # deepspeed=auto: the memory plan's
        say(f"run plan: {self.plan.describe()}")
        plan_stage_dirs(cfg, stages, self.resume, self.overwrite)
        wait_for_rank_zero()
        todo = [s for s in stages if not is_complete(stage_dir(cfg, s))]
        if not todo:
            say(f"every stage in {cfg.output_dir} is already complete; nothing to do "
                "(pass --overwrite to train again)")
            print_summary(cfg, [json.loads((stage_dir(cfg, s) / "run_summary.json").read_text()) for s in stages])
            return False
        say(describe_plan(cfg))
        with self.timer("data_check"):
            self.data = read_run_data(cfg, todo)
            if selects_best(cfg):
                check_best_metric_reported(cfg, self.data[cfg.eval_file])
        check_model_config(cfg, model_config, self.plan.attention)
        if cfg.mlflow and cfg.mlflow_require and is_rank_zero():
            mlflow_logger(cfg, Path(cfg.output_dir), "check").check()
        return True

    def train_stages(self, stages: list[Stage]) -> None:
        """Each stage not yet complete, in order, each continuing the adapter the one before kept; then the
        summary. Two-stage with MLflow: the stages are nested runs under one parent."""
        cfg = self.cfg
        parent = None
        if cfg.mlflow and len(stages) > 1:
            parent = mlflow_logger(cfg, Path(cfg.output_dir), cfg.mlflow_run_name or Path(cfg.output_dir).name)
            parent.start({"config": config_mod.to_dict(cfg), "backend": self.backend, "libraries": self.libraries})
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
            empty_cuda_cache()
            # The model in memory carries the last step's adapter; the next stage continues the chosen one
            previous = out if selects_best(cfg) else None
        if parent is not None:
            parent.end()
        print_summary(cfg, summaries, parent.spool_counts() if parent is not None else None)

    def setup(self) -> None:
        """The backend, the base model and its LoRA: what every stage trains."""
        cfg, timer = self.cfg, self.timer
        with timer("imports"):
            from finetune.model import add_lora, load_base

            import transformers
            import trl  # noqa: F401

            if self.plan.backend == "hf":
                from finetune import trl_cpu

                if trl_cpu.install_if_needed():
                    say("no GPU: TRL's Triton loss kernel replaced by its torch equivalent (finetune/trl_cpu.py)")

            import callbacks.generation_eval  # noqa: F401
            from finetune.lora import check_trainable, plan_targets
            from finetune.quant_experts import describe_storage, storage_by_category
        transformers.set_seed(cfg.seed)
        backend = self.plan.backend
        say(f"backend: {backend} ({self.plan.backend_why})")
        with timer("model_load"):
            model, tokenizer = load_base(cfg, self.plan)
            experts = use_experts_implementation(model, cfg.experts_implementation, self.plan.gpu)
        with timer("lora"):
            targets = plan_targets(model, cfg)
            model = add_lora(model, cfg, backend, targets)
            params = check_trainable(model, targets)
        say(f"LoRA targets: modules {targets.modules}, parameters {targets.parameters}, router "
            f"{'trained' if targets.router else 'frozen'}; trainable {params['trainable']:,} of "
            f"{params['total']:,} ({params['trainable_by_category']})")
        storage = storage_by_category(model)
        say(f"weight storage: {describe_storage(storage)}")
        aux = router_aux_loss_setting(cfg, model.config)
        # what the model runs: a backend may choose otherwise (Unsloth falls back to sdpa where flash-attn
        # cannot run), and the run summary records this one
        self.plan, differences = run_plan.confirm(self.plan, model, experts)
        for difference in differences:
            say(difference)
        model_info = {"router_aux_loss": aux, "weight_storage": storage, "experts_implementation": experts,
                      "attn_implementation": self.plan.attention, "expert_lora": expert_lora_path(model)}
        if aux["moe"]:
            say(f"MoE router {describe_aux_loss(aux)}")
            say(f"MoE experts run as {experts} (experts_implementation={cfg.experts_implementation}); "
                f"expert LoRA: {model_info['expert_lora']}")
        self.backend, self.model, self.tokenizer = backend, model, tokenizer
        self.targets, self.params, self.model_info = targets, params, model_info
        self.libraries = library_versions()

    def train_stage(self, stage: Stage, parent_logger=None) -> dict:
        """One stage: its finished datasets, its trainer and callbacks, training, then (rank 0) the adapter,
        config.yaml, run_summary.json and COMPLETE."""
        cfg, timer = self.cfg, self.timer
        out = stage_dir(cfg, stage)
        inputs = stage_inputs(cfg, stage, self.data, self.tokenizer, timer)
        checkpoint = latest_checkpoint(out) if self.resume else None
        hooks = stage_callbacks(cfg, stage.name, out, inputs.eval_records, checkpoint,
                                self.tracker_params(stage, inputs) if cfg.mlflow else {}, parent_logger)
        with timer(f"{stage.name}.build_trainer"):
            trainer = sft_trainer(cfg, stage, out, self.plan, self.model, self.tokenizer, inputs.rows, hooks.all)
        hooks.attach(trainer, self.model_info["router_aux_loss"]["coef"])
        if checkpoint:
            say(f"{stage.name}: resuming from {checkpoint}")
        record_launch(out, self.launch)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_s = time.perf_counter() - start
        self.time_watchdog_phases(stage, hooks.watchdog)
        metrics = self.final_metrics(stage, trainer, result, inputs, hooks.gen_eval)
        summary = self.stage_summary(stage, trainer, metrics, inputs, hooks, train_s)
        if trainer.is_world_process_zero():
            self.finish_stage(stage, out, trainer, summary, metrics, hooks)
        trainer.accelerator.wait_for_everyone()
        release(trainer)
        return summary

    def tracker_params(self, stage: Stage, inputs: StageInputs) -> dict:
        """What a stage's MLflow run records as parameters."""
        return {"config": config_mod.to_dict(self.cfg), "stage": stage.name, "backend": self.backend,
                "data": inputs.identity, "packing": inputs.rows.report(), "libraries": self.libraries,
                "trainable_parameters": self.params["trainable_by_category"], "launch": self.launch}

    def time_watchdog_phases(self, stage: Stage, watchdog) -> None:
        """The first optimizer step and the pauses (evaluations, saves) the watchdog timed, in the phase times."""
        if watchdog.first_step_s is not None:
            self.timer.seconds[f"{stage.name}.first_optimizer_step"] = round(watchdog.first_step_s, 2)
            say(f"[time] {stage.name}.first_optimizer_step: {watchdog.first_step_s:.1f}s")
        for kind, (count, seconds) in watchdog.pause_totals().items():
            if count:
                self.timer.seconds[f"{stage.name}.{kind}"] = seconds
                say(f"[time] {stage.name}.{kind}: {seconds:.1f}s ({count})")

    def final_metrics(self, stage: Stage, trainer, result, inputs: StageInputs, gen_eval) -> dict:
        """Training's metrics, the last evaluation's, the last generation eval's and the forgetting measure."""
        metrics = dict(result.metrics)
        if inputs.eval_records:
            # The scheduled evaluation may already have run at the last step (eval_steps divides it):
            # on a 30B model a second pass costs minutes.
            step = trainer.state.global_step
            last = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == step]
            metrics.update({k: v for k, v in last[-1].items() if k.startswith("eval_")} if last else trainer.evaluate())
        if gen_eval is not None and gen_eval.history:
            metrics.update({k: v for k, v in gen_eval.history[-1].items() if k != "step"})
        general = inputs.general
        if general is not None and general.heldout and trainer.is_world_process_zero():
            with self.timer(f"{stage.name}.forgetting_measure"):
                metrics.update(measure_forgetting(self.model, self.tokenizer, general.heldout_kind, general.heldout,
                                                  self.cfg.max_length, self.cfg.eval_batch_size))
        return metrics

    def stage_summary(self, stage: Stage, trainer, metrics: dict, inputs: StageInputs, hooks: StageCallbacks,
                      train_s: float) -> dict:
        cfg, targets, model_info, log = self.cfg, self.targets, self.model_info, trainer.state.log_history
        return run_summary.build(
            backend=self.backend, model=cfg.model_name, global_step=trainer.state.global_step, log_history=log,
            metrics=metrics, stage=stage.name, mode=cfg.mode, train_seconds=round(train_s, 1),
            distill_losses=distill_losses(log),
            router_aux_loss={**model_info["router_aux_loss"], "aux_losses": aux_losses(log)},
            weight_storage_bytes=model_info["weight_storage"], phase_seconds=dict(self.timer.seconds),
            trainable_parameters=self.params,
            lora_targets={"modules": targets.modules, "parameters": targets.parameters, "matches": targets.matches,
                          "router_trained": targets.router, "expert_rank": targets.expert_rank},
            data=inputs.identity, packing=inputs.rows.report(),
            mlflow_run_id=hooks.tracker.run_id if hooks.tracker else None,
            world_size=world_size(), launch=self.launch, watchdog_dumps=hooks.watchdog.dumps,
            attn_implementation=model_info["attn_implementation"],
            experts_implementation=model_info["experts_implementation"], expert_lora=model_info["expert_lora"],
            memory_plan=self.memory.report() if self.memory else None, libraries=self.libraries,
            run_plan=self.plan.report(),
            ddp_find_unused_parameters=trainer.args.ddp_find_unused_parameters, python=sys.version.split()[0])

    def finish_stage(self, stage: Stage, out: Path, trainer, summary: dict, metrics: dict,
                     hooks: StageCallbacks) -> None:
        """Rank 0: the adapter (the chosen step's, or the last), config.yaml, run_summary.json, the MLflow
        run's end, and last the COMPLETE marker."""
        import yaml

        if hooks.best is not None:
            summary["best"] = hooks.best.finish(trainer.state.global_step)
        else:
            trainer.save_model(str(out / "adapter"))
            self.tokenizer.save_pretrained(str(out / "adapter"))
        (out / "config.yaml").write_text(yaml.safe_dump(config_mod.to_dict(self.cfg), sort_keys=False,
                                                        allow_unicode=True), encoding="utf-8")
        run_summary.write(out / "run_summary.json", summary)
        tracker = hooks.tracker
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
