"""Keep secrets out of logs: tokens, passwords in URIs, anything named like a key.

Pure stdlib (imported by the MLflow logger in every stack).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_WORD = re.compile(r"(^|[_.\-])(token|secret|password|passwd|pwd|credentials?|auth)($|[_.\-])"
                          r"|(api|access|secret|private)[_\-]?key", re.IGNORECASE)
_NOT_SECRET_SUFFIX = ("_id", "_ids", "_len", "_length", "_size", "_count")
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.IGNORECASE)
# Values that are credentials whatever they are called (Hugging Face, OpenAI-style, AWS keys).
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|AKIA[0-9A-Z]{16})\b")


def is_secret_name(name: str) -> bool:
    """hub_token, MLFLOW_TRACKING_PASSWORD, api_key: yes; pad_token_id, max_new_tokens: no."""
    return bool(_SECRET_WORD.search(name)) and not name.lower().endswith(_NOT_SECRET_SUFFIX)


def redact_text(text: str) -> str:
    text = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, name: str = "") -> Any:
    """A copy of `value` (nested dicts/lists/strings) with secrets replaced."""
    if name and is_secret_name(name) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
