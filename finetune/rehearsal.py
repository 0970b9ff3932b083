"""General data: rehearsal examples mixed into training, and a held-out part to measure forgetting.

A general file is either plain text (`.txt`: one document per line; JSON/JSONL
rows with a `text` field), trained on every token, or instruction data in any
format `data_tools convert` reads (records, alpaca, ShareGPT, messages,
prompt/completion), trained on the answer like the task. Instruction rows need
not be offender extraction, so only their shape is checked.

`rehearsal_ratio` r is the share of training examples drawn from the file:
n_rehearsal = round(r / (1 - r) * n_task). The draw is seeded; a file smaller
than that is cycled through (each pass reshuffled) and the repeat is reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from core.records import DataError, read_rows

SOURCE = "rehearsal"


@dataclass
class GeneralData:
    path: str
    kind: str  # "text" or "records"
    items: list  # documents (str) or records (dict)
    skipped_empty: int = 0


def load_general(path: str) -> GeneralData:
    """Read a general-data file; a malformed row stops with its location, empty documents are counted."""
    if Path(path).suffix.lower() == ".txt":
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        docs = [line.strip() for line in lines]
        data = GeneralData(path, "text", [d for d in docs if d], skipped_empty=sum(not d for d in docs))
    else:
        data = _load_rows(path)
    if not data.items:
        raise DataError(f"{path}: no usable documents (empty: {data.skipped_empty})")
    return data


def _load_rows(path: str) -> GeneralData:
    from core.formats import detect_format, to_record

    rows = read_rows(path)
    kind = "text" if isinstance(rows[0].value, dict) and "text" in rows[0].value else "records"
    items, problems, empty = [], [], 0
    for row in rows:
        value = row.value
        if not isinstance(value, dict):
            problems.append(f"{row.location}: expected an object")
        elif kind == "text":
            text = value.get("text")
            if not isinstance(text, str):
                problems.append(f"{row.location}: expected a string 'text' field like the first row")
            elif text.strip():
                items.append(text)
            else:
                empty += 1
        else:
            try:
                record = to_record(value, detect_format(value))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problems.append(f"{row.location}: not an instruction row nor a 'text' row: {e}")
                continue
            if not all(isinstance(record.get(k), str) for k in ("instruction", "input", "output")) \
                    or not record["output"].strip():
                problems.append(f"{row.location}: instruction, input and output must be strings, "
                                "output non-empty")
                continue
            items.append({**record, "source": SOURCE})
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{path}: {len(problems)} row(s) cannot be used as general data:\n  {shown}{more}")
    return GeneralData(path, kind, items, skipped_empty=empty)


def split_heldout(data: GeneralData, samples: int, seed: int) -> tuple[list, list]:
    """(training pool, held-out items): at most `samples`, and at most a fifth of the file, held out."""
    order = list(range(len(data.items)))
    random.Random(f"{seed}:heldout").shuffle(order)
    n = min(samples, len(order) // 5)
    held = sorted(order[:n])
    held_set = set(held)
    return [x for i, x in enumerate(data.items) if i not in held_set], [data.items[i] for i in held]


def rehearsal_count(n_task: int, ratio: float) -> int:
    return round(ratio / (1 - ratio) * n_task) if ratio > 0 else 0


def draw(pool: list, n: int, seed: int) -> list:
    """`n` items from `pool`, seeded, without repeats until the pool is used up."""
    rng = random.Random(f"{seed}:rehearsal")
    out: list = []
    while len(out) < n and pool:
        order = list(range(len(pool)))
        rng.shuffle(order)
        out.extend(pool[i] for i in order[:n - len(out)])
    return out


def document_end_id(tokenizer) -> int:
    """Plain documents end as in Qwen pre-training, with <|endoftext|> (the eos token otherwise)."""
    token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else tokenizer.eos_token_id


def text_rows(docs: list[str], tokenizer, max_length: int) -> list[dict]:
    """Pre-tokenised rows that train on every token (cut at max_length, like the task rows)."""
    end = document_end_id(tokenizer)
    rows = []
    for doc in docs:
        ids = (tokenizer(doc, add_special_tokens=False)["input_ids"] + [end])[:max_length]
        rows.append({"input_ids": ids, "labels": list(ids), "source": SOURCE})
    return rows


@dataclass
class GeneralPlan:
    """What one stage mixes in and what it measures forgetting on."""
    kind: str  # of the rehearsal examples: "text" or "records"
    examples: list  # rehearsal documents or records to train on
    heldout_kind: str
    heldout: list
    report: dict


def plan_general(rehearsal_data: str | GeneralData, ratio: float, general_eval_file: str | GeneralData,
                 eval_samples: int, n_task: int, seed: int) -> GeneralPlan | None:
    """Each source a path ("" for none) or the file already read (the run reads each once, at its check)."""
    if not rehearsal_data and not general_eval_file:
        return None
    data = _read(rehearsal_data)
    pool, heldout, heldout_kind = (data.items if data else []), [], "text"
    if general_eval_file:
        general = _read(general_eval_file)
        heldout, heldout_kind = general.items[:eval_samples], general.kind
    elif data is not None:
        pool, heldout = split_heldout(data, eval_samples, seed)
        heldout_kind = data.kind
    wanted = rehearsal_count(n_task, ratio)
    examples = draw(pool, wanted, seed)
    report = {"file": data.path if data else None, "kind": data.kind if data else None, "ratio": ratio,
              "examples": len(examples), "task_examples": n_task,
              "share": round(len(examples) / max(n_task + len(examples), 1), 4),
              "pool": len(pool), "passes_over_pool": round(len(examples) / len(pool), 2) if pool else 0,
              "skipped_empty_documents": data.skipped_empty if data else 0,
              "heldout_file": general.path if general_eval_file else data.path, "heldout_examples": len(heldout)}
    return GeneralPlan(data.kind if data else "text", examples, heldout_kind, heldout, report)


def _read(source: str | GeneralData) -> GeneralData | None:
    return source if isinstance(source, GeneralData) or not source else load_general(source)
