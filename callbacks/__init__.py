"""Trainer callbacks shared by our trainer and Axolotl (as plugins): generation-based evaluation,
its error report, MLflow logging and the stall watchdog.

They build on `core` only (never on `finetune` or `data_tools`), since Axolotl's environment imports
this package.
"""
