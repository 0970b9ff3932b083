"""The one prompt builder: how a record becomes chat messages.

Every stack (our trainer, Axolotl via the `messages` export, the evaluator)
formats through here, so they see the same text by construction. The chat
template that turns messages into tokens is the tokenizer's own.

Layout: the record's instruction is the system message, the article is the
user message, the gold JSON is the assistant message. A record with an empty
``input`` puts the instruction in the user message instead (alpaca style).
Pure stdlib: Axolotl's environment imports it.
"""

from __future__ import annotations

import json
from typing import Sequence

from core.metrics import DEFAULT_FIELDS

# Qwen3-2507-Instruct style (no thinking block, one turn per message): the tiny models' own template,
# and `chat_template=qwen3_2507` for a model without one.
QWEN3_2507_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_FIELD_DESCRIPTIONS = {
    "name": "氏名",
    "age": "年齢（数値）",
    "occupation": "職業",
    "address": "住所",
    "charge": "容疑・罪名",
}


def default_instruction(fields: Sequence[str] = DEFAULT_FIELDS) -> str:
    """The task instruction written into synthetic records."""
    shape = ", ".join(f'"{f}": {_FIELD_DESCRIPTIONS.get(f, f)}' for f in fields)
    return (
        "次のニュース記事から加害者（容疑者・被告など、罪を犯したとされる人物）を抽出し、"
        "JSONだけで答えてください。形式: {\"offenders\": [{" + shape + "}]}。"
        "記事にない項目はnull。被害者・目撃者・関係者は含めず、"
        "加害者の名前が記事にない場合は {\"offenders\": []} と答えてください。"
    )


def prompt_messages(instruction: str, article: str) -> list[dict]:
    if not article:
        return [{"role": "user", "content": instruction}]
    return [{"role": "system", "content": instruction}, {"role": "user", "content": article}]


def record_messages(record: dict, with_answer: bool = True) -> list[dict]:
    messages = prompt_messages(record["instruction"], record["input"])
    if with_answer:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def record_prompt_completion(record: dict) -> dict:
    """TRL's prompt/completion row: the loss falls on the completion only."""
    return {
        "prompt": prompt_messages(record["instruction"], record["input"]),
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


def messages_to_record(messages: Sequence[dict]) -> dict:
    """Inverse of ``record_messages`` (for chat files made elsewhere)."""
    by_role: dict[str, list[str]] = {}
    for m in messages:
        by_role.setdefault(m.get("role"), []).append(m.get("content"))
    users, answers = by_role.get("user", []), by_role.get("assistant", [])
    if len(users) != 1 or len(answers) != 1:
        raise ValueError(f"expected one user and one assistant message, got "
                         f"{len(users)} user and {len(answers)} assistant")
    systems = by_role.get("system", [])
    if systems:
        return {"instruction": systems[0], "input": users[0], "output": answers[0]}
    return {"instruction": users[0], "input": "", "output": answers[0]}


def answer_json(offenders: list[dict]) -> str:
    """The canonical answer text for a list of offenders."""
    return json.dumps({"offenders": offenders}, ensure_ascii=False)
