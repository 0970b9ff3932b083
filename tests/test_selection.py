"""The best-step rule (finetune/selection.py), its settings, and the callback's bookkeeping around it
(finetune/best.py): what it keeps per evaluation and what a resumed run restores. The real trainer,
torchrun and two stages are exercised end to end in tests/test_trainer.py."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.metrics import lower_is_better
from finetune.config import ConfigError, resolve
from finetune.selection import Constraint, choose, describe, improves, parse_constraint


def row(step, value, met=True, constraints=None):
    return {"step": step, "value": value, "constraints": constraints or {}, "met": met}


@pytest.mark.parametrize("text, expected", [
    ("gen_negative_hallucination_rate<=0.02", Constraint("gen_negative_hallucination_rate", "<=", 0.02)),
    ("  gen_json_parse_rate >= .99 ", Constraint("gen_json_parse_rate", ">=", 0.99)),
    ("eval_loss<2e-1", Constraint("eval_loss", "<", 0.2)),
    ("gen_offender_name_set_f1/positive>0", Constraint("gen_offender_name_set_f1/positive", ">", 0.0)),
])
def test_constraints_parse(text, expected):
    assert parse_constraint(text) == expected


@pytest.mark.parametrize("text, message", [
    ("gen_json_parse_rate", "is not METRIC<=NUMBER"),
    ("gen_json_parse_rate==1", "is not METRIC<=NUMBER"),
    ("gen_json_parse_rate<=high", "is not METRIC<=NUMBER"),
    ("gen_halucination_rate<=0.02", "is not a metric this trainer reports"),
])
def test_bad_constraints_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_constraint(text)


def test_constraint_holds_and_nan_never_does():
    c = parse_constraint("gen_negative_hallucination_rate<=0.02")
    assert c.holds({"gen_negative_hallucination_rate": 0.02})
    assert not c.holds({"gen_negative_hallucination_rate": 0.03})
    assert not c.holds({"gen_negative_hallucination_rate": math.nan})


def test_direction_of_each_metric():
    assert not lower_is_better("gen_offender_name_set_f1") and not lower_is_better("gen_json_parse_rate/positive")
    assert lower_is_better("gen_negative_hallucination_rate") and lower_is_better("eval_loss")
    assert lower_is_better("gen_error_rate/missed_offender") and not lower_is_better("gen_error_rate/correct")


def test_the_constraint_excludes_the_highest_value():
    evaluations = [row(200, 0.70), row(400, 0.90, met=False), row(600, 0.80)]
    assert choose(evaluations, lower=False)["step"] == 600


def test_a_tie_goes_to_the_later_step_and_nan_never_wins():
    assert choose([row(1, 0.5), row(2, 0.5), row(3, math.nan)], lower=False)["step"] == 2
    assert choose([row(1, 0.3), row(2, 0.2), row(3, 0.2), row(4, 0.4)], lower=True)["step"] == 3
    assert improves(0.1, None, lower=True) and not improves(math.nan, None, lower=False)


def test_nothing_qualifies():
    assert choose([row(1, 0.9, met=False)], lower=False) is None and choose([], lower=False) is None


def test_describe_says_which_step_and_why():
    best = {"metric": "gen_offender_name_set_f1", "lower_is_better": False,
            "constraints": ["gen_negative_hallucination_rate<=0.02"], "step": 200, "value": 0.8125,
            "last_step": 375, "last_value": 0.79, "adapter_step": 200,
            "evaluations": [row(200, 0.8125, constraints={"gen_negative_hallucination_rate<=0.02": 0.01}),
                            row(375, 0.79, met=False, constraints={"gen_negative_hallucination_rate<=0.02": 0.05})]}
    assert describe(best) == ("adapter/ = step 200, highest gen_offender_name_set_f1 where "
                              "gen_negative_hallucination_rate<=0.02: 0.8125 (gen_negative_hallucination_rate "
                              "0.0100); adapter_last/ = step 375 (0.7900)")
    none_met = {**best, "step": None, "value": None, "adapter_step": 375}
    assert describe(none_met) == ("adapter/ = the last step, 375 (no evaluation met "
                                  "gen_negative_hallucination_rate<=0.02); adapter_last/ = the same")
    assert "no evaluation reported gen_offender_name_set_f1" in describe({**none_met, "evaluations": []})


@pytest.mark.parametrize("overrides, message", [
    ({"best_metric": "gen_name_set_f1"}, "'gen_name_set_f1' is not a metric this trainer reports; did you mean "
                                         "'gen_offender_name_set_f1'"),
    ({"best_metric": "", "best_metric_constraint": "eval_loss<1"}, "needs a best_metric to choose by"),
    ({"best_metric_constraint": "gen_json_parse_rate=1"}, "is not METRIC<=NUMBER"),
    ({"gen_eval": "false", "best_metric_constraint": "gen_json_parse_rate>=0.9"}, "gen_eval is false"),
    ({"eval_file": "", "best_metric_constraint": "eval_loss<1"}, "needs evaluations"),
])
def test_bad_settings_stop_before_anything_loads(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        resolve("single", "tiny", None, overrides, {})


def test_several_constraints_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve("single", "tiny", None, {"best_metric_constraint":
                                           "gen_negative_hallucination_rate<=0.02,gen_json_parse_rate>=0.99"}, {})
    assert [str(parse_constraint(c)) for c in cfg.best_metric_constraint] == [
        "gen_negative_hallucination_rate<=0.02", "gen_json_parse_rate>=0.99"]


class SavingTrainer:
    """What the callback asks of the trainer: save the adapter and the tokenizer into a folder."""

    def __init__(self):
        self.step = 0
        self.processing_class = SimpleNamespace(save_pretrained=lambda folder: None)

    def save_model(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "weights_of_step").write_text(str(self.step))


def log(callback, trainer, step, **logs):
    trainer.step = step
    callback.on_log(None, SimpleNamespace(global_step=step, is_world_process_zero=True), None, logs=logs)


def callback(out, resume_step=None, constraints=("gen_negative_hallucination_rate<=0.05",)):
    from finetune.best import BestAdapterCallback

    cb = BestAdapterCallback("gen_offender_name_set_f1", [parse_constraint(c) for c in constraints], out,
                             resume_step=resume_step)
    cb.trainer = SavingTrainer()
    return cb


def held_step(out: Path) -> int:
    return int((out / "adapter_best" / "weights_of_step").read_text())


def test_each_evaluation_is_judged_once_with_metrics_from_separate_logs(tmp_path):
    cb = callback(tmp_path)
    log(cb, cb.trainer, 2, loss=1.0)  # a training log: nothing to judge
    log(cb, cb.trainer, 2, eval_loss=0.9, gen_offender_name_set_f1=0.5)
    assert cb.evaluations == []  # the constraint's metric has not arrived yet
    log(cb, cb.trainer, 2, gen_negative_hallucination_rate=0.0)
    log(cb, cb.trainer, 2, gen_offender_name_set_f1=0.1, gen_negative_hallucination_rate=0.0)  # judged already
    log(cb, cb.trainer, 4, gen_offender_name_set_f1=0.9, gen_negative_hallucination_rate=0.2)  # fails it
    log(cb, cb.trainer, 6, gen_offender_name_set_f1=0.7, gen_negative_hallucination_rate=0.01)
    log(cb, cb.trainer, 8, gen_offender_name_set_f1=0.6, gen_negative_hallucination_rate=0.0)
    assert [(e["step"], e["met"]) for e in cb.evaluations] == [(2, True), (4, False), (6, True), (8, True)]
    assert cb.best["step"] == 6 and held_step(tmp_path) == 6
    assert json.loads((tmp_path / "adapter_best" / "selection.json").read_text()) == cb.best
    cb.trainer.step = 9
    summary = cb.finish(9)
    assert int((tmp_path / "adapter" / "weights_of_step").read_text()) == 6
    assert int((tmp_path / "adapter_last" / "weights_of_step").read_text()) == 9
    assert json.loads((tmp_path / "adapter" / "selection.json").read_text())["step"] == 6  # says which step
    assert not (tmp_path / "adapter_best").exists()
    assert summary["step"] == summary["adapter_step"] == 6 and summary["last_value"] is None

    # killed after that, before the stage was marked complete: --resume from the last checkpoint keeps step 6
    again = callback(tmp_path, resume_step=9)
    assert again.best == cb.best and held_step(tmp_path) == 6 and not (tmp_path / "adapter").exists()
    again.trainer.step = 9
    assert again.finish(9)["adapter_step"] == 6
    assert (tmp_path / "adapter" / "weights_of_step").read_text() == "6"


def test_when_nothing_qualifies_adapter_is_the_last_step(tmp_path):
    cb = callback(tmp_path)
    log(cb, cb.trainer, 2, gen_offender_name_set_f1=0.9, gen_negative_hallucination_rate=0.5)
    summary = cb.finish(2)
    assert summary["step"] is None and summary["adapter_step"] == 2
    assert (tmp_path / "adapter" / "weights_of_step").read_text() == "2"


def test_resume_keeps_what_was_chosen_up_to_its_checkpoint(tmp_path):
    first = callback(tmp_path)
    for step, f1 in ((2, 0.4), (4, 0.6)):
        log(first, first.trainer, step, gen_offender_name_set_f1=f1, gen_negative_hallucination_rate=0.0)
    resumed = callback(tmp_path, resume_step=4)  # killed after checkpoint-4
    assert resumed.best["step"] == 4 and [e["step"] for e in resumed.evaluations] == [2, 4]
    log(resumed, resumed.trainer, 6, gen_offender_name_set_f1=0.5, gen_negative_hallucination_rate=0.0)
    assert resumed.best["step"] == 4 and held_step(tmp_path) == 4

    # the step held was evaluated after the checkpoint resumed from: it is dropped and judged again
    later = callback(tmp_path, resume_step=2)
    assert later.best is None and later.evaluations == [] and not (tmp_path / "adapter_best").exists()
    assert not (tmp_path / "best.json").exists()

    # other settings than the interrupted run's: start over
    log(resumed, resumed.trainer, 8, gen_offender_name_set_f1=0.9, gen_negative_hallucination_rate=0.0)
    other = callback(tmp_path, resume_step=8, constraints=())
    assert other.best is None and other.evaluations == []

    # a fresh run (no --resume) in a folder with an old choice starts clean
    old = callback(tmp_path)
    log(old, old.trainer, 2, gen_offender_name_set_f1=0.1, gen_negative_hallucination_rate=0.0)
    assert held_step(tmp_path) == 2
    fresh = callback(tmp_path)
    assert fresh.best is None and not (tmp_path / "adapter_best").exists()


def test_a_metric_the_eval_set_cannot_report_stops_the_run_before_the_model_loads(tmp_path, monkeypatch):
    """A `/part` suffix is checked against what the evaluations will report on this eval set: a misspelt
    source, or a shape the set lacks, would otherwise leave adapter/ at the last step without a word."""
    from callbacks.generation_eval import reported_metrics
    from data_tools.synth import generate
    from finetune.checks import check_best_metric_reported

    records = [{**r, "source": kind} for kind in ("positive", "negative") for r in generate(0, "val", kind, 6)]
    reported = reported_metrics(records)
    shape = records[0]["shape"]
    assert {"gen_offender_name_set_f1/positive", f"gen_json_parse_rate/shape/{shape}",
            "gen_error_rate/missed_offender", "gen_negative_hallucination_rate"} <= reported
    monkeypatch.chdir(tmp_path)
    good = resolve("single", "tiny", None, {"best_metric": "gen_offender_name_set_f1/positive",
                                            "best_metric_constraint": f"gen_json_parse_rate/shape/{shape}>=0.5"}, {})
    check_best_metric_reported(good, records)
    typo = resolve("single", "tiny", None, {"best_metric": "gen_offender_name_set_f1/positve"}, {})
    with pytest.raises(ConfigError, match="'gen_offender_name_set_f1/positve' is not among the metrics this run's "
                                          "evaluations report; did you mean 'gen_offender_name_set_f1/positive'"):
        check_best_metric_reported(typo, records)
    only_positives = resolve("single", "tiny", None, {"best_metric_constraint":
                                                      "gen_negative_hallucination_rate<=0.02"}, {})
    with pytest.raises(ConfigError, match="gen_negative_hallucination_rate"):  # no negative to hallucinate on
        check_best_metric_reported(only_positives, records[:6])
    no_gen = resolve("single", "tiny", None, {"gen_eval": "false", "best_metric": "eval_loss"}, {})
    check_best_metric_reported(no_gen, records)
