"""What went wrong in one evaluation: every prediction in one error category, counts and a few examples.

Pure stdlib (the Axolotl plugin writes the same report): `gen_errors_step{N}.md` beside the metrics of
the training callback and `errors.md` beside `parity.py evaluate`'s. The categories are defined in
core/metrics.py (`classify`) and in docs/metrics.md ("Error categories").
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Sequence

from core.metrics import ERROR_CATEGORIES, normalize_name

EXAMPLES_PER_CATEGORY = 3
EXCERPT_CHARS = 40  # article text shown either side of the first name concerned


def excerpt(article: str, names: Sequence[str]) -> str:
    """The article around the first of `names` it contains (whitespace-insensitive), else its start."""
    flat = " ".join(article.split())
    for name in names:
        if not name:
            continue
        at = _find(flat, name)
        if at >= 0:
            start, end = max(0, at - EXCERPT_CHARS), min(len(flat), at + len(name) + EXCERPT_CHARS)
            return ("…" if start else "") + flat[start:end] + ("…" if end < len(flat) else "")
    return flat[:2 * EXCERPT_CHARS] + ("…" if len(flat) > 2 * EXCERPT_CHARS else "")


def _find(text: str, name: str) -> int:
    at = text.find(name)
    if at < 0:  # a name written with a space in the article ("山田 太郎"): look again without spaces
        compact = normalize_name(name)
        positions = [i for i, c in enumerate(text) if not c.isspace()]
        at = "".join(text[i] for i in positions).find(compact)
        return positions[at] if at >= 0 else -1
    return at


def render(rows: Sequence[dict], records: Sequence[dict], title: str) -> str:
    """Markdown: the category counts, then up to EXAMPLES_PER_CATEGORY examples of each error.
    `rows`: prediction rows with `category`, `names` (the names the category is about) and `wrong_fields`."""
    counts = Counter(r["category"] for r in rows)
    n = len(rows)
    lines = [f"# {title}", "", f"{n} examples.", "", "| category | count | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {counts[c]} | {counts[c] / n:.3f} |" for c in ERROR_CATEGORIES if n]
    for category in ERROR_CATEGORIES:
        if category == "correct" or not counts[category]:
            continue
        lines += ["", f"## {category} ({counts[category]})", ""]
        shown = [(row, rec) for row, rec in zip(rows, records) if row["category"] == category]
        for row, rec in shown[:EXAMPLES_PER_CATEGORY]:
            head = f"- `{row.get('id') or '?'}`" + (f" ({rec['shape']})" if rec.get("shape") else "")
            if row.get("wrong_fields"):
                head += f": wrong {', '.join(row['wrong_fields'])}"
            elif row.get("names"):
                head += f": {', '.join(row['names'])}"
            lines += [head,
                      f"  - article: {excerpt(rec.get('input', ''), [*row.get('names', []), *_gold_names(rec)])}",
                      f"  - gold: `{_one_line(rec.get('output', ''))}`",
                      f"  - prediction: `{_one_line(row.get('prediction') or '')}`"]
    return "\n".join(lines) + "\n"


def _gold_names(record: dict) -> list[str]:
    """The excerpt falls back on the gold names where the category's names are not in the article (an
    invented name) or there are none (an unparseable answer)."""
    try:
        return [str(o.get("name") or "") for o in json.loads(record.get("output", ""))["offenders"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


def _one_line(text: str, limit: int = 300) -> str:
    try:  # JSON answers shown compact and readable
        text = json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, TypeError):
        pass
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[:limit] + "…"
