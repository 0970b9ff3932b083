"""Check record files and report every problem with its location.

Errors (exit 1): unreadable or invalid JSON, truncated arrays, a top-level
object, invalid UTF-8, NaN/Infinity, missing or non-string fields, an empty
article, an `output` that is not JSON or not the schema. Warnings (exit 0):
a BOM or Windows (CRLF) line endings (read anyway, as by every loader), a gold
name that does not occur in the article, duplicate articles, schema keys
missing or extra, a non-integer age. JSON Lines are checked line by line (a
bad line does not hide the next ones); a JSON array can only be read up to
its first syntax error, which is then the one error reported.
Locations are `file:line` for JSONL/CSV and `file:[index]` for JSON arrays.
The files are read by `core.records.iter_rows`, the reader behind every
loader, so what passes here loads for training and the reverse.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from core.metrics import normalize_name
from core.records import Issue, check_record, iter_rows
from data_tools import cli_args


@dataclass
class Report:
    records: int = 0
    skipped: int = 0  # lines / array entries that could not be read (each is an error above)
    issues: list[Issue] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(i.severity == severity for i in self.issues)


def validate_file(path: str, fields) -> Report:
    report = Report()
    seen: dict[str, str] = {}
    for item in iter_rows(path):
        if isinstance(item, Issue):
            report.issues.append(item)
            report.skipped += item.skipped
            continue
        report.records += 1
        errors, warnings = check_record(item.value, fields)
        report.issues += [Issue(item.location, m) for m in errors]
        report.issues += [Issue(item.location, m, "warning") for m in warnings]
        article = item.value.get("input") if isinstance(item.value, dict) else None
        if isinstance(article, str) and article.strip():
            key = normalize_name(article)
            if key in seen:
                report.issues.append(Issue(item.location, f"duplicate article (same text as {seen[key]})",
                                           "warning"))
            else:
                seen[key] = item.location
    if not report.records and not report.skipped and not report.count("error"):
        report.issues.append(Issue(str(path), "no records (an empty array)"))
    return report


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="record files (.json array, .jsonl, .csv)")
    p.add_argument("--max-shown", type=int, default=50, help="problems printed per file (default: 50)")
    cli_args.add_fields(p)


def run(args) -> int:
    failed = False
    for path in args.files:
        report = validate_file(path, args.fields)
        for issue in report.issues[:args.max_shown]:
            print(issue, file=sys.stderr if issue.severity == "error" else sys.stdout)
        hidden = len(report.issues) - args.max_shown
        if hidden > 0:
            print(f"... {hidden} more problem(s) not shown (--max-shown)")
        errors, warnings = report.count("error"), report.count("warning")
        status = "FAILED" if errors else "ok"
        skipped = f"; {report.skipped} unreadable entr{'y' if report.skipped == 1 else 'ies'} skipped" \
            if report.skipped else ""
        print(f"{path}: {status}: {report.records:,} records, {errors} error(s), {warnings} warning(s){skipped}")
        failed |= errors > 0
    return 1 if failed else 0
