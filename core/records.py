"""Reading and writing record files with located, readable errors.

A record is the user's format: ``{"instruction": str, "input": str, "output": str}``
where ``output`` is a JSON string ``{"offenders": [...]}``. Optional keys:
``id`` (article id) and ``source`` (positive / negative / rehearsal).

Files are a JSON array (``.json``) or JSON Lines (``.jsonl``); CSV is read too.
``iter_rows`` is the one reader that decides what a file holds: every other
reader (``read_rows``, ``load_records``, `validate`, `convert`, `prepare`,
`stats`, the trainer) goes through it, so none can disagree about what is
valid. Every problem carries a location: ``file:[index]`` for an array,
``file:line`` for JSONL/CSV.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from core.errors import DataError
from core.metrics import DEFAULT_FIELDS, NonFiniteJSONError, loads_strict, normalize_name, reject_constant

REQUIRED_KEYS = ("instruction", "input", "output")
# Kept through every conversion: the evaluator breaks metrics down by source and shape, and scores
# non-offender extraction where a record lists its article's non-offenders.
OPTIONAL_KEYS = ("id", "source", "shape", "non_offenders")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BOM = b"\xef\xbb\xbf"
BOM_WARNING = "UTF-8 byte-order mark (BOM) at the start; read without it"
CRLF_WARNING = "Windows line endings (CRLF); read as plain newlines"
_NON_FINITE_HINT = "JSON has no NaN/Infinity, write null or a number"


@dataclass(frozen=True)
class Issue:
    """A located problem. ``error``: the file is invalid; ``warning``: read anyway;
    ``note``: context for the problems above it (what could not be checked).
    ``skipped``: this problem made one line / array element unreadable, so it
    yields no row (validate counts these)."""

    location: str
    message: str
    severity: str = "error"
    skipped: bool = False

    def __str__(self) -> str:
        return f"{self.severity}: {self.location}: {self.message}"


@dataclass
class Row:
    location: str
    value: Any


def _line_of(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _array_rows(path: Path, text: str, start: int) -> Iterator[Row | Issue]:
    """A JSON array, element by element. A record with NaN/Infinity is reported and
    skipped; a syntax error ends the reading (nothing after it can be parsed)."""
    strict = json.JSONDecoder(parse_constant=reject_constant)
    lenient = json.JSONDecoder()  # finds the end of a record holding NaN, to go on after it
    end = len(text)
    read = index = 0

    def cut_short() -> Issue:
        return Issue(str(path), "the JSON array cannot be parsed past a syntax error, so nothing after it "
                     f"was checked ({read} record(s) before it were); fix it and run validate again", "note")

    pos = _skip_ws(text, start + 1)
    if pos < end and text[pos] == "]":
        rest = _skip_ws(text, pos + 1)
        if rest < end:
            line, col = _line_of(text, rest)
            yield Issue(f"{path}:{line}:{col}", "unexpected text after the closing ']'")
        return
    while True:
        where = f"[{index}]"
        if pos >= end:
            line, _ = _line_of(text, end)
            yield Issue(f"{path}:{line}", f"the JSON array ends abruptly after {read} complete records "
                        "(file truncated?); re-export or re-copy the file")
            return
        try:
            value, after = strict.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if _skip_ws(text, e.pos) >= end:
                yield Issue(f"{path}:{where}", f"the file ends inside record {where} after {read} complete "
                            "records (truncated?); re-export or re-copy the file")
                return
            line, col = _line_of(text, e.pos)
            yield Issue(f"{path}:{line}:{col}", f"record {where}: invalid JSON: {e.msg}")
            yield cut_short()
            return
        except NonFiniteJSONError as e:
            line, _ = _line_of(text, pos)
            yield Issue(f"{path}:{where} (line {line})", f"{e}; {_NON_FINITE_HINT}", skipped=True)
            try:
                _, after = lenient.raw_decode(text, pos)
            except json.JSONDecodeError as e2:  # NaN and broken syntax in one record
                line, col = _line_of(text, e2.pos)
                yield Issue(f"{path}:{line}:{col}", f"record {where}: invalid JSON: {e2.msg}")
                yield cut_short()
                return
        else:
            yield Row(f"{path}:{where}", value)
            read += 1
        index += 1
        pos = _skip_ws(text, after)
        if pos >= end:
            yield Issue(str(path), f"the JSON array is not closed after {index} records "
                        "(file truncated?); re-export or re-copy the file")
            return
        if text[pos] == "]":
            rest = _skip_ws(text, pos + 1)
            if rest < end:
                line, col = _line_of(text, rest)
                yield Issue(f"{path}:{line}:{col}", "unexpected text after the closing ']'")
            return
        if text[pos] != ",":
            line, col = _line_of(text, pos)
            yield Issue(f"{path}:{line}:{col}", f"expected ',' or ']' after record {where}")
            yield cut_short()
            return
        pos = _skip_ws(text, pos + 1)


def _jsonl_rows(path: Path, text: str) -> Iterator[Row | Issue]:
    """JSON Lines, line by line: a bad line is reported and skipped, the next lines are still read."""
    skipped = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = loads_strict(line)
        except json.JSONDecodeError as e:
            skipped += 1
            yield Issue(f"{path}:{lineno}:{e.colno}", f"invalid JSON: {e.msg}", skipped=True)
            continue
        except ValueError as e:
            skipped += 1
            yield Issue(f"{path}:{lineno}", f"{e}; {_NON_FINITE_HINT}", skipped=True)
            continue
        yield Row(f"{path}:{lineno}", value)
    if skipped:
        yield Issue(str(path), f"{skipped} line(s) could not be read as JSON and were skipped, so their "
                    "fields were not checked; each line of a JSON Lines file must be one complete record",
                    "note")


def _csv_rows(path: Path, text: str) -> Iterator[Row | Issue]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        for r in reader:
            yield Row(f"{path}:{reader.line_num}", dict(r))
    except csv.Error as e:
        yield Issue(f"{path}:{reader.line_num}", f"unreadable CSV: {e}; nothing after it was checked")


def _object_message(value: dict) -> str:
    keys = ", ".join(list(value)[:5]) + (", ..." if len(value) > 5 else "") if value else "none"
    lists = [k for k, v in value.items() if isinstance(v, list)]
    if lists and not any(k in value for k in REQUIRED_KEYS):
        fix = f"if the records are the array under '{lists[0]}', write that array alone as the file"
    else:
        fix = "wrap it in [...], or write one record per line and name the file .jsonl"
    return f"the top level is one JSON object (keys: {keys}), expected an array of records: {fix}"


def _top_level_object(path: Path, text: str, start: int) -> Issue | None:
    """The error for a file (starting with '{') that is one JSON object rather than
    JSON Lines; None when it reads as JSON Lines. One object on one line is a
    one-record JSON Lines file only when the file is named .jsonl."""
    lenient = json.JSONDecoder()  # NaN allowed: only the shape matters here
    jsonl_name = path.suffix.lower() in JSONL_SUFFIXES
    try:
        value, end = lenient.raw_decode(text, start)
    except json.JSONDecodeError:
        value, end = None, start
    if isinstance(value, dict) and not text[end:].strip():
        if jsonl_name and "\n" not in text[start:end]:
            return None
        return Issue(str(path), _object_message(value))
    if value is None and not jsonl_name:
        first_line = text[start:].split("\n", 1)[0].rstrip()
        try:
            lenient.raw_decode(first_line)
        except json.JSONDecodeError as e:
            if e.pos >= len(first_line):  # the first line ends before its object does
                return Issue(str(path), "the top level is one JSON object spread over several lines, expected "
                             "an array of records: wrap it in [...], or write one record per line and name "
                             "the file .jsonl")
    return None


def iter_rows(path: str | os.PathLike) -> Iterator[Row | Issue]:
    """THE reader: decides what a record file holds and yields, in file order, a
    located ``Row`` per record read and a located ``Issue`` per problem.

    A BOM or CRLF line endings give one warning and are read anyway. JSONL and
    NaN records in an array are read past (the bad entry is an error with
    ``skipped=True``); anything else that stops the reading is an error,
    followed by a note when part of the file could not be checked. `validate`
    shows everything; ``read_rows`` raises at the first error.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        yield Issue(str(path), "file not found")
        return
    except IsADirectoryError:
        yield Issue(str(path), "is a directory, expected a data file")
        return
    except OSError as e:
        yield Issue(str(path), f"cannot read the file: {e.strerror or e}")
        return
    if data.startswith(_BOM):
        yield Issue(str(path), BOM_WARNING, "warning")
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield Issue(f"{path}:{line}", f"invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}). "
                    "The file is probably Shift_JIS/CP932; convert it with "
                    f"`iconv -f CP932 -t UTF-8 {path} > fixed.json`")
        yield Issue(str(path), "the file cannot be decoded, so none of its records was checked", "note")
        return
    if "\r\n" in text:
        yield Issue(str(path), CRLF_WARNING, "warning")
        text = text.replace("\r\n", "\n")
    stripped = text.lstrip()
    if not stripped:
        yield Issue(str(path), "the file is empty; expected a JSON array or JSONL records")
        return
    start = len(text) - len(stripped)
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, text)
    elif stripped[0] == "[":
        yield from _array_rows(path, text, start)
    elif stripped[0] == "{":
        problem = _top_level_object(path, text, start)
        if problem:
            yield problem
        else:
            yield from _jsonl_rows(path, text)
    else:
        line, col = _line_of(text, start)
        yield Issue(f"{path}:{line}:{col}", "not JSON records: expected '[' (JSON array) or "
                    "'{' (JSON Lines) at the start")


def read_rows(path: str | os.PathLike, issues: list[Issue] | None = None) -> list[Row]:
    """``iter_rows``, fail-fast: the first error raises DataError (the same
    ``location: message`` text `validate` prints). Warnings (BOM, CRLF) go to
    ``issues`` when given, else to stderr as ``warning: location: message``."""
    rows = []
    for item in iter_rows(path):
        if isinstance(item, Row):
            rows.append(item)
        elif item.severity == "error":
            raise DataError(f"{item.location}: {item.message}")
        elif item.severity == "warning":
            if issues is None:
                print(item, file=sys.stderr)
            else:
                issues.append(item)
    return rows


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def parse_output(output: str, fields: Sequence[str] = DEFAULT_FIELDS) -> tuple[list[dict] | None, list[str], list[str]]:
    """Parse a gold ``output`` string: (offenders or None, errors, warnings)."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        obj = loads_strict(output)
    except json.JSONDecodeError as e:
        return None, [f"'output' is not valid JSON ({e.msg} at char {e.pos})"], warnings
    except ValueError as e:
        return None, [f"'output' contains {e}"], warnings
    if not isinstance(obj, dict) or not isinstance(obj.get("offenders"), list):
        return None, ["'output' must be a JSON object with an 'offenders' list, "
                      "e.g. {\"offenders\": []}"], warnings
    offenders = obj["offenders"]
    for i, o in enumerate(offenders):
        if not isinstance(o, dict):
            errors.append(f"'output' offenders[{i}] is a {_type_name(o)}, expected an object")
            continue
        name = o.get("name")
        if not isinstance(name, str) or not name.strip():
            errors.append(f"'output' offenders[{i}] has no name (a non-empty string is required)")
        if "age" in o and o["age"] is not None and not (isinstance(o["age"], int) and not isinstance(o["age"], bool)):
            warnings.append(f"'output' offenders[{i}].age is {o['age']!r}; expected an integer or null")
        unknown = [k for k in o if k not in fields]
        if unknown:
            warnings.append(f"'output' offenders[{i}] has keys outside the schema {list(fields)}: "
                            f"{unknown} (ignored by the metrics)")
        missing = [k for k in fields if k not in o]
        if missing:
            warnings.append(f"'output' offenders[{i}] lacks {missing} (write null when unknown)")
    return (None if errors else offenders), errors, warnings


def check_record(value: Any, fields: Sequence[str] = DEFAULT_FIELDS) -> tuple[list[str], list[str]]:
    """Errors and warnings of one record (no cross-record checks)."""
    if not isinstance(value, dict):
        return [f"record is a {_type_name(value)}, expected an object with "
                f"{', '.join(REQUIRED_KEYS)}"], []
    errors, warnings = [], []
    for key in REQUIRED_KEYS:
        if key not in value:
            errors.append(f"missing field '{key}'")
        elif not isinstance(value[key], str):
            errors.append(f"field '{key}' must be a string, got {_type_name(value[key])}")
    if errors:
        return errors, warnings
    if not value["input"].strip():
        errors.append("'input' (the article) is empty")
    offenders, out_errors, out_warnings = parse_output(value["output"], fields)
    errors += out_errors
    warnings += out_warnings
    if offenders and value["input"].strip():
        article = normalize_name(value["input"])
        for o in offenders:
            if normalize_name(o.get("name")) not in article:
                warnings.append(f"gold name {o.get('name')!r} does not occur in the article")
    return errors, warnings


def load_records(path: str | os.PathLike, fields: Sequence[str] = DEFAULT_FIELDS,
                 max_shown: int = 10) -> list[dict]:
    """Load and check a record file for training: fail-fast through ``read_rows``
    (the first unreadable spot raises), then any invalid record is a DataError
    listing them. BOM/CRLF are read with one warning on stderr, as everywhere."""
    rows = read_rows(path)
    problems = []
    for row in rows:
        errors, _ = check_record(row.value, fields)
        problems += [f"{row.location}: {e}" for e in errors]
    if problems:
        shown = "\n  ".join(problems[:max_shown])
        more = f"\n  ... and {len(problems) - max_shown} more" if len(problems) > max_shown else ""
        raise DataError(f"{path}: {len(problems)} invalid record(s):\n  {shown}{more}\n"
                        f"Run `python -m data_tools validate {path}` for the full report.")
    return [row.value for row in rows]


def gold_offenders(record: dict) -> list[dict]:
    return json.loads(record["output"])["offenders"]


def is_positive(record: dict) -> bool:
    return bool(gold_offenders(record))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seeded_subset(records: list[dict], limit: int, seed: int) -> list[dict]:
    """A fixed-seed random subset of `limit` records, original order kept; all when limit <= 0."""
    if limit <= 0 or limit >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def load_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; a missing or malformed file is a located DataError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: line {e.lineno}: {e.msg}") from None


def dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def atomic_write_text(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """Write to a temp file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_dir(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """The folder `source` (written aside, complete) becomes `target`; an old `target` is moved aside first
    and removed last, so a crash leaves one whole folder, never a half-copied one."""
    source, target = Path(source), Path(target)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _json_array_chunks(values: Sequence[Any]) -> Iterator[str]:
    yield "[\n"
    for i, v in enumerate(values):
        yield dump_json(v) + (",\n" if i < len(values) - 1 else "\n")
    yield "]\n"


def write_rows(path: str | os.PathLike, values: Sequence[Any]) -> None:
    """Atomically write a ``.json`` array or ``.jsonl`` file (chosen by suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        atomic_write_text(path, (dump_json(v) + "\n" for v in values))
    elif suffix == ".json":
        atomic_write_text(path, _json_array_chunks(values))
    else:
        raise DataError(f"{path}: unknown output format '{suffix}': use .json (array) or .jsonl")


def refuse_overwrite(paths: Iterable[str | os.PathLike], force: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise DataError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
