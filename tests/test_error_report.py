"""The error report of an evaluation, the per-shape breakdown, and compare's side-by-side categories."""

import json

from callbacks.error_report import excerpt, render
from callbacks.generation_eval import prediction_rows, score
from core.metrics import DEFAULT_FIELDS
from parity_tools import compare as cmp

ARTICLE = ("警視庁新宿署は3日、窃盗の疑いで、東京都新宿区、会社員山田 太郎容疑者（34）を逮捕した。"
           "被害者の鈴木一郎さんにけがはなかった。")
YAMADA = {"name": "山田太郎", "age": 34, "occupation": "会社員", "address": "東京都新宿区", "charge": "窃盗"}


def record(i: int, offenders: list, shape: str, **extra) -> dict:
    return {"id": f"r{i}", "instruction": "抽出", "input": ARTICLE, "shape": shape,
            "source": "positive" if offenders else "negative",
            "output": json.dumps({"offenders": offenders}, ensure_ascii=False), **extra}


def answer(*names: str, truncated: bool = False) -> dict:
    return {"prediction": json.dumps({"offenders": [{**YAMADA, "name": n} for n in names]}, ensure_ascii=False),
            "truncated": truncated}


RECORDS = [record(0, [YAMADA], "arrest", non_offenders=["鈴木一郎"]),
           record(1, [YAMADA], "arrest", non_offenders=["鈴木一郎"]),
           record(2, [], "accident", non_offenders=["鈴木一郎"]),
           record(3, [YAMADA], "court")]
ANSWERS = [answer("山田太郎"), answer("鈴木一郎"), answer("鈴木一郎"), {"prediction": '{"offenders": [', "truncated": True}]


def test_score_breaks_the_metrics_down_by_shape_and_scores_grounding():
    m = score(RECORDS, ANSWERS)
    assert m["gen_offender_name_set_f1/shape/arrest"] == 0.5
    assert m["gen_num_examples/shape/court"] == 1 and m["gen_json_parse_rate/shape/court"] == 0.0
    assert m["gen_negative_hallucination_rate/shape/accident"] == 1.0
    assert m["gen_ungrounded_name_rate"] == 0.0  # every predicted name is in the article
    assert m["gen_non_offender_extracted_rate"] == 2 / 3  # of the 3 names predicted for the listing records
    assert m["gen_error_rate/non_offender_extracted"] == 0.5 and m["gen_error_rate/truncated"] == 0.25


def test_the_report_counts_every_category_and_shows_the_article_around_the_name():
    rows = prediction_rows(RECORDS, ANSWERS, DEFAULT_FIELDS)
    assert [r["category"] for r in rows] == ["correct", "non_offender_extracted", "non_offender_extracted",
                                             "truncated"]
    text = render(rows, RECORDS, "Errors at step 10")
    assert text.startswith("# Errors at step 10\n\n4 examples.")
    assert "| non_offender_extracted | 2 | 0.500 |" in text and "| correct | 1 | 0.250 |" in text
    assert "## non_offender_extracted (2)" in text and "## truncated (1)" in text
    assert "## correct" not in text and "## missed_offender" not in text  # no empty or correct sections
    assert "- `r1` (arrest): 鈴木一郎" in text
    assert "被害者の鈴木一郎さん" in text  # the excerpt around the name


def test_the_excerpt_finds_a_name_the_article_writes_with_a_space():
    shown = excerpt("あ" * 60 + "会社員山田 太郎容疑者" + "い" * 60, ["山田太郎"])
    assert "会社員山田 太郎容疑者" in shown and shown.startswith("…") and shown.endswith("…")
    assert excerpt("短い記事", ["田中"]) == "短い記事"


def test_compare_shows_the_error_categories_of_both_runs_as_counts():
    ref = score(RECORDS, ANSWERS)
    cand = score(RECORDS, [answer("山田太郎")] * 2 + [answer()] + [answer("田中次郎")])
    errors = cmp.error_table(ref, cand, "ours", "axolotl")
    assert "| error category | ours | axolotl |" in errors
    assert "| correct | 1 | 3 |" in errors and "| ungrounded_name | 0 | 1 |" in errors
    assert "| truncated | 1 | 0 |" in errors
    rows = cmp.compare(ref, cand, dict(cmp.DEFAULT_TOLERANCES))
    assert "gen_error_rate/" not in cmp.table(rows, "ours", "axolotl")  # counted in their own table
    worse = {r.name: r.worse_by for r in rows}
    assert worse["gen_error_rate/correct"] < 0 < worse["gen_error_rate/ungrounded_name"]
    assert cmp.error_table({"gen_num_examples": 4}, {"gen_num_examples": 4}, "a", "b") == ""
