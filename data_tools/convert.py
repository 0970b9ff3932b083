"""Convert between record files, chat `messages` JSONL and prompt/completion JSONL.

Reads: the user's records / alpaca (instruction, input, output; JSON, JSONL or
CSV), ShareGPT (`conversations` with from/value), chat `messages`, and TRL
prompt/completion rows. Writes: `records`, `messages` (what TRL and Axolotl's
`type: chat_template` read) or `prompt-completion` (TRL trains on the
completion only). The prompt text always comes from core.prompt.
Every output record is checked; an invalid one stops the conversion with its
location (nothing is dropped silently). The conversion itself is
core/formats.py.
"""

from __future__ import annotations

from core.formats import INPUT_FORMATS, OUTPUT_FORMATS, convert_rows
from core.records import read_rows, refuse_overwrite, write_rows
from data_tools import cli_args


def add_arguments(p) -> None:
    p.add_argument("input")
    p.add_argument("output", help="output file: .jsonl or .json (array)")
    p.add_argument("--to", choices=OUTPUT_FORMATS, required=True)
    p.add_argument("--from", dest="from_format", choices=INPUT_FORMATS, default="auto")
    cli_args.add_fields(p)
    cli_args.add_force(p)


def run(args) -> int:
    refuse_overwrite([args.output], args.force)
    rows = read_rows(args.input)  # BOM/CRLF: one warning, and the output is written clean
    out = convert_rows(rows, args.from_format, args.to, args.fields)
    write_rows(args.output, out)
    print(f"converted {len(out):,} records ({args.from_format} -> {args.to}): {args.input} -> {args.output}")
    return 0
