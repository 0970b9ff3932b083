"""The parity harness: token parity, compare's verdicts, and the two pairs end to end."""

import json
import re

import pytest

import legacy_reference
from callbacks.generation_eval import score
from conftest import REPO, run_cli
from core.records import DataError
from data_tools import synth
from parity_tools import compare as cmp
from qwen_finetune_legacy import FROZEN


def metrics_of(records, predictions):
    answers = [{"prediction": p, "truncated": False} for p in predictions]
    return score(records, answers)


@pytest.fixture(scope="module")
def val_records():
    pos = synth.generate(0, "val", "positive", 20, held_out_names=True)
    neg = synth.generate(0, "val", "negative", 20, held_out_names=True)
    return [{**r, "source": "positive"} for r in pos] + [{**r, "source": "negative"} for r in neg]


# ---------------------------------------------------------------- compare, unit level
def test_a_worse_f1_beyond_tolerance_fails_and_within_passes():
    ref = {"gen_num_examples": 10, "gen_offender_presence_f1": 0.90, "gen_json_parse_rate": 1.0}
    rows = {r.name: r for r in cmp.compare(ref, {**ref, "gen_offender_presence_f1": 0.87}, cmp.DEFAULT_TOLERANCES)}
    assert rows["gen_offender_presence_f1"].failed and rows["gen_offender_presence_f1"].worse_by == pytest.approx(0.03)
    rows = {r.name: r for r in cmp.compare(ref, {**ref, "gen_offender_presence_f1": 0.885}, cmp.DEFAULT_TOLERANCES)}
    assert not rows["gen_offender_presence_f1"].failed
    # exactly at the tolerance is still within it
    rows = {r.name: r for r in cmp.compare(ref, {**ref, "gen_offender_presence_f1": 0.88}, cmp.DEFAULT_TOLERANCES)}
    assert not rows["gen_offender_presence_f1"].failed


def test_higher_hallucination_and_truncation_are_worse():
    ref = {"gen_num_examples": 10, "gen_negative_hallucination_rate": 0.0, "gen_truncation_rate": 0.10}
    rows = {r.name: r for r in cmp.compare(ref, {**ref, "gen_negative_hallucination_rate": 0.05,
                                                 "gen_truncation_rate": 0.0}, cmp.DEFAULT_TOLERANCES)}
    assert rows["gen_negative_hallucination_rate"].failed
    assert not rows["gen_truncation_rate"].failed  # lower is better: 0.1 -> 0 is an improvement


def test_runs_on_different_example_counts_are_not_comparable():
    with pytest.raises(DataError, match="not comparable"):
        cmp.compare({"gen_num_examples": 10}, {"gen_num_examples": 11}, {})


def test_a_gated_metric_missing_from_the_candidate_fails_and_ungated_ones_only_show():
    ref = {"gen_num_examples": 4, "gen_json_parse_rate": 1.0, "gen_field_match_rate/age": 0.9}
    rows = {r.name: r for r in cmp.compare(ref, {"gen_num_examples": 4, "gen_field_match_rate/age": 0.1},
                                           cmp.DEFAULT_TOLERANCES)}
    assert rows["gen_json_parse_rate"].failed
    assert not rows["gen_field_match_rate/age"].failed and rows["gen_field_match_rate/age"].tolerance is None


def test_tolerance_option_is_checked():
    assert cmp.parse_tolerances(["gen_field_match_rate/age=0.1"])["gen_field_match_rate/age"] == 0.1
    for bad in ("gen_json_parse_rate", "parse=0.1", "gen_json_parse_rate=abc"):
        with pytest.raises(DataError, match="--tolerance"):
            cmp.parse_tolerances([bad])


# ---------------------------------------------------------------- compare, command line
def test_compare_fails_when_half_the_answers_are_blanked(tmp_path, val_records):
    gold = [r["output"] for r in val_records]
    blanked = [("" if i % 2 else p) for i, p in enumerate(gold)]
    (tmp_path / "ref.json").write_text(json.dumps(metrics_of(val_records, gold)))
    (tmp_path / "worse.json").write_text(json.dumps(metrics_of(val_records, blanked)))

    same = run_cli(str(REPO / "parity.py"), "compare", str(tmp_path / "ref.json"), str(tmp_path / "ref.json"),
                   "--out", str(tmp_path / "same"))
    assert same.returncode == 0 and "PASS" in same.stdout

    worse = run_cli(str(REPO / "parity.py"), "compare", str(tmp_path / "ref.json"), str(tmp_path / "worse.json"),
                    "--out", str(tmp_path / "report"), "--ref-name", "good", "--cand-name", "blanked")
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert re.search(r"\| gen_json_parse_rate \| 1\.0000 \| 0\.5000 \| -0\.5000 \| 0\.02 \| WORSE \|", worse.stdout)
    assert "FAIL: blanked vs good" in worse.stdout
    report = (tmp_path / "report" / "parity_report.md").read_text()
    assert "**FAIL**" in report and "gen_offender_presence_f1" in report
    png = (tmp_path / "report" / "parity_metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_pairs_gate_is_two_sided(tmp_path):
    """Two stacks meant to be the same run: either side worse beyond the tolerance fails, not only the
    candidate (Axolotl better than ours by 0.1 is a difference too)."""
    from parity_tools import compare as cmp

    def run(f1, parse):
        return {"gen_num_examples": 100, "gen_offender_name_set_f1": f1, "gen_json_parse_rate": parse}

    ours = run(0.80, 0.95)
    tolerances = {"gen_offender_name_set_f1": 0.05, "gen_json_parse_rate": 0.05}
    for axolotl, apart in ((run(0.90, 0.95), True), (run(0.70, 0.95), True), (run(0.84, 0.92), False)):
        rows = cmp.compare(ours, axolotl, tolerances)
        assert any(r.apart for r in rows) is apart, axolotl
        cmp.write_report(tmp_path, rows, ("ours", "axolotl"), ("a.json", "b.json"), ([], []), two_sided=True)
        report = (tmp_path / "parity_report.md").read_text()
        assert ("**FAIL**: ours and axolotl differ beyond tolerance (either way) on gen_offender_name_set_f1"
                in report) is apart
    # the one-sided `compare` command still only asks whether the candidate is worse
    better = cmp.compare(ours, run(0.90, 0.95), tolerances)
    assert not any(r.failed for r in better) and any(r.apart for r in better)


def test_compare_errors_are_readable(tmp_path, val_records):
    (tmp_path / "a.json").write_text(json.dumps(metrics_of(val_records, [r["output"] for r in val_records])))
    (tmp_path / "b.json").write_text(json.dumps(metrics_of(val_records[:10], [r["output"] for r in val_records[:10]])))
    (tmp_path / "c.json").write_text("{not json")
    for other, message in (("b.json", "not comparable"), ("c.json", "c.json: not valid JSON: line 1"),
                           ("missing.json", "missing.json: file not found")):
        result = run_cli(str(REPO / "parity.py"), "compare", str(tmp_path / "a.json"), str(tmp_path / other),
                         "--out", str(tmp_path))
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- token parity
# Both stacks train identical tokens on the tiny preset: docs/parity.md's `parity.py tokens -n 50`, run as written
# by tests/test_readme_commands.py.
def test_tokens_shows_the_first_difference_aligned(tmp_path):
    # Axolotl without training the end-of-turn token: the masks must differ at <|im_end|>.
    config = (REPO / "axolotl_configs" / "tiny_cpu.yml").read_text().replace("train_on_eos: turn", "train_on_eos: none")
    (tmp_path / "no_eos.yml").write_text(config)
    result = run_cli(str(REPO / "parity.py"), "tokens", "-n", "5", "--config-axolotl", str(tmp_path / "no_eos.yml"))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "example 0: trained-token mask differ" in result.stdout
    differing = [line for line in result.stdout.splitlines() if "<-- differs" in line]
    assert len(differing) == 1 and "<|im_end|>" in differing[0] and differing[0].count("*") == 1


def test_tokens_cuts_our_packed_rows_back_into_axolotls_examples():
    """With packing on (the production preset's setting) every example comes back out of the packed rows
    with the tokens and loss mask Axolotl gives it: packing drops, merges and re-masks nothing."""
    result = run_cli(str(REPO / "parity.py"), "tokens", "-n", "30", "--set", "packing=true")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "ours packed (packing=true, max_length 640): its 30 examples cut back" in result.stdout
    assert "identical: input_ids and trained-token masks of all 30 compared examples" in result.stdout


def test_tokens_on_qwen3s_tokenizer_match_the_shipped_production_axolotl_config(tmp_path, axolotl_ready):
    """The production pair as shipped (our qwen3-30b-a3b preset, packed, vs axolotl_configs/qwen_finetune.yml,
    its chat_template, roles and EOS settings) on Qwen3's own vocabulary and Instruct-2507's template, offline:
    the model's config and tokenizer come from this repository, no weights needed. A slice of the synthetic
    mix, at the configs' own relative data paths."""
    train = tmp_path / "data" / "train"
    synth = run_cli("-m", "data_tools", "synth", "--out-dir", str(train), "--positives", "30", "--negatives", "30",
                    "--heldout-negatives", "10", "--val-positives", "10", cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr[-2000:]
    prepare = run_cli("-m", "data_tools", "prepare", "--positives", str(train / "hawks_train.json"),
                      "--negatives", str(next(train.glob("person_dummy_*.json"))), "--val", str(train / "hawks_val.json"),
                      "--out", str(train / "hawks_train_curriculum.json"),
                      "--val-out", str(train / "hawks_val_mixed.json"), "--num-negatives", "30", cwd=tmp_path)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    result = run_cli(str(REPO / "parity.py"), "tokens", "-n", "40", "--set", "preset=qwen3-30b-a3b",
                     "--config-axolotl", str(REPO / "axolotl_configs" / "qwen_finetune.yml"), cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # an empty Hugging Face cache
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tokenizer: Qwen3's own, carried in qwen3_tokenizer/" in result.stdout
    assert "ours packed (packing=true, max_length 1536): its 40 examples cut back" in result.stdout
    assert "identical: input_ids and trained-token masks of all 40 compared examples" in result.stdout


def test_tokens_stops_when_max_length_leaves_examples_without_a_trained_token():
    result = run_cli(str(REPO / "parity.py"), "tokens", "-n", "5", "--set", "max_length=40")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "of the first 5 training examples have no trained token left after max_length 40" in result.stderr


# ---------------------------------------------------------------- the pairs end to end
def test_run_axolotl_pair_both_learn_and_agree(tmp_path, axolotl_ready):
    out = tmp_path / "parity"
    # 200 steps on the preset's model, the MoE (~3 min). Measured on the shipped tiny models: parse 0.97 / 0.98,
    # name-set F1 0.855 / 0.875, exact match 0.89 / 0.89 (ours / Axolotl), 100 held-out-name records.
    result = run_cli(str(REPO / "parity.py"), "run", "--preset", "tiny", "--pair", "axolotl", "--out", str(out),
                     "--eval-samples", "100", "--max-steps", "200", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    outcome = json.loads((out / "parity_result.json").read_text())
    metrics = outcome["metrics"]
    ours = next(k for k in metrics if k.startswith("ours"))
    for name in (ours, "axolotl"):
        for key in ("gen_json_parse_rate", "gen_offender_presence_f1"):
            assert metrics[name][key] >= metrics["base"][key] + 0.2, (name, key, metrics)
        # both read the names out of the article (a stack that lost it would sit near 0)
        assert metrics[name]["gen_offender_name_set_f1"] >= 0.75, (name, metrics)
        assert metrics[name]["gen_all_fields_exact_match_rate"] >= 0.80, (name, metrics)
        assert metrics[name]["gen_num_examples"] == 100
    assert outcome["failed"] == []
    report = (out / "parity_report.md").read_text()
    assert "**PASS**" in report and (out / "parity_losses.png").is_file()
    assert f"| error category | {ours} | axolotl |" in report  # how the two differ, not only that
    assert all((out / "eval" / name / "errors.md").is_file() for name in ("base", "ours", "axolotl"))
    assert "Model: tiny-moe. Router load-balancing loss: ours off, Axolotl off." in report
    # The same seeded LoRA init and warm-up in both stacks: the same loss, step by step, for the first 40
    # steps (measured at 200 steps: <= 2e-5 relative; later, float32 sums in a different order add up:
    # 1e-4 by step 45, ~3% by step 200).
    ours_losses = dict(json.loads((out / "ours" / "single" / "run_summary.json").read_text())["train_losses"])
    state = max((out / "axolotl").glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    theirs = {e["step"]: e["loss"] for e in json.loads(state.read_text())["log_history"] if "loss" in e}
    for step in range(1, 41):
        assert theirs[step] == pytest.approx(ours_losses[step], rel=1e-4), step


def test_run_legacy_pair_holds_the_frozen_recipe_and_the_committed_run(tmp_path):
    """The legacy restore path on the tiny MoE: every frozen setting as tests/reference/legacy_recipe.json
    (written by hand) says; the same losses and metrics as the new two-stage path given its saved config;
    and the losses and final adapter of tests/reference/legacy_tiny_moe_run.json (written by
    `tests/legacy_reference.py update`, never here), so a change of the recipe or of shared code that
    alters legacy training fails here. Six steps per stage, five of them at the frozen learning rates."""
    out = tmp_path / "legacy"
    result = run_cli(str(REPO / "parity.py"), "run", "--pair", "legacy", "--out", str(out),
                     "--max-steps", str(legacy_reference.STEPS), "--max-train-samples",
                     str(legacy_reference.TRAIN_SAMPLES), "--eval-samples", "16", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    outcome = json.loads((out / "parity_result.json").read_text())
    assert outcome["identical_losses"] is True
    legacy, new = outcome["metrics"]["legacy"], outcome["metrics"]["two-stage"]
    assert {k: v for k, v in legacy.items() if k.startswith("gen_")} == \
        {k: v for k, v in new.items() if k.startswith("gen_")}

    recipe = {k: v for k, v in json.loads(legacy_reference.RECIPE.read_text()).items() if not k.startswith("_")}
    assert set(FROZEN) == set(recipe)  # a setting frozen or unfrozen without the recipe file
    for stage in ("stage1", "stage2"):
        assert legacy_reference.recipe_differences(out / "legacy" / stage / "config.yaml", recipe) == []
        summary = json.loads((out / "legacy" / stage / "run_summary.json").read_text())
        assert summary["global_step"] == legacy_reference.STEPS and summary["mode"] == "two-stage"
    observed = legacy_reference.observe(out / "legacy")
    reference = json.loads(legacy_reference.REFERENCE.read_text())
    assert legacy_reference.run_differences(observed, reference) == []


def test_evaluate_explains_bad_paths_without_a_traceback(tmp_path):
    val = tmp_path / "val.json"
    val.write_text(json.dumps(synth.generate(0, "val", "negative", 2, held_out_names=True)))
    for args, message in ((["--base-model", str(tmp_path / "no-model"), "--data", str(val)], "cannot load it"),
                          (["--base-model", "tiny-dense", "--adapter", str(tmp_path), "--data", str(val)],
                           "not a PEFT adapter folder"),
                          (["--base-model", "tiny-dense", "--data", str(tmp_path / "none.json")], "file not found")):
        result = run_cli(str(REPO / "parity.py"), "evaluate", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_tokens_explains_missing_configs_without_a_traceback(tmp_path):
    for args, message in ((["--config-unsloth", str(tmp_path / "none.yaml")], "config file not found"),
                          (["--config-axolotl", str(tmp_path / "none.yml")], "--config-axolotl")):
        result = run_cli(str(REPO / "parity.py"), "tokens", "-n", "1", *args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
