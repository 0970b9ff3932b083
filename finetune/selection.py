"""Which evaluated step of a stage is the best: the rule behind `best_metric` and
`best_metric_constraint`, pure (config validation checks the settings without
importing transformers; finetune/best.py keeps the chosen step's adapter).

A step qualifies when it meets every constraint; among those the best value of
the metric wins (higher is better, lower for the rates of a failure and
eval_loss: core.metrics.lower_is_better). A tie goes to the later step:
as good, and trained longer.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass

from core.metrics import METRIC_NAMES, is_known_metric, lower_is_better

OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_CONSTRAINT = re.compile(r"\s*([\w/.-]+?)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\Z")


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    bound: float

    def holds(self, metrics: dict) -> bool:
        value = metrics[self.metric]
        return not _is_nan(value) and OPERATORS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_constraint(text: str) -> Constraint:
    """'gen_negative_hallucination_rate<=0.02' -> Constraint; ValueError says what is wrong."""
    match = _CONSTRAINT.match(text)
    if not match:
        raise ValueError(f"'{text}' is not METRIC<=NUMBER (or >=, <, >), e.g. "
                         "gen_negative_hallucination_rate<=0.02")
    metric, op, bound = match.groups()
    check_metric(metric)
    return Constraint(metric, op, float(bound))


def check_metric(name: str) -> None:
    if not is_known_metric(name):
        close = difflib.get_close_matches(name.split("/")[0], METRIC_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"'{name}' is not a metric this trainer reports; {hint}(valid: {', '.join(METRIC_NAMES)}; "
                         "a '/part' suffix selects a source, shape, field or error category, e.g. "
                         "gen_offender_name_set_f1/positive)")


def _is_nan(value) -> bool:
    return not isinstance(value, (int, float)) or math.isnan(value)


def improves(value: float, best: float | None, lower: bool) -> bool:
    """Ties improve: the later of two equal steps wins."""
    if _is_nan(value):
        return False
    return best is None or (value <= best if lower else value >= best)


def choose(evaluations: list[dict], lower: bool) -> dict | None:
    """The evaluation `BestAdapterCallback` keeps: the best value among those that met every constraint."""
    best = None
    for row in evaluations:
        if row["met"] and improves(row["value"], best["value"] if best else None, lower):
            best = row
    return best


def selects_best(cfg) -> bool:
    """Whether a run keeps its best evaluated step as adapter/: it has evaluations that report best_metric
    (the default, a generation metric, needs gen_eval). `cfg`: a FinetuneConfig."""
    return bool(cfg.best_metric and cfg.eval_file and (cfg.gen_eval or not cfg.best_metric.startswith("gen_")))


def unreported(cfg, reported: set[str]) -> list[str]:
    """One message per metric of best_metric / best_metric_constraint that no evaluation of this run
    will report (`reported`: the names the evaluations give), e.g. a source or shape the eval set lacks."""
    names = [cfg.best_metric, *(parse_constraint(c).metric for c in cfg.best_metric_constraint)]
    out = []
    for name in dict.fromkeys(names):
        if name not in reported:
            close = difflib.get_close_matches(name, sorted(reported), n=1, cutoff=0.6)
            out.append(f"'{name}' is not among the metrics this run's evaluations report"
                       + (f"; did you mean '{close[0]}'?" if close else ""))
    return out


def describe_plan(cfg) -> str:
    """What adapter/ will hold, said before training (start of a run, --dry-run)."""
    if not selects_best(cfg):
        why = ("best_metric is empty" if not cfg.best_metric else "no eval_file" if not cfg.eval_file
               else f"gen_eval is off, so nothing reports {cfg.best_metric}")
        return f"adapter/ = the last step ({why})"
    rule = f"{'lowest' if lower_is_better(cfg.best_metric) else 'highest'} {cfg.best_metric}"
    if cfg.best_metric_constraint:
        rule += f" where {' and '.join(str(parse_constraint(c)) for c in cfg.best_metric_constraint)}"
    return (f"adapter/ = the evaluated step (every {cfg.eval_steps} steps and the last) with the {rule}; "
            "adapter_last/ = the last step")


def describe(best: dict) -> str:
    """One line for the printed summary: which step `adapter/` holds, and why."""
    last_step, constraints = best["last_step"], best["constraints"]
    if best["step"] is None:
        why = (f"no evaluation met {' and '.join(constraints)}" if best["evaluations"]
               else f"no evaluation reported {best['metric']}")
        return f"adapter/ = the last step, {last_step} ({why}); adapter_last/ = the same"
    rule = f"{'lowest' if best['lower_is_better'] else 'highest'} {best['metric']}"
    if constraints:
        rule += f" where {' and '.join(constraints)}"
    held = next(e for e in best["evaluations"] if e["step"] == best["step"])
    text = f"adapter/ = step {best['step']}, {rule}: {best['value']:.4f}"
    if held["constraints"]:
        text += " (" + ", ".join(f"{parse_constraint(c).metric} {v:.4f}" for c, v in held["constraints"].items()) + ")"
    text += f"; adapter_last/ = step {last_step}"
    if last_step != best["step"] and best["last_value"] is not None:
        text += f" ({best['last_value']:.4f})"
    return text
