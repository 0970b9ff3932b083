"""Reading and writing record files with located, readable errors.

A record is the user's format: ``{"instruction": str, "input": str, "output": str}``
where ``output`` is a JSON string ``{"offenders": [...]}``. Optional keys:
``id`` (article id) and ``source`` (positive / negative / rehearsal).

Files are a JSON array (``.json``) or JSON Lines (``.jsonl``); ``read_rows``
also reads CSV. Every problem carries a location: ``file:[index]`` for an
array, ``file:line`` for JSONL/CSV.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from callbacks.metrics import DEFAULT_FIELDS, NonFiniteJSONError, loads_strict, normalize_name, reject_constant

REQUIRED_KEYS = ("instruction", "input", "output")
OPTIONAL_KEYS = ("id", "source")
_BOM = b"\xef\xbb\xbf"


class DataError(Exception):
    """A problem with the user's input: printed as a message, never a traceback."""


@dataclass(frozen=True)
class Issue:
    location: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"


@dataclass
class Row:
    location: str
    value: Any


def _line_of(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _decode(path: Path, data: bytes, issues: list[Issue]) -> str:
    if data.startswith(_BOM):
        issues.append(Issue(f"{path}:1", "starts with a UTF-8 byte-order mark (BOM); many JSON "
                            "readers reject it. Re-save as UTF-8 without BOM, or run "
                            "`python -m data_tools convert` which writes clean files"))
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}). "
            "The file is probably Shift_JIS/CP932; convert it with "
            f"`iconv -f CP932 -t UTF-8 {path} > fixed.json`") from None
    if "\r\n" in text:
        line, _ = _line_of(text, text.index("\r\n"))
        issues.append(Issue(f"{path}:{line}", "Windows (CRLF) line endings; convert with "
                            "`dos2unix` or `python -m data_tools convert`"))
        text = text.replace("\r\n", "\n")
    return text


def _json_error(path: Path, where: str, text: str, e: json.JSONDecodeError) -> DataError:
    line, col = _line_of(text, e.pos)
    return DataError(f"{path}:{line}:{col}: {where}invalid JSON: {e.msg}")


def _parse_array(path: Path, text: str) -> list[Row]:
    decoder = json.JSONDecoder(parse_constant=reject_constant)
    rows: list[Row] = []
    pos = text.index("[") + 1
    end = len(text)

    def skip_ws(p: int) -> int:
        while p < end and text[p] in " \t\n\r":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < end and text[pos] == "]":
        return rows
    while True:
        where = f"[{len(rows)}]"
        if pos >= end:
            line, _ = _line_of(text, end)
            raise DataError(f"{path}:{line}: the JSON array ends abruptly after {len(rows)} "
                            "complete records (file truncated?); re-export or re-copy the file")
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if skip_ws(e.pos) >= end:
                raise DataError(f"{path}:{where}: the file ends inside record {where} "
                                f"after {len(rows)} complete records (truncated?); re-export "
                                "or re-copy the file") from None
            raise _json_error(path, f"record {where}: ", text, e) from None
        except NonFiniteJSONError as e:
            line, _ = _line_of(text, pos)
            raise DataError(f"{path}:{where} (line {line}): {e}; JSON has no NaN/Infinity, "
                            "write null or a number") from None
        rows.append(Row(f"{path}:{where}", value))
        pos = skip_ws(pos)
        if pos >= end:
            raise DataError(f"{path}: the JSON array is not closed after {len(rows)} records "
                            "(file truncated?); re-export or re-copy the file")
        if text[pos] == "]":
            rest = skip_ws(pos + 1)
            if rest < end:
                line, col = _line_of(text, rest)
                raise DataError(f"{path}:{line}:{col}: unexpected text after the closing ']'")
            return rows
        if text[pos] != ",":
            line, col = _line_of(text, pos)
            raise DataError(f"{path}:{line}:{col}: expected ',' or ']' after record {where}")
        pos = skip_ws(pos + 1)


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = loads_strict(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}; JSON has no NaN/Infinity, "
                            "write null or a number") from None
        rows.append(Row(f"{path}:{lineno}", value))
    return rows


def _parse_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    return [Row(f"{path}:{reader.line_num}", dict(r)) for r in reader]


def read_rows(path: str | os.PathLike, issues: list[Issue] | None = None) -> list[Row]:
    """Parse a JSON array, JSONL or CSV file into located rows.

    Fatal problems raise DataError; fixable ones (BOM, CRLF) are appended to
    ``issues`` as errors and the content is read anyway.
    """
    path = Path(path)
    issues = [] if issues is None else issues
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    text = _decode(path, data, issues)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; expected a JSON array or JSONL records")
    if path.suffix.lower() == ".csv":
        return _parse_csv(path, text)
    if stripped[0] == "[":
        return _parse_array(path, text)
    if stripped[0] == "{":
        first_line = stripped.split("\n", 1)[0]
        try:
            loads_strict(first_line)
        except ValueError:
            try:
                whole = loads_strict(text)
            except ValueError:
                whole = None
            if isinstance(whole, dict):
                keys = ", ".join(list(whole)[:5])
                raise DataError(
                    f"{path}: the top level is one JSON object (keys: {keys}), not a list of "
                    "records; write a JSON array `[{...}, ...]` or JSONL (one record per line)"
                ) from None
        return _parse_jsonl(path, text)
    line, col = _line_of(text, len(text) - len(stripped))
    raise DataError(f"{path}:{line}:{col}: not JSON records: expected '[' (JSON array) or "
                    "'{' (JSON Lines) at the start")


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
    """Load and check a record file; any invalid record is a DataError listing them.

    BOM/CRLF are tolerated here (with a warning on stderr); `validate` is the
    strict linter.
    """
    import sys

    issues: list[Issue] = []
    rows = read_rows(path, issues)
    for issue in issues:
        print(f"warning: {issue.location}: {issue.message}", file=sys.stderr)
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
