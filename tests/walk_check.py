"""Run the trainer's command line in this process and record, at a few calls, which of this repository's
modules are on the stack: the records read from disk, tokenised, collated into a batch, and the call into
`trainer.train()`. Used by tests/test_walk.py; prints one JSON line.

    python tests/walk_check.py ARG...   (the arguments of qwen_finetune.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("core", "callbacks", "data_tools", "finetune")


def module_of(filename: str) -> str | None:
    """`finetune.data` for REPO/finetune/data.py; the script's name for a top-level script; None elsewhere."""
    path = Path(filename)
    if not path.is_relative_to(REPO) or path.parts[len(REPO.parts)] not in (*OURS, "qwen_finetune.py"):
        return None
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def our_modules(frame) -> list[str]:
    """The modules of this repository on the stack, outermost first, a module's consecutive frames as one."""
    chain = []
    while frame is not None:
        module = module_of(frame.f_code.co_filename)
        if module and (not chain or chain[-1] != module):
            chain.append(module)
        frame = frame.f_back
    return chain[::-1]


def main(args: list[str]) -> int:
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import core.records
    import data_tools.stats
    import finetune.data
    import finetune.rehearsal
    from finetune import cli
    from finetune.collate import PackedRowsCollator

    watched = {core.records.load_records.__code__: "read", finetune.rehearsal.load_general.__code__: "read",
               finetune.data.record_rows.__code__: "tokenise",
               data_tools.stats.token_lengths.__code__: "tokenise",
               DataCollatorForLanguageModeling.torch_call.__code__: "batch",
               PackedRowsCollator.torch_call.__code__: "batch",
               transformers.Trainer.train.__code__: "train"}
    stacks: dict[str, list[list[str]]] = {name: [] for name in set(watched.values())}
    reads: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            name = watched[frame.f_code]
            chain = our_modules(frame if name != "train" else frame.f_back)
            if chain not in stacks[name]:
                stacks[name].append(chain)
            if name == "read":
                reads.append(str(frame.f_locals.get("path")))

    sys.setprofile(profile)
    try:
        code = cli.main(args, "qwen_finetune.py", "")
    finally:
        sys.setprofile(None)
    print(json.dumps({"rc": code, "stacks": stacks, "reads": reads}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
