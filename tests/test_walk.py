"""The trainer's walk, followed in a real run (tests/walk_check.py records which of our modules are on the
stack): from the command line to `trainer.train()`, and a record from disk to a batch, no module is
entered twice, every file is read once for the whole run (two stages and the rehearsal data included), and
records are tokenised on one path."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = ["finetune.cli", "finetune.pipeline"]


def walk(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "walk_check.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, done.stderr[-3000:]
    return result


def test_a_record_reaches_a_batch_through_each_module_once(tmp_path):
    (tmp_path / "general.txt").write_text("一般の文書です。\n二つ目の文書。\n三つ目の文書です。\n四つ目。\n",
                                          encoding="utf-8")
    # two stages (each reads its file and the rehearsal pool), packed rows side by side (our collator)
    result = walk(tmp_path, "--mode", "two-stage", "--backend", "hf", "output_dir=out", "max_train_samples=16",
                  "max_steps=1", "save_steps=1", "eval_file=", "gen_eval=false", "best_metric=",
                  "rehearsal_data=general.txt", "rehearsal_ratio=0.2", "general_eval_samples=1", "packing=true",
                  "attn_implementation=sdpa")
    stacks = result["stacks"]
    for name, chains in stacks.items():
        for chain in chains:
            assert len(set(chain)) == len(chain), f"{name}: a module entered twice: {chain}"
            assert chain[:2] == ENTRY, chain
    assert stacks["train"] == [ENTRY]  # the recipe calls trainer.train() itself
    # one tokenisation path for records: the token-length report comes from it, not from a second pass
    # (data_tools.stats.token_lengths, which the dry run uses on a sample)
    assert stacks["tokenise"] == [ENTRY + ["finetune.data"]]
    assert sorted(stacks["read"]) == [ENTRY + ["finetune.checks", "core.records"],
                                      ENTRY + ["finetune.checks", "finetune.rehearsal"]]
    assert stacks["batch"] == [ENTRY + ["finetune.collate"]]
    # read once for the whole run: both stages' files and the rehearsal pool, each a single time
    assert sorted(result["reads"]) == ["data/tiny/hawks_train.json", "data/tiny/hawks_train_curriculum.json",
                                       "general.txt"]
