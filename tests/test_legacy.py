"""The legacy restore path: same losses as the new two-stage path, and as
reference values recorded earlier (so a change of shared code that alters
legacy behaviour fails here).

The reference belongs to the tiny dense model shipped in tiny/ (its weights'
and tokenizer's hash is stored with it). Regenerate it on purpose only, after
a rebuild of the tiny models:
    QWEN_FINETUNE_UPDATE_REFERENCE=1 .venv/bin/python -m pytest tests/test_legacy.py
"""

import hashlib
import json
import math
import os

from tiny import model_dir
from test_trainer import REPO, ok, summary, train

REFERENCE = REPO / "tests" / "reference" / "legacy_tiny_losses.json"
# A short legacy run: the frozen recipe (4-bit, micro-batch 1 x accumulation 16) on a few examples.
# The dense model: the committed reference belongs to it (the MoE's legacy run is checked against the new
# two-stage path by tests/test_parity.py's legacy pair).
ARGS = ["--preset", "tiny", "--backend", "hf", "model_name=tiny-dense", "max_train_samples=32", "max_steps=2", "eval_max_samples=4",
        "gen_eval=false", "logging_steps=1", "eval_steps=100", "save_steps=100", "max_length=640"]
# bf16 compute on CPU: identical on one machine, a little different across CPUs/thread counts.
REL_TOL = 5e-3


def test_legacy_matches_new_two_stage_and_the_committed_reference(tmp_path):
    ok(train(*ARGS, "output_dir=legacy", cwd=tmp_path, script="qwen_finetune_legacy.py"))
    legacy = {s: summary(tmp_path / "legacy", s) for s in ("stage1", "stage2")}
    for s in legacy.values():
        assert s["global_step"] == 2 and s["mode"] == "two-stage"
    frozen = (tmp_path / "legacy" / "stage1" / "config.yaml").read_text()
    assert "load_in_4bit: true" in frozen and "gradient_accumulation_steps: 16" in frozen
    assert "stage1_learning_rate: 0.0002" in frozen and "stage2_learning_rate: 0.0001" in frozen

    # the new script, given the legacy run's saved config, reproduces its losses exactly
    ok(train("--config", str(tmp_path / "legacy" / "stage1" / "config.yaml"), "output_dir=new",
             cwd=tmp_path))
    for stage in ("stage1", "stage2"):
        assert summary(tmp_path / "new", stage)["train_losses"] == legacy[stage]["train_losses"]

    observed = {"build": build_fingerprint(model_dir("tiny-dense")),
                **{s: legacy[s]["train_losses"] for s in legacy}}
    if os.environ.get("QWEN_FINETUNE_UPDATE_REFERENCE") == "1":
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(observed, indent=2) + "\n")
    reference = json.loads(REFERENCE.read_text())
    assert reference["build"] == observed["build"], "the reference belongs to another tiny build: see the docstring"
    for stage in ("stage1", "stage2"):
        for (step, loss), (ref_step, ref_loss) in zip(observed[stage], reference[stage], strict=True):
            assert step == ref_step and math.isclose(loss, ref_loss, rel_tol=REL_TOL), (stage, step, loss, ref_loss)


def build_fingerprint(model_dir) -> str:
    """The tiny build's identity: its weights and tokenizer, not just its recipe."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()[:16]
