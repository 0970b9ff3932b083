"""The legacy restore path's committed reference, and the separate command that updates it.

Two files in tests/reference/, both only read by the test (tests/test_parity.py):
- legacy_recipe.json, written by hand: every setting qwen_finetune_legacy.py freezes.
- legacy_tiny_moe_run.json, written by `update` below from a run of the legacy script on the tiny MoE
  and reviewed before it is committed: per stage and step the loss, learning rate, gradient norm and
  trained tokens, and a fingerprint of the final adapter.
  `update` refuses to write while the run's settings differ from the hand-written recipe.

    .venv/bin/python tests/legacy_reference.py update        # after a deliberate change (a rebuild of tiny/)
    .venv/bin/python tests/legacy_reference.py sensitivity   # how far each frozen setting moves the run
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "reference" / "legacy_recipe.json"
REFERENCE = REPO / "tests" / "reference" / "legacy_tiny_moe_run.json"

MODEL = "tiny-moe"
# Per stage: warm-up rounds 0.03 x 6 up to one step, run at learning rate 0; the other five train at the
# frozen rates, so the losses of steps 3-6 and the adapter carry the schedule, rates, LoRA shape and batch.
STEPS = 6
TRAIN_SAMPLES = 96  # STEPS x the frozen batch of 16
# bf16 on CPU: this machine repeats the run bit for bit (with 1 or 2 threads); another CPU rounds a little
# differently, so losses, gradient norms (logged in bf16: steps of 0.4%) and the adapter get a tolerance.
# The learning rates (the schedule's arithmetic) and the trained tokens per step (the batch) must be equal.
# Every frozen setting that shapes training moves at least one of them by more (`sensitivity`;
# docs/training.md, "Legacy restore path").
LOSS_RTOL = 2e-3
GRAD_NORM_RTOL = 2e-2
ADAPTER_RTOL = 2e-2
PROBES = 4


def adapter_fingerprint(folder: Path) -> dict:
    """Which adapter this is, robust to rounding: its tensor shapes exactly; per part (lora_A, lora_B) the
    norm and PROBES fixed random projections of all its weights in one vector. A projection moves by about
    |change| of that vector, so comparing it relative to the norm tells a different adapter from rounding."""
    import torch
    from safetensors.torch import load_file

    from core.records import file_sha256

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    shapes = {name: list(t.shape) for name, t in sorted(tensors.items())}
    found = {"tensors": len(tensors),
             "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
             "bytes_sha256": file_sha256(folder / "adapter_model.safetensors")[:16]}
    generator = torch.Generator().manual_seed(0)
    for part in ("lora_A", "lora_B"):
        flat = torch.cat([t.double().flatten() for name, t in sorted(tensors.items()) if f".{part}." in name])
        probes = torch.randn(PROBES, flat.numel(), generator=generator, dtype=torch.float64)
        found[part] = {"norm": flat.norm().item(), "projections": (probes @ flat).tolist()}
    return found


def observe(run: Path) -> dict:
    """What a finished legacy run folder holds that the reference pins: per stage, each step's loss, learning
    rate, gradient norm and trained tokens (the trainer's log, kept in the final checkpoint), and the final
    adapter's fingerprint."""
    from tiny import model_dir

    found = {"build": build_fingerprint(model_dir(MODEL))}
    for stage in ("stage1", "stage2"):
        last = max((run / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        log = json.loads((last / "trainer_state.json").read_text())["log_history"]
        found[stage] = [[e["step"], e["loss"], e["learning_rate"], e["grad_norm"], e["num_tokens"]]
                        for e in log if "loss" in e]
    found["adapter"] = adapter_fingerprint(run / "stage2" / "adapter")
    return found


def build_fingerprint(folder: Path) -> str:
    """The tiny build's identity: its weights and tokenizer, not just its recipe."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def recipe_differences(config_file: Path, recipe: dict | None = None) -> list[str]:
    """The frozen settings a run's saved config.yaml does not hold as the hand-written recipe says."""
    recipe = recipe or {k: v for k, v in json.loads(RECIPE.read_text()).items() if not k.startswith("_")}
    saved = yaml.safe_load(config_file.read_text())
    return [f"{key}: the run has {saved.get(key)!r}, the recipe {value!r}"
            for key, value in recipe.items() if saved.get(key) != value]


def run_differences(observed: dict, reference: dict) -> list[str]:
    """Where a run departs from the reference beyond rounding: a loss beyond LOSS_RTOL, a gradient norm beyond
    GRAD_NORM_RTOL, any learning rate or token count, an adapter projection beyond ADAPTER_RTOL x the
    reference's norm, any shape or step."""
    found = []
    if observed["build"] != reference["build"]:
        found.append(f"tiny build {observed['build']} is not the reference's {reference['build']}: "
                     "after a deliberate rebuild, run `tests/legacy_reference.py update`")
    for stage in ("stage1", "stage2"):
        steps, ref_steps = [row[0] for row in observed[stage]], [row[0] for row in reference[stage]]
        if steps != ref_steps:
            found.append(f"{stage}: steps {steps}, the reference {ref_steps}")
            continue
        for row, ref in zip(observed[stage], reference[stage]):
            found += [f"{stage} step {row[0]}: {what}" for what in step_differences(row, ref)]
    adapter, ref = observed["adapter"], reference["adapter"]
    for key in ("tensors", "shapes_sha256"):
        if adapter[key] != ref[key]:
            found.append(f"adapter {key}: {adapter[key]}, the reference {ref[key]}")
    for part in ("lora_A", "lora_B"):
        scale = ref[part]["norm"]
        for i, (p, q) in enumerate(zip(adapter[part]["projections"], ref[part]["projections"], strict=True)):
            if abs(p - q) > ADAPTER_RTOL * scale:
                found.append(f"adapter {part} projection {i}: {p:.5f}, the reference {q:.5f} "
                             f"(moved {abs(p - q) / scale:.1e} of its norm > {ADAPTER_RTOL})")
    return found


def step_differences(row: list, ref: list) -> list[str]:
    """One logged step ([step, loss, learning_rate, grad_norm, num_tokens]) against the reference's."""
    found = []
    checks = (("loss", row[1], ref[1], LOSS_RTOL), ("grad_norm", row[3], ref[3], GRAD_NORM_RTOL),
              ("learning_rate", row[2], ref[2], 1e-9), ("tokens", row[4], ref[4], 0))
    for name, value, expected, rtol in checks:
        if abs(value - expected) > rtol * abs(expected):
            relative = f" (relative {abs(value - expected) / abs(expected):.1e} > {rtol})" if rtol and expected else ""
            found.append(f"{name} {value:.6g}, the reference {expected:.6g}{relative}")
    return found


def run_legacy(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    from parity_tools.run import legacy_command

    return subprocess.run(legacy_command(out, MODEL, STEPS, TRAIN_SAMPLES, *overrides), cwd=REPO,
                          capture_output=True, text=True)


def finished(out: Path, *overrides: str) -> dict:
    done = run_legacy(out, *overrides)
    if done.returncode != 0:
        raise SystemExit(f"the legacy run failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return observe(out)


def update() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "legacy"
        observed = finished(out)
        wrong = recipe_differences(out / "stage1" / "config.yaml")
        if wrong:
            print("not written: the run's settings differ from tests/reference/legacy_recipe.json:\n  "
                  + "\n  ".join(wrong), file=sys.stderr)
            return 1
    before = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else None
    rows = {stage: "[\n" + ",\n".join(f"    {json.dumps(row)}" for row in observed[stage]) + "\n  ]"
            for stage in ("stage1", "stage2")}
    REFERENCE.write_text("{\n" + f'  "build": {json.dumps(observed["build"])},\n'
                         + "".join(f'  "{stage}": {text},\n' for stage, text in rows.items())
                         + f'  "adapter": {json.dumps(observed["adapter"], indent=4)}\n}}\n')
    assert json.loads(REFERENCE.read_text()) == observed
    print(f"wrote {REFERENCE.relative_to(REPO)}; review the change before committing it")
    if before and [len(r) for r in before["stage1"]] == [len(r) for r in observed["stage1"]]:
        print("differences from the previous reference:\n  " + "\n  ".join(run_differences(observed, before) or ["none"]))
    return 0


# Each frozen setting that shapes training, moved to a neighbouring value a careless edit could give.
PERTURBATIONS = ["stage1_learning_rate=0.0001", "stage2_learning_rate=0.00005", "lr_scheduler=cosine",
                 "warmup_ratio=0.2", "lora_r=8", "lora_alpha=16", "load_in_4bit=false",
                 "gradient_accumulation_steps=8", "max_grad_norm=0.3", "seed=42"]


def sensitivity() -> int:
    """How far each perturbed setting moves the run, against the tolerances: each must be caught."""
    reference = json.loads(REFERENCE.read_text())
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for change in PERTURBATIONS:
            found = run_differences(finished(Path(tmp) / change.split("=")[0], change), reference)
            counts = {what: sum(f": {what} " in d for d in found)
                      for what in ("loss", "learning_rate", "grad_norm", "tokens")}
            counts["adapter"] = sum(d.startswith("adapter") for d in found)
            missed += not found
            print(f"{'caught' if found else 'MISSED'}  {change}: beyond tolerance: "
                  + ", ".join(f"{n} {what}" for what, n in counts.items())
                  + (f"; largest loss change: {largest_loss_change(found)}" if counts["loss"] else ""), flush=True)
    return 1 if missed else 0


def largest_loss_change(found: list[str]) -> str:
    return max((d for d in found if ": loss " in d), key=lambda d: float(d.split("relative ")[1].split()[0]))


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("update", "sensitivity"))
    raise SystemExit({"update": update, "sensitivity": sensitivity}[parser.parse_args().command]())
