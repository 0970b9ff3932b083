import json

import pytest

from callbacks.metrics import compute_metrics, flatten, normalize_age, normalize_name, parse_prediction

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
