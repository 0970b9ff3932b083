"""A stage's trainer callbacks, built in one place (the test hooks of `extra_callbacks`, the generation
eval, the best-step keeper, the MLflow logger, the stall watchdog, in that order), and the trainer's
release when the stage is done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune import config as config_mod
from finetune.config_schema import FinetuneConfig
from finetune.moe import TaskLossCallback
from finetune.selection import selects_best
from finetune.stages import checkpoint_step


@dataclass
class StageCallbacks:
    extra: list
    gen_eval: object = None
    best: object = None
    tracker: object = None
    watchdog: object = None

    @property
    def all(self) -> list:
        """In the trainer's order; the watchdog last, so its pause over an evaluation covers every other
        callback's evaluation work."""
        return [*self.extra, *(c for c in (self.gen_eval, self.best, self.tracker) if c is not None),
                self.watchdog]

    def attach(self, trainer, aux_loss_coef: float) -> None:
        """Those that evaluate or save through the trainer get it. The task-loss logger goes first of all,
        before transformers' report_to loggers: they all see loss_task next to aux_loss."""
        for callback in (self.gen_eval, self.best):
            if callback is not None:
                callback.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, TaskLossCallback(aux_loss_coef))


def stage_callbacks(cfg: FinetuneConfig, stage_name: str, out: Path, eval_records: list[dict],
                    checkpoint: Path | None, tracker_params: dict, parent_logger=None) -> StageCallbacks:
    """`checkpoint`: the one this stage resumes from (the best-step keeper picks up its record there);
    `tracker_params`: what the MLflow run records as parameters."""
    from callbacks.generation_eval import GenerationEvalCallback
    from callbacks.watchdog import StallWatchdog

    hooks = StageCallbacks([_import_object(path)() for path in cfg.extra_callbacks])
    if cfg.gen_eval and eval_records:
        hooks.gen_eval = GenerationEvalCallback(eval_records, batch_size=cfg.gen_eval_batch_size,
                                                max_samples=cfg.gen_eval_max_samples, seed=cfg.seed, output_dir=out)
    if selects_best(cfg):
        from finetune.best import BestAdapterCallback
        from finetune.selection import parse_constraint

        hooks.best = BestAdapterCallback(cfg.best_metric, [parse_constraint(c) for c in cfg.best_metric_constraint],
                                         out, resume_step=checkpoint_step(checkpoint) if checkpoint else None)
    if cfg.mlflow:
        run_name = stage_name if parent_logger else (cfg.mlflow_run_name or Path(cfg.output_dir).name)
        hooks.tracker = mlflow_logger(cfg, out, run_name, parent_logger)
        hooks.tracker.params = tracker_params
    hooks.watchdog = StallWatchdog(cfg.watchdog_first_step_s, cfg.watchdog_step_s, log_dir=out,
                                   pause_timeout_s=cfg.watchdog_pause_s)
    return hooks


def _import_object(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise config_mod.ConfigError(f"extra_callbacks: cannot import '{dotted}': {e}") from None


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
