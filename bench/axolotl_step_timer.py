"""Axolotl plugin that adds bench/step_timer.py's StepTimer (bench/train_throughput.py)."""

from axolotl.integrations.base import BasePlugin

from bench.step_timer import StepTimer


class StepTimerPlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [StepTimer()]
