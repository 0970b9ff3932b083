"""The README's first command extracts: the tiny preset's `single` run (the MoE, Unsloth backend on auto,
generation eval on, micro-batch 8) reads names it has never seen out of the validation articles, and the
same run with the article cut from the prompt fails the same gate.

Bars measured on the shipped tiny models (2 cores, tiny preset, 100 validation records with held-out
names, half negative); see the README's figures. The margins absorb CPU differences.
"""

import pytest

from bench.results import newest_section
from parity_tools.compare import DEFAULT_TOLERANCES
from test_trainer import ok, summary, train

NAME_F1_BAR = 0.85
EXACT_MATCH_BAR = 0.70
HALLUCINATION_BAR = 0.02


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    ok(train("--mode", "single", "--preset", "tiny", "output_dir=out", cwd=cwd, timeout=900))
    return summary(cwd / "out")


def test_the_first_command_reads_held_out_names_out_of_the_article(demo_run):
    m = demo_run["metrics"]
    assert demo_run["model"] == "tiny-moe" and demo_run["backend"] == "unsloth" and m["gen_num_examples"] == 100
    assert m["gen_json_parse_rate"] >= 0.98, m
    assert m["gen_offender_name_set_f1"] >= NAME_F1_BAR, m
    assert m["gen_all_fields_exact_match_rate"] >= EXACT_MATCH_BAR, m
    assert m["gen_negative_hallucination_rate"] <= HALLUCINATION_BAR, m


def test_the_first_command_reproduces_the_figures_the_readme_quotes(demo_run):
    # The README's demo table is bench/RESULTS.md's newest "demo runs" section (bench.readme_figures checks
    # the README against it); the run here must give those figures again. Measured twice on this machine:
    # identical. 0.02 = two answers in 100 for another CPU's rounding.
    recorded = newest_section("demo runs").tables[0]
    columns = ("parse", "presence F1", "name-set F1", "exact", "hallucination", "truncation")
    for column, metric in zip(columns, DEFAULT_TOLERANCES, strict=True):
        want = float(recorded.cell("tiny-moe", column))
        assert demo_run["metrics"][metric] == pytest.approx(want, abs=0.02), (metric, demo_run["metrics"])


def test_a_run_that_cannot_see_the_article_fails_the_name_gate(tmp_path, demo_run):
    # The prompt builder drops the article (tests/trainer_hooks.py): the answer format and `[]` for
    # negatives can still be learnt, the names cannot.
    # 150 steps, one evaluation at the end: the format is learnt by step 100 (measured: parse 1.0 there).
    ok(train("--mode", "single", "--preset", "tiny", "output_dir=out", "max_steps=150", "eval_steps=150",
             "extra_callbacks=trainer_hooks.ArticleCutFromPrompt", cwd=tmp_path, timeout=900))
    m = summary(tmp_path / "out")["metrics"]
    assert m["gen_json_parse_rate"] >= 0.9, m  # it did train: the format is there
    assert m["gen_offender_name_set_f1"] < 0.3 < NAME_F1_BAR, m
    assert m["gen_all_fields_exact_match_rate"] < EXACT_MATCH_BAR, m
