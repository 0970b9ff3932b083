"""Check record files and report every problem with its location.

Errors (exit 1): unreadable or invalid JSON, truncated arrays, a top-level
object, BOM, CRLF line endings, invalid UTF-8, NaN/Infinity, missing or
non-string fields, an empty article, an `output` that is not JSON or not the
schema. Warnings (exit 0): a gold name that does not occur in the article,
duplicate articles, schema keys missing or extra, a non-integer age.
Locations are `file:line` for JSONL/CSV and `file:[index]` for JSON arrays.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from callbacks.metrics import normalize_name
from data_tools import cli_args
from data_tools.records import DataError, Issue, check_record, read_rows


@dataclass
class Report:
    records: int = 0
    issues: list[Issue] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(i.severity == severity for i in self.issues)


def validate_file(path: str, fields) -> Report:
    report = Report()
    try:
        rows = read_rows(path, report.issues)
    except DataError as e:
        location, _, message = str(e).partition(": ")  # messages start with their location
        report.issues.append(Issue(location, message))
        return report
    report.records = len(rows)
    seen: dict[str, str] = {}
    for row in rows:
        errors, warnings = check_record(row.value, fields)
        report.issues += [Issue(row.location, m) for m in errors]
        report.issues += [Issue(row.location, m, "warning") for m in warnings]
        article = row.value.get("input") if isinstance(row.value, dict) else None
        if isinstance(article, str) and article.strip():
            key = normalize_name(article)
            if key in seen:
                report.issues.append(Issue(row.location, f"duplicate article (same text as {seen[key]})",
                                           "warning"))
            else:
                seen[key] = row.location
    if not rows and not report.issues:
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
        print(f"{path}: {status}: {report.records:,} records, {errors} error(s), {warnings} warning(s)")
        failed |= errors > 0
    return 1 if failed else 0
