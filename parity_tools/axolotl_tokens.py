"""Axolotl's tokenisation of the first N training examples. Runs in Axolotl's environment.

    <axolotl-venv>/bin/python -m parity_tools.axolotl_tokens CONFIG.yml N OUT.json [--key=value ...]

Loads the config and the training set through Axolotl's own code
(`load_cfg`, `load_datasets`: its chat_template strategy, masking and
filters), in file order (shuffling off), and writes
[{"input_ids": [...], "labels": [...]}, ...] for `parity.py tokens`.
"""

from __future__ import annotations

import contextlib
import json
import sys


def main() -> int:
    config, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    overrides = {}
    for item in sys.argv[4:]:
        key, _, value = item.lstrip("-").partition("=")
        overrides[key] = value
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets

    # Shuffling would reorder the examples; the comparison is by position. The launcher (DeepSpeed, not in
    # this environment) does not touch tokenisation: left out, so a GPU config tokenises here too.
    with contextlib.redirect_stdout(sys.stderr):
        cfg = load_cfg(config, shuffle_merged_datasets=False, shuffle_before_merging_datasets=False,
                       **{"deepspeed": None, **overrides})
        train = load_datasets(cfg=cfg).train_dataset
    rows = [{"input_ids": list(train[i]["input_ids"]), "labels": list(train[i]["labels"])}
            for i in range(min(n, len(train)))]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "total": len(train)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
