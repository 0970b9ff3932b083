"""run_summary.json, the one format both stacks write (core/run_summary.py)."""

import json

import pytest

from core import run_summary
from core.errors import DataError

# a trainer's log: two logged steps, an evaluation and a generation eval at each of steps 2 and 4, the end
LOG = [
    {"loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": 0.5, "step": 2},
    {"eval_loss": 2.0, "eval_runtime": 1.0, "epoch": 0.5, "step": 2},
    {"gen_num_examples": 8, "gen_json_parse_rate": 0.5, "epoch": 0.5, "step": 2},
    {"loss": 1.5, "grad_norm": 0.8, "learning_rate": 5e-5, "epoch": 1.0, "step": 4},
    {"eval_loss": 1.2, "eval_runtime": 1.1, "epoch": 1.0, "step": 4},
    {"gen_num_examples": 8, "gen_json_parse_rate": 0.875, "epoch": 1.0, "step": 4},
    {"train_runtime": 12.0, "train_loss": 2.0, "total_flos": 1.0, "epoch": 1.0, "step": 4},
]


def test_build_takes_losses_and_the_last_evaluations_from_the_log():
    s = run_summary.build(backend="axolotl", model="tiny-moe", global_step=4, log_history=LOG, world_size=1)
    assert list(s)[:len(run_summary.SHARED_KEYS)] == list(run_summary.SHARED_KEYS)
    assert s["format"] == run_summary.FORMAT and s["world_size"] == 1
    assert s["train_losses"] == [(2, 2.5), (4, 1.5)]
    assert s["metrics"] == {"train_runtime": 12.0, "train_loss": 2.0, "total_flos": 1.0, "eval_loss": 1.2,
                            "eval_runtime": 1.1, "gen_num_examples": 8, "gen_json_parse_rate": 0.875}


def test_given_metrics_win_and_an_empty_log_gives_empty_lists():
    s = run_summary.build(backend="hf", model="m", global_step=0, log_history=[], metrics={"eval_loss": 3.0})
    assert s["train_losses"] == [] and s["metrics"] == {"eval_loss": 3.0}
    assert run_summary.final_metrics([]) == {}


def test_write_redacts_and_read_round_trips(tmp_path):
    path = tmp_path / "run" / "run_summary.json"
    path.parent.mkdir()
    s = run_summary.build(backend="hf", model="m", global_step=4, log_history=LOG,
                          mlflow_tracking_uri="http://user:s3cret-pw@127.0.0.1:5000")
    run_summary.write(path, s)
    assert "s3cret-pw" not in path.read_text()
    back = run_summary.read(path)
    assert back["train_losses"] == [[2, 2.5], [4, 1.5]] and back["metrics"] == json.loads(json.dumps(s["metrics"]))
    assert [p.name for p in path.parent.iterdir()] == ["run_summary.json"]  # nothing left aside


@pytest.mark.parametrize("content, problem", [
    ('{"backend": "axolotl", "global_step": 4, "log_history": []}', "missing format, model, train_losses, metrics"),
    ("[1, 2]", "missing format"),
    ("{not json", "not valid JSON: line 1"),
])
def test_read_says_what_is_wrong_with_a_file(tmp_path, content, problem):
    path = tmp_path / "run_summary.json"
    path.write_text(content)
    with pytest.raises(DataError, match="run_summary.json") as e:
        run_summary.read(path)
    assert problem in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        run_summary.read(tmp_path / "nope.json")
