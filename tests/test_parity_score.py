import json

GOLD = [
    {"instruction": "i", "input": "山田太郎容疑者（34）を逮捕", "output": json.dumps(
        {"offenders": [{"name": "山田太郎", "age": 34, "occupation": None, "address": None, "charge": None}]},
        ensure_ascii=False)},
    {"instruction": "i", "input": "佐藤さんが受賞", "output": '{"offenders": []}'},
]


def _write(tmp_path, preds):
    (tmp_path / "gold.json").write_text(json.dumps(GOLD, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps({"prediction": p}, ensure_ascii=False) + "\n"
                                                 for p in preds), encoding="utf-8")
    return ["parity.py", "score", "--gold", str(tmp_path / "gold.json"), "--pred", str(tmp_path / "pred.jsonl")]


def test_score_prints_metrics(cli, tmp_path):
    preds = ['```json\n{"offenders": [{"name": "山田 太郎", "age": "34"}]}\n```', '{"offenders": [{"name": "佐藤"}]}']
    r = cli(*_write(tmp_path, preds))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["gen_num_examples"] == 2 and m["gen_json_parse_rate"] == 1.0
    assert m["gen_negative_hallucination_rate"] == 1.0
    assert m["gen_offender_presence_f1"] == 2 / 3
    assert m["gen_all_fields_exact_match_rate"] == 0.5


def test_score_count_mismatch_is_a_clear_error(cli, tmp_path):
    r = cli(*_write(tmp_path, ['{"offenders": []}']))
    assert r.returncode == 1
    assert "has 2 examples but" in r.stderr and "1 predictions" in r.stderr and "Traceback" not in r.stderr


def test_score_bad_prediction_rows(cli, tmp_path):
    args = _write(tmp_path, ["a", "b"])
    (tmp_path / "pred.jsonl").write_text('{"prediction": "a"}\n{"text": "b"}\n', encoding="utf-8")
    r = cli(*args)
    assert r.returncode == 1 and "pred.jsonl:2" in r.stderr and "Traceback" not in r.stderr
