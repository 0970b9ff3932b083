"""Extraction metrics: the one definition every stack is scored by.

Pure stdlib on purpose: Axolotl's environment, the trainer and the parity
harness all import this file, and the numbers must mean the same everywhere.

A prediction is parsed strictly (see ``parse_prediction``); an unparseable
prediction is wrong on every metric. Definitions are in docs/metrics.md
("Metrics") and mirrored in the docstrings below.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Iterable, Sequence

DEFAULT_FIELDS: tuple[str, ...] = ("name", "age", "occupation", "address", "charge")

_FENCE = re.compile(r"\A```[^\n`]*\n(.*?)\n?```\Z", re.DOTALL)
_INTEGER = re.compile(r"\A[+-]?\d+(?:\.0*)?\Z")


class NonFiniteJSONError(ValueError):
    """NaN/Infinity: Python's json accepts them, JSON does not."""


def reject_constant(token: str) -> Any:
    raise NonFiniteJSONError(f"{token} is not valid JSON")


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN/Infinity."""
    return json.loads(text, parse_constant=reject_constant)


def _strip_wrappers(text: str) -> str | None:
    """Remove whitespace, one leading <think>…</think> block and one code fence."""
    s = text.strip()
    if s.startswith("<think>"):
        end = s.find("</think>")
        if end < 0:
            return None  # unclosed think block: the answer never started
        s = s[end + len("</think>"):].strip()
    if s.startswith("```"):
        m = _FENCE.match(s)
        if m is None:
            return None
        s = m.group(1).strip()
    return s


def parse_prediction(text: str | None) -> list[dict] | None:
    """The offenders list of a prediction, or None when it is unparseable.

    Parseable means: after stripping whitespace, one leading ``<think>`` block
    and one surrounding Markdown code fence, the rest is exactly one JSON object
    whose ``offenders`` is a list of objects. Trailing text makes it
    unparseable.
    """
    if not isinstance(text, str):
        return None
    s = _strip_wrappers(text)
    if s is None:
        return None
    try:
        obj = loads_strict(s)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    offenders = obj.get("offenders")
    if not isinstance(offenders, list) or not all(isinstance(o, dict) for o in offenders):
        return None
    return offenders


def normalize_name(value: Any) -> str:
    """NFKC with every whitespace character removed; missing/null is ''."""
    return "".join(_normalize_text(value).split())


def _normalize_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return unicodedata.normalize("NFKC", value).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def normalize_age(value: Any) -> int | str:
    """An integer when the value is one (34, "34", "３４", 34.0), else a normalised string."""
    if isinstance(value, bool):
        return _normalize_text(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    text = _normalize_text(value)
    if _INTEGER.match(text):
        return int(float(text)) if "." in text else int(text)
    return text


def normalize_field(field: str, value: Any) -> int | str:
    if field == "name":
        return normalize_name(value)
    if field == "age":
        return normalize_age(value)
    return _normalize_text(value)


def name_set(offenders: Iterable[dict]) -> set[str]:
    return {normalize_name(o.get("name")) for o in offenders}


def flatten(offenders: Sequence[dict], fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, str]:
    """The CSV view: present, count, and each field's values joined by '|'.

    Offenders are ordered by normalised name (ties by their other normalised
    values), so list order in the JSON never matters.
    """
    rows = [tuple(str(normalize_field(f, o.get(f))) for f in fields) for o in offenders]
    name_idx = fields.index("name") if "name" in fields else None
    if name_idx is None:
        rows.sort()
    else:
        rows.sort(key=lambda r: (r[name_idx], r))
    flat = {"present": "1" if offenders else "0", "count": str(len(offenders))}
    for i, f in enumerate(fields):
        flat[f] = "|".join(r[i] for r in rows)
    return flat


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


# One category per prediction, the first that applies, in this order (docs/metrics.md: "Error categories").
ERROR_CATEGORIES: tuple[str, ...] = ("truncated", "unparseable", "ungrounded_name", "non_offender_extracted",
                                     "missed_offender", "wrong_attributes", "correct")


def ungrounded_names(names: Iterable[str], article: str) -> list[str]:
    """The names that do not occur in the article, compared the way names are (NFKC, whitespace removed
    from both: '山田 太郎', a full-width name or one broken by a line break still count); the article is
    normalised once for all of them."""
    text = normalize_name(article)
    return [n for n in names if normalize_name(n) not in text]


def is_grounded(name: str, article: str) -> bool:
    return not ungrounded_names([name], article)


def predicted_names(pred: Sequence[dict] | None) -> list[str]:
    """The distinct non-empty normalised names of a parsed prediction (an offender without a name is not
    a name)."""
    return sorted(name_set(pred or ()) - {""})


def classify(gold_offenders: Sequence[dict], prediction: str | None, article: str, truncated: bool = False,
             fields: Sequence[str] = DEFAULT_FIELDS) -> tuple[str, list[str], list[str]]:
    """(category, the names it is about, the wrong fields) of one prediction; the category is the first of
    ERROR_CATEGORIES that applies:

    - truncated: cut by the token limit and unparseable; unparseable: any other unparseable answer;
    - ungrounded_name: a predicted name that does not occur in the article (written from the model's prior);
    - non_offender_extracted: a predicted name that occurs in the article but is no offender's (a victim,
      witness, judge, a surname alone; on a negative article, any name);
    - missed_offender: a gold offender's name not predicted (`[]` on a positive included);
    - wrong_attributes: the right names, but the count or a field differs (listed);
    - correct: every field matches (the all-fields exact match).
    """
    pred = parse_prediction(prediction)
    if pred is None:
        return ("truncated" if truncated else "unparseable"), [], []
    g_flat, p_flat = flatten(gold_offenders, fields), flatten(pred, fields)
    if g_flat == p_flat:
        return "correct", [], []
    names, gold_names = predicted_names(pred), set(predicted_names(gold_offenders))
    if ungrounded := ungrounded_names(names, article):
        return "ungrounded_name", ungrounded, []
    if extra := [n for n in names if n not in gold_names]:
        return "non_offender_extracted", extra, []
    if missed := sorted(gold_names - set(names)):
        return "missed_offender", missed, []
    return "wrong_attributes", names, [k for k in g_flat if g_flat[k] != p_flat[k]]


def compute_metrics(
    gold: Sequence[Sequence[dict]],
    predictions: Sequence[str | None],
    fields: Sequence[str] = DEFAULT_FIELDS,
    *,
    articles: Sequence[str] | None = None,
    non_offenders: Sequence[Sequence[str] | None] | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[str, float | int]:
    """Score predictions (raw model text) against gold offender lists.

    ``gold[i]`` is the parsed ``offenders`` list of example i. With ``articles`` (the input texts) the
    grounding metrics and the share of each error category are added; ``non_offenders[i]``, where a
    record lists the people its article names who are not offenders, adds the non-offender rate;
    ``truncated[i]`` tells a cut answer from an unparseable one.
    """
    if len(gold) != len(predictions):
        raise ValueError(f"{len(gold)} gold examples but {len(predictions)} predictions")
    n = len(gold)
    if n == 0:
        raise ValueError("no examples to score")
    fields = tuple(fields)
    flat_keys = ("present", "count", *fields)

    parsed_count = exact = 0
    p_tp = p_fp = p_fn = 0
    n_tp = n_fp = n_fn = 0
    negatives = hallucinated = 0
    field_hits = dict.fromkeys(flat_keys, 0)

    for gold_offenders, text in zip(gold, predictions):
        pred = parse_prediction(text)
        gold_pos = bool(gold_offenders)
        if pred is not None:
            parsed_count += 1
        pred_pos = pred is not None and bool(pred)
        if gold_pos:
            p_tp += pred_pos
            p_fn += not pred_pos
        else:
            negatives += 1
            p_fp += pred is None or pred_pos
            hallucinated += pred_pos

        g_names = name_set(gold_offenders)
        p_names = name_set(pred) if pred is not None else set()
        n_tp += len(p_names & g_names)
        n_fp += len(p_names - g_names)
        n_fn += len(g_names - p_names)

        if pred is not None:
            g_flat, p_flat = flatten(gold_offenders, fields), flatten(pred, fields)
            matches = [k for k in flat_keys if g_flat[k] == p_flat[k]]
            for k in matches:
                field_hits[k] += 1
            exact += len(matches) == len(flat_keys)

    metrics: dict[str, float | int] = {
        "gen_num_examples": n,
        "gen_json_parse_rate": parsed_count / n,
        "gen_offender_presence_f1": _f1(p_tp, p_fp, p_fn),
        "gen_offender_name_set_f1": _f1(n_tp, n_fp, n_fn),
        "gen_all_fields_exact_match_rate": exact / n,
    }
    for k in flat_keys:
        metrics[f"gen_field_match_rate/{k}"] = field_hits[k] / n
    if negatives:
        metrics["gen_negative_hallucination_rate"] = hallucinated / negatives
    if articles is not None:
        metrics.update(grounding_metrics(gold, predictions, articles, non_offenders, truncated, fields))
    return metrics


def record_context(records: Sequence[dict], truncated: Sequence[bool] | None = None) -> dict:
    """compute_metrics' keyword arguments from task records: their articles (`input`) and, where records
    carry a `non_offenders` list, those lists."""
    listed = [r.get("non_offenders") if isinstance(r.get("non_offenders"), list) else None for r in records]
    return {"articles": [r["input"] for r in records], "truncated": truncated,
            "non_offenders": listed if any(x is not None for x in listed) else None}


def grounding_metrics(gold, predictions, articles, non_offenders=None, truncated=None,
                      fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, float]:
    """gen_ungrounded_name_rate: of all names predicted (distinct per example, non-empty, parseable answers
    only), the share that does not occur in the article (``ungrounded_names``); 0 when no name is predicted.
    gen_non_offender_extracted_rate (only when some record lists its non-offenders): of the names predicted
    for those records, the share that is one of the listed non-offenders.
    gen_error_rate/<category>: the share of examples in each of ERROR_CATEGORIES."""
    n = len(gold)
    if len(articles) != n:
        raise ValueError(f"{n} gold examples but {len(articles)} articles")
    truncated = truncated if truncated is not None else [False] * n
    named = ungrounded = listed_named = listed_hits = 0
    categories = dict.fromkeys(ERROR_CATEGORIES, 0)
    for i, (gold_offenders, text, article) in enumerate(zip(gold, predictions, articles)):
        names = predicted_names(parse_prediction(text))
        named += len(names)
        ungrounded += len(ungrounded_names(names, article))
        listed = non_offenders[i] if non_offenders is not None else None
        if listed is not None:
            others = {normalize_name(x) for x in listed} - {""}
            listed_named += len(names)
            listed_hits += sum(name in others for name in names)
        categories[classify(gold_offenders, text, article, bool(truncated[i]), fields)[0]] += 1
    out = {"gen_ungrounded_name_rate": ungrounded / named if named else 0.0}
    if non_offenders is not None and any(x is not None for x in non_offenders):
        out["gen_non_offender_extracted_rate"] = listed_hits / listed_named if listed_named else 0.0
    out.update({f"gen_error_rate/{c}": k / n for c, k in categories.items()})
    return out


# The user's metrics, in the order every summary, report and comparison prints them.
HEADLINE: tuple[str, ...] = ("gen_json_parse_rate", "gen_offender_presence_f1", "gen_offender_name_set_f1",
                             "gen_all_fields_exact_match_rate", "gen_negative_hallucination_rate",
                             "gen_truncation_rate")
# Every metric a run reports, by the name before any "/part" suffix (per source, shape, field, category);
# eval_loss is the trainer's own. Used to check a metric named in a setting before a run starts.
METRIC_NAMES: tuple[str, ...] = (
    "gen_json_parse_rate", "gen_offender_presence_f1", "gen_offender_name_set_f1", "gen_all_fields_exact_match_rate",
    "gen_field_match_rate", "gen_negative_hallucination_rate", "gen_truncation_rate", "gen_ungrounded_name_rate",
    "gen_non_offender_extracted_rate", "gen_error_rate", "eval_loss")
# Rates of a failure: lower is better. Every other metric: higher is better.
LOWER_IS_BETTER: tuple[str, ...] = ("gen_negative_hallucination_rate", "gen_truncation_rate",
                                    "gen_ungrounded_name_rate", "gen_non_offender_extracted_rate", "eval_loss")


def is_known_metric(name: str) -> bool:
    return name.split("/")[0] in METRIC_NAMES


def lower_is_better(name: str) -> bool:
    """`gen_error_rate/<category>` is a failure rate too, except the share of correct answers."""
    base = name.split("/")[0]
    return base in LOWER_IS_BETTER or (base == "gen_error_rate" and name != "gen_error_rate/correct")
