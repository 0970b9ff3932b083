import csv
import re
import json
from collections import Counter

import pytest

from core.metrics import normalize_name
from core.records import Row, gold_offenders, load_records
from data_tools import synth
from core.formats import convert_rows
from data_tools.prepare import merge, validation_mix
from data_tools.split import article_key, split_records


def test_synth_is_deterministic_and_varied():
    a = synth.generate(7, "train", "positive", 200)
    assert a == synth.generate(7, "train", "positive", 200)
    assert a != synth.generate(8, "train", "positive", 200)
    assert len(set(synth.POSITIVE_SHAPES)) >= 8 and len(set(synth.NEGATIVE_SHAPES)) >= 6
    assert set(Counter(r["shape"] for r in a)) == set(synth.POSITIVE_SHAPES)
    texts = " ".join(r["input"] for r in a)
    assert "（" in texts and "(" in texts and "さん" in texts and "再逮捕" in texts
    assert any(len(gold_offenders(r)) > 1 for r in a)


def test_synth_labels_are_consistent_with_the_text():
    for kind in ("positive", "negative"):
        for r in synth.generate(1, "train", kind, 300):
            offenders = gold_offenders(r)
            assert bool(offenders) == (kind == "positive")
            article = normalize_name(r["input"])
            for o in offenders:
                assert normalize_name(o["name"]) in article
                assert f"{o['name']}さん" not in r["input"]  # offenders are never called さん
                if o["age"] is not None:
                    ages = {str(o["age"]), str(o["age"]).translate(str.maketrans("0123456789", "０１２３４５６７８９"))}
                    assert any(a in r["input"] for a in ages)


def test_validation_names_are_unseen_in_training():
    def names(records):
        return {o["name"] for r in records for o in gold_offenders(r)}
    train = names(synth.generate(0, "train", "positive", 3000))
    val = names(synth.generate(0, "val", "positive", 300, held_out_names=True))
    assert val and not (train & val)


def test_hard_shapes_are_left_out(cli, tmp_path):
    r = cli("-m", "data_tools", "synth", "--out-dir", str(tmp_path), "--positives", "300", "--negatives", "300",
            "--heldout-negatives", "50", "--val-positives", "50", "--hard", "40")
    assert r.returncode == 0, r.stderr
    train = load_records(tmp_path / "hawks_train.json")
    hard = load_records(tmp_path / "hawks_val_hard.json")
    assert not {r["shape"] for r in train} & set(synth.DEFAULT_HARD_SHAPES)
    assert {r["shape"] for r in hard} == set(synth.DEFAULT_HARD_SHAPES) and len(hard) == 40
    again = cli("-m", "data_tools", "synth", "--out-dir", str(tmp_path))
    assert again.returncode == 1 and "--force" in again.stderr


def _records(kind, n, start=0):
    return synth.generate(3, "train", kind, n, start=start)


def test_merge_counts_sources_and_determinism():
    pos, neg = _records("positive", 10), _records("negative", 30)
    merged = merge(pos, neg, repeat=3, num_negatives=20, seed=1)
    assert Counter(r["source"] for r in merged) == {"positive": 30, "negative": 20}
    assert merged == merge(pos, neg, repeat=3, num_negatives=20, seed=1)
    assert merged != merge(pos, neg, repeat=3, num_negatives=20, seed=2)
    assert {r["id"] for r in merged if r["source"] == "negative"} == {r["id"] for r in neg[:20]}


def test_validation_mix_uses_only_spare_negatives():
    val = validation_mix(_records("positive", 30), _records("negative", 100, start=500), 0.25, seed=0)
    assert Counter(r["source"] for r in val) == {"positive": 30, "negative": 10}


def test_prepare_cli(cli, tmp_path):
    r = cli("-m", "data_tools", "synth", "--out-dir", str(tmp_path), "--positives", "100", "--negatives", "250",
            "--heldout-negatives", "60", "--val-positives", "40")
    assert r.returncode == 0, r.stderr
    args = ["-m", "data_tools", "prepare", "--positives", str(tmp_path / "hawks_train.json"),
            "--negatives", str(tmp_path / "person_dummy_2025-12-23-1817.json"),
            "--val", str(tmp_path / "hawks_val.json"), "--num-negatives", "250",
            "--out", str(tmp_path / "cur.jsonl"), "--val-out", str(tmp_path / "val.json")]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "100 positives x 3 = 300 + 250 negatives = 550 records" in r.stdout
    assert "40 positives + 40 held-out negatives" in r.stdout
    train, val = load_records(tmp_path / "cur.jsonl"), load_records(tmp_path / "val.json")
    assert len(train) == 550 and len(val) == 80
    assert not {article_key(r) for r in train} & {article_key(r) for r in val}
    again = cli(*args)
    assert again.returncode == 1 and "--force" in again.stderr
    assert cli(*args, "--force").returncode == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_refuses_invalid_input_without_writing(cli, tmp_path):
    bad = tmp_path / "pos.jsonl"
    bad.write_text('{"instruction": "x", "input": "y", "output": "nope"}\n', encoding="utf-8")
    r = cli("-m", "data_tools", "prepare", "--positives", str(bad), "--negatives", str(bad), "--val", str(bad),
            "--out", str(tmp_path / "o.json"), "--val-out", str(tmp_path / "v.json"))
    assert r.returncode == 1 and "pos.jsonl:1: 'output' is not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.json").exists()


def test_split_keeps_duplicates_together_and_is_deterministic():
    recs = _records("positive", 200)
    recs += [dict(r, id="dup") for r in recs[:20]]
    train, val = split_records(recs, 0.2, seed=5)
    assert not {article_key(r) for r in train} & {article_key(r) for r in val}
    assert 20 < len(val) < 80
    assert (train, val) == split_records(recs, 0.2, seed=5)


def _rows(values):
    return [Row(f"x:{i + 1}", v) for i, v in enumerate(values)]


def test_convert_round_trips():
    recs = [{**r, "source": "positive"} for r in _records("positive", 5)]
    # every record key survives the trip: the task's three, and id, source, shape, non_offenders
    plain = [{k: r[k] for k in ("instruction", "input", "output", "id", "source", "shape", "non_offenders")}
             for r in recs]
    assert plain == recs
    for fmt in ("messages", "prompt-completion"):
        exported = convert_rows(_rows(recs), "auto", fmt, ("name", "age", "occupation", "address", "charge"))
        assert convert_rows(_rows(exported), "auto", "records", ("name",)) == plain
    messages = convert_rows(_rows(recs[:1]), "records", "messages", ("name",))[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == recs[0]["input"]


def test_convert_sharegpt_and_alpaca_csv(cli, tmp_path):
    rec = _records("positive", 1)[0]
    share = {"conversations": [{"from": "system", "value": rec["instruction"]},
                               {"from": "human", "value": rec["input"]},
                               {"from": "gpt", "value": rec["output"]}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(share, ensure_ascii=False) + "\n", encoding="utf-8")
    r = cli("-m", "data_tools", "convert", str(tmp_path / "s.jsonl"), str(tmp_path / "r.json"), "--to", "records")
    assert r.returncode == 0, r.stderr
    assert load_records(tmp_path / "r.json") == [{k: rec[k] for k in ("instruction", "input", "output")}]

    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["instruction", "input", "output"])
        w.writeheader()
        w.writerow({k: rec[k] for k in ("instruction", "input", "output")})
        w.writerow({"instruction": "x", "input": "y", "output": "not json"})
    r = cli("-m", "data_tools", "convert", str(tmp_path / "a.csv"), str(tmp_path / "m.jsonl"), "--to", "messages")
    assert r.returncode == 1 and "a.csv:3: 'output' is not valid JSON" in r.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_stats_reports_leakage(cli, tmp_path):
    recs = _records("positive", 20) + _records("negative", 10)
    (tmp_path / "t.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "v.json").write_text(json.dumps(recs[:3], ensure_ascii=False), encoding="utf-8")
    r = cli("-m", "data_tools", "stats", str(tmp_path / "t.json"), "--val", str(tmp_path / "v.json"))
    assert r.returncode == 0, r.stderr
    assert re.search(r"positive:negative\s+1:0.50\n", r.stdout)
    assert re.search(r"leaked_from_train\s+3\n", r.stdout)


@pytest.mark.parametrize("command", ["synth", "prepare", "validate", "convert", "split", "stats"])
def test_every_command_has_help(cli, command):
    r = cli("-m", "data_tools", command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
