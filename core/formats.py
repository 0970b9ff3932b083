"""The input formats a record file may come in, and the conversion between them and the user's records.

Reads: records / alpaca (instruction, input, output; JSON, JSONL or CSV), ShareGPT (`conversations`
with from/value), chat `messages`, and TRL prompt/completion rows. Writes: `records`, `messages` (what
TRL and Axolotl's `type: chat_template` read) or `prompt-completion`. The prompt text always comes from
core.prompt. Every output record is checked; an invalid one stops the conversion with its location
(nothing is dropped silently). The optional keys (`id`, `source`, `shape`, `non_offenders`) are carried
over. `data_tools convert` is the command line over this; the evaluator and the Axolotl plugins read
any format through `load_any_records`.
"""

from __future__ import annotations

from core.prompt import messages_to_record, record_messages, record_prompt_completion
from core.records import OPTIONAL_KEYS, DataError, check_record, read_rows

INPUT_FORMATS = ("auto", "records", "sharegpt", "messages", "prompt-completion")
OUTPUT_FORMATS = ("records", "messages", "prompt-completion")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def detect_format(row: dict) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    return "records"


def to_record(row: dict, fmt: str) -> dict:
    """A user record from one input row (raises ValueError with what is wrong)."""
    if fmt == "records":
        missing = [k for k in ("instruction", "output") if k not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        # alpaca rows may omit input
        record = {"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]}
    elif fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list")
        messages = []
        for t in turns:
            role = _SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None:
                raise ValueError(f"unknown ShareGPT turn {t!r}; expected from: human/gpt/system")
            messages.append({"role": role, "content": t.get("value")})
        record = messages_to_record(messages)
    elif fmt == "messages":
        record = messages_to_record(row["messages"])
    else:
        record = messages_to_record(list(row["prompt"]) + list(row["completion"]))
    record.update({k: row[k] for k in OPTIONAL_KEYS if k in row})
    return record


def from_record(record: dict, fmt: str) -> dict:
    extra = {k: record[k] for k in OPTIONAL_KEYS if k in record}
    if fmt == "messages":
        return {"messages": record_messages(record), **extra}
    if fmt == "prompt-completion":
        return {**record_prompt_completion(record), **extra}
    return {k: record[k] for k in ("instruction", "input", "output")} | extra


def convert_rows(rows, in_fmt: str, out_fmt: str, fields) -> list[dict]:
    out, problems = [], []
    for row in rows:
        if not isinstance(row.value, dict):
            problems.append(f"{row.location}: expected an object")
            continue
        fmt = detect_format(row.value) if in_fmt == "auto" else in_fmt
        try:
            record = to_record(row.value, fmt)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{row.location}: not a valid {fmt} row: {e}")
            continue
        errors, _ = check_record(record, fields)
        if errors:
            problems.append(f"{row.location}: {'; '.join(errors)}")
            continue
        out.append(from_record(record, out_fmt))
    if problems:
        shown = "\n  ".join(problems[:10])
        raise DataError(f"{len(problems)} row(s) cannot be converted (nothing was written):\n  {shown}"
                        + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return out


def load_any_records(path, fields) -> list[dict]:
    """Records (with id/source) from a file in any input format, e.g. a `messages` export."""
    return convert_rows(read_rows(path), "auto", "records", fields)
