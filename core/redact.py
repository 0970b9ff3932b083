"""Keep secrets out of logs: tokens, passwords in URIs, anything named like a key.

Pure stdlib (imported by the MLflow logger in every stack).

The rule for names (`is_secret_name`), at any nesting depth: a name is split
into words (at `_`, `-`, `.`, spaces and camelCase: `hfToken` -> hf, token;
`API_KEY` -> api, key) and its LAST word decides. It is a secret when that word
is `key`, `token`, `password`/`passwd`/`pwd`/`passphrase`, `secret(s)`,
`credential(s)` or `auth`, or a compound of them (`apikey`, `accesstoken`, ...):
`encryption_key`, `db_key`, `API_KEY`, `hf_token`, `access_token`,
`MLFLOW_TRACKING_PASSWORD`, `aws_secret_access_key` are redacted.

Decisions, so that a normal run's params stay readable:
- only the last word counts: `keyword`, `monkey`, `tokenizer` (one word that is
  not a secret word) and `token_lengths`, `pad_token_id`, `api_key_file`,
  `hf_token_path` (the last word is a count, an id or a path) are kept;
- `tokens`/`keys` in the plural are counts or lists of names, not secrets:
  `max_new_tokens`, `num_tokens`, `max_tokens`, `ignore_keys` are kept;
  `secrets`/`credentials` in the plural are redacted;
- a tokenizer's special tokens (`pad_token`, `eos_token`, ... in Axolotl's
  resolved config) are text like "<|im_end|>", not secrets: kept;
- booleans are never secrets (`hf_use_auth_token: true` stays `true`);
  None and empty values are kept as they are.
Values are also checked whatever their name: passwords in URIs
(`scheme://user:PASSWORD@host`), secret-named query or connection-string
parameters (`?token=...`, `;AccountKey=...`) and credential-shaped strings
(Hugging Face `hf_...`, `sk-...`, AWS `AKIA...`).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SECRET_LAST_WORDS = frozenset({
    "key", "token", "password", "passwd", "pwd", "passphrase", "secret", "secrets", "credential",
    "credentials", "auth",
    # compounds written as one word
    "apikey", "accesskey", "secretkey", "privatekey", "authkey", "accesstoken", "authtoken", "apitoken",
    "refreshtoken", "bearertoken",
})
# A tokenizer's special tokens: `pad_token: "<|endoftext|>"` is configuration, not a credential.
_SPECIAL_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask"})
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.IGNORECASE)
# name=value after ? & or ; (URI query strings, connection strings); redacted when the name is a secret's
_PARAMETER = re.compile(r"(?P<pre>[?&;])(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)=(?P<value>[^&;#\s]+)")
# Values that are credentials whatever they are called (Hugging Face, OpenAI-style, AWS keys).
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|AKIA[0-9A-Z]{16})\b")


def is_secret_name(name: str) -> bool:
    """hub_token, MLFLOW_TRACKING_PASSWORD, api_key, encryption_key: yes; pad_token_id, max_new_tokens,
    keyword, monkey: no (the module docstring has the rule)."""
    words = [w.lower() for w in _WORD.findall(str(name))]
    if not words or words[-1] not in _SECRET_LAST_WORDS:
        return False
    return not (words[-1] == "token" and len(words) > 1 and words[-2] in _SPECIAL_TOKEN_WORDS)


def redact_text(text: str) -> str:
    text = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _PARAMETER.sub(lambda m: f"{m['pre']}{m['name']}={REDACTED}" if is_secret_name(m["name"]) else m[0],
                          text)
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, name: str = "") -> Any:
    """A copy of `value` (nested dicts/lists/strings) with secrets replaced."""
    if (name and is_secret_name(name) and value not in (None, "", [], {})
            and not isinstance(value, bool)):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
