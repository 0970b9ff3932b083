import json

import pytest

from core.metrics import (ERROR_CATEGORIES, classify, compute_metrics, flatten, is_grounded, normalize_age,
                              normalize_name, parse_prediction)

YAMADA = {"name": "山田太郎", "age": 34, "occupation": "会社員", "address": "東京都新宿区", "charge": "窃盗"}
SATO = {"name": "佐藤花子", "age": 28, "occupation": "無職", "address": "大阪市北区", "charge": "詐欺"}


def answer(*offenders) -> str:
    return json.dumps({"offenders": list(offenders)}, ensure_ascii=False)


@pytest.mark.parametrize("text", [
    answer(YAMADA),
    "  \n" + answer(YAMADA) + "\n ",
    "<think>考える</think>" + answer(YAMADA),
    "<think>\n複数行\n</think>\n\n" + answer(YAMADA),
    "```json\n" + answer(YAMADA) + "\n```",
    "```\n" + answer(YAMADA) + "```",
    "<think></think>```json\n" + answer(YAMADA) + "\n```",
])
def test_parseable_wrappings(text):
    assert parse_prediction(text) == [YAMADA]


@pytest.mark.parametrize("text", [
    None, "", "offenders: none", "[]", '{"offenders": {}}', '{"offenders": ["山田太郎"]}',
    '{"people": []}', answer(YAMADA) + " 以上です", answer(YAMADA) + answer(YAMADA),
    "<think>unclosed " + answer(YAMADA), "```json\n" + answer(YAMADA),
    "説明: " + answer(YAMADA), '{"offenders": [{"name": "A", "age": NaN}]}',
    '{"offenders": [{"name": "A", "age": Infinity}]}', "```json\n```json\n" + answer() + "\n```\n```",
])
def test_unparseable(text):
    assert parse_prediction(text) is None


def test_normalisation():
    assert normalize_name(" 山田　太郎 ") == "山田太郎"
    assert normalize_name("ﾔﾏﾀﾞ") == "ヤマダ"
    assert normalize_name(None) == ""
    for age in (34, "34", "３４", 34.0, " 34 ", "34.0"):
        assert normalize_age(age) == 34
    assert normalize_age(None) == ""
    assert normalize_age("34歳") == "34歳"
    assert normalize_age(34.5) == "34.5"
    assert normalize_age(True) == "true"


def test_flatten_orders_by_name_and_counts_entries():
    flat = flatten([SATO, YAMADA, {**YAMADA}])
    assert flat["present"] == "1" and flat["count"] == "3"
    assert flat["name"] == "佐藤花子|山田太郎|山田太郎"
    assert flat["age"] == "28|34|34"
    assert flatten([])["present"] == "0" and flatten([])["name"] == ""
    assert flatten([{"name": "山田太郎"}])["age"] == ""  # missing is empty


def test_perfect_and_order_independent():
    gold = [[YAMADA, SATO], []]
    m = compute_metrics(gold, [answer(SATO, YAMADA), answer()])
    assert m["gen_json_parse_rate"] == 1.0
    assert m["gen_offender_presence_f1"] == 1.0
    assert m["gen_offender_name_set_f1"] == 1.0
    assert m["gen_all_fields_exact_match_rate"] == 1.0
    assert m["gen_negative_hallucination_rate"] == 0.0
    assert m["gen_num_examples"] == 2


def test_unparseable_counts_against_both_classes():
    gold = [[YAMADA], []]
    m = compute_metrics(gold, ["not json", "not json"])
    # TP=0, FN=1 (gold positive), FP=1 (gold negative)
    assert m["gen_offender_presence_f1"] == 0.0
    assert m["gen_json_parse_rate"] == 0.0
    assert m["gen_negative_hallucination_rate"] == 0.0  # unparseable is not a hallucination
    assert m["gen_field_match_rate/present"] == 0.0


def test_presence_f1_arithmetic():
    gold = [[YAMADA], [YAMADA], [], [], [SATO]]
    preds = [answer(YAMADA), answer(), answer(SATO), answer(), "oops"]
    m = compute_metrics(gold, preds)
    tp, fp, fn = 1, 1, 2
    assert m["gen_offender_presence_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["gen_negative_hallucination_rate"] == pytest.approx(1 / 2)


def test_name_set_f1_micro_and_duplicates():
    gold = [[YAMADA, SATO], [YAMADA]]
    preds = [answer({**YAMADA}, {**YAMADA}, {"name": "鈴木一郎"}), answer({"name": "山田 太郎"})]
    m = compute_metrics(gold, preds)
    # ex1: P={山田,鈴木} G={山田,佐藤}: TP1 FP1 FN1; ex2: normalised match: TP1
    assert m["gen_offender_name_set_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["gen_field_match_rate/count"] == 0.5  # 3 entries vs 2 gold; 1 vs 1
    m2 = compute_metrics([[YAMADA]], [answer({"name": "山田 太郎"})])
    assert m2["gen_field_match_rate/count"] == 1.0
    assert m2["gen_field_match_rate/age"] == 0.0
    assert m2["gen_all_fields_exact_match_rate"] == 0.0


def test_empty_and_missing_names_count_as_empty_name():
    m = compute_metrics([[YAMADA]], [answer({"age": 34}, YAMADA)])
    # P = {"", 山田太郎}: TP1 FP1
    assert m["gen_offender_name_set_f1"] == pytest.approx(2 / 3)


def test_exact_match_with_normalised_values_and_ignored_keys():
    pred = {"name": "山田　太郎", "age": "３４", "occupation": " 会社員 ", "address": "東京都新宿区",
            "charge": "窃盗", "note": "ignored"}
    m = compute_metrics([[YAMADA]], [answer(pred)])
    assert m["gen_all_fields_exact_match_rate"] == 1.0


def test_field_subset_and_no_negatives():
    m = compute_metrics([[YAMADA]], [answer({"name": "山田太郎", "age": 99})], fields=("name", "charge"))
    assert "gen_field_match_rate/age" not in m
    assert m["gen_field_match_rate/charge"] == 0.0  # gold 窃盗, predicted missing
    assert "gen_negative_hallucination_rate" not in m


def test_all_negative_gold_with_empty_predictions_is_perfect():
    m = compute_metrics([[], []], [answer(), answer()])
    assert m["gen_offender_presence_f1"] == 1.0  # no positives anywhere: 0/0 is 1.0
    assert m["gen_offender_name_set_f1"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="2 gold"):
        compute_metrics([[], []], [answer()])


# ---------------------------------------------------------------- grounding and error categories
ARTICLE = "警視庁新宿署は3日、窃盗の疑いで、東京都新宿区、会社員山田 太郎容疑者（34）を逮捕した。被害者の鈴木一郎さんにけがはなかった。"
NOT_IN_ARTICLE = {**YAMADA, "name": "田中次郎"}
VICTIM = {**YAMADA, "name": "鈴木一郎"}


@pytest.mark.parametrize("name, article, grounded", [
    ("山田太郎", "会社員山田 太郎容疑者", True),  # a space inside the name in the article
    ("山田 太郎", "会社員山田太郎容疑者", True),  # ... or in the prediction
    ("山田太郎", "会社員山田\n太郎容疑者", True),  # a name broken by a line break
    ("ＡＢＣ", "会社員ABC容疑者", True),  # full-width against half-width (NFKC)
    ("山田太", "会社員山田太郎容疑者", True),  # a part of a name occurs: grounded (wrong, but not invented)
    ("田中次郎", "会社員山田太郎容疑者", False),
])
def test_a_name_is_grounded_when_it_occurs_in_the_article_as_names_are_compared(name, article, grounded):
    assert is_grounded(name, article) is grounded


def test_ungrounded_name_rate_counts_distinct_predicted_names_of_parseable_answers():
    gold = [[YAMADA], [YAMADA], [YAMADA], []]
    predictions = [answer(YAMADA, NOT_IN_ARTICLE, NOT_IN_ARTICLE),  # 2 distinct names, 1 invented
                   "not json",  # no names
                   answer({**YAMADA, "name": None}),  # an offender without a name is not a name
                   answer()]
    m = compute_metrics(gold, predictions, articles=[ARTICLE] * 4)
    assert m["gen_ungrounded_name_rate"] == 0.5
    assert "gen_non_offender_extracted_rate" not in m  # no record lists its non-offenders
    assert compute_metrics([[YAMADA]], [answer()], articles=[ARTICLE])["gen_ungrounded_name_rate"] == 0.0
    assert "gen_ungrounded_name_rate" not in compute_metrics(gold, predictions)  # no articles, no grounding


def test_non_offender_rate_over_the_records_that_list_their_non_offenders():
    gold = [[YAMADA], [], [YAMADA]]
    predictions = [answer(YAMADA, VICTIM), answer(VICTIM), answer(VICTIM)]
    listed = [["鈴木 一郎"], ["鈴木一郎"], None]  # the third record lists nothing: left out
    m = compute_metrics(gold, predictions, articles=[ARTICLE] * 3, non_offenders=listed)
    assert m["gen_non_offender_extracted_rate"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("gold, prediction, truncated, expected", [
    ([YAMADA], '{"offenders": [{"name": "山田', True, ("truncated", [], [])),
    ([YAMADA], '{"offenders": [{"name": "山田', False, ("unparseable", [], [])),
    ([YAMADA], answer(VICTIM, NOT_IN_ARTICLE), False, ("ungrounded_name", ["田中次郎"], [])),  # first wins
    ([YAMADA], answer(YAMADA, VICTIM), False, ("non_offender_extracted", ["鈴木一郎"], [])),
    ([], answer(VICTIM), False, ("non_offender_extracted", ["鈴木一郎"], [])),  # on a negative article
    ([YAMADA, {**SATO, "name": "鈴木一郎"}], answer(YAMADA), False, ("missed_offender", ["鈴木一郎"], [])),
    ([YAMADA], answer(), False, ("missed_offender", ["山田太郎"], [])),
    ([YAMADA], answer({**YAMADA, "age": "３４", "charge": "強盗"}), False,
     ("wrong_attributes", ["山田太郎"], ["charge"])),  # full-width 34 is 34: only the charge is wrong
    ([YAMADA], answer({**YAMADA, "name": "山田 太郎", "age": "34"}), False, ("correct", [], [])),
    ([], answer(), False, ("correct", [], [])),
])
def test_each_prediction_falls_in_the_first_error_category_that_applies(gold, prediction, truncated, expected):
    assert classify(gold, prediction, ARTICLE, truncated) == expected


def test_error_rates_cover_every_example_once():
    gold = [[YAMADA], [YAMADA], [], [YAMADA]]
    predictions = [answer(YAMADA), answer(NOT_IN_ARTICLE), answer(), "cut"]
    m = compute_metrics(gold, predictions, articles=[ARTICLE] * 4, truncated=[False, False, False, True])
    rates = {k.split("/")[1]: v for k, v in m.items() if k.startswith("gen_error_rate/")}
    assert set(rates) == set(ERROR_CATEGORIES) and sum(rates.values()) == pytest.approx(1.0)
    assert rates == {**dict.fromkeys(ERROR_CATEGORIES, 0.0), "correct": 0.5, "ungrounded_name": 0.25,
                     "truncated": 0.25}
    assert m["gen_all_fields_exact_match_rate"] == rates["correct"]
