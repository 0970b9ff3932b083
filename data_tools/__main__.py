"""`python -m data_tools <command>`: one sub-command per module."""

from __future__ import annotations

import argparse
import sys

from core.errors import UserError
from data_tools import axolotl_data, convert, prepare, split, stats, synth, validate

COMMANDS = {
    "synth": synth,
    "prepare": prepare,
    "validate": validate,
    "convert": convert,
    "split": split,
    "stats": stats,
    "axolotl-data": axolotl_data,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary = module.__doc__.strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
